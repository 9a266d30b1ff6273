"""``refine-more cohort ...`` / ``python -m cohort ...``: the cohort command line.

``refine-more cohort run MANIFEST --out DIR [--mode adapted|scratch|both] ...`` writes
``DIR/<subject_id>/<mode>/maps.h5`` (+ NIfTI, montage, loss history) and ``DIR/results.parquet``.
``main(argv)`` returns the exit status: 0 when every subject/mode is ok, 1 when some failed
(everything else is still written; ``--allow-failures`` makes that 0), 2 for usage or manifest
errors.
"""
from __future__ import annotations

import argparse
import os
import sys

MODE_HELP = ("scratch: every subject from scratch. adapted: the seed (role 'seed', else the first valid "
             "row) from scratch (a 'scratch' row marked is_seed), then every subject, the seed included, "
             "adapted from it. both: every subject from scratch (the seed's run is the seed) and every "
             "subject adapted. Default: adapted.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refine-more cohort", description="Reconstruct a cohort on a Ray cluster.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="reconstruct every subject of a manifest",
                       description="Reconstruct every subject of a manifest (Parquet or CSV) on Ray.")
    r.add_argument("manifest", help="manifest table (Parquet; CSV accepted): subject_id, path[, role]")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--mode", choices=("adapted", "scratch", "both"), default="adapted", help=MODE_HELP)
    r.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto', 'ray://host:10001', host:port); default RAY_ADDRESS, "
                        "else start a local Ray (token authentication on, as Ray's default)")
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray started here (default: all)")
    r.add_argument("--gpus-per-task", type=float, default=None,
                   help="GPUs per reconstruction (1, 0.5 packs two per GPU, 0 = CPU). Default 1 when the "
                        "cluster has GPUs, else 0; asking for GPUs on a cluster without any falls back to CPU")
    r.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs per reconstruction (default 1)")
    r.add_argument("--config", default=None, help="TOML/YAML/JSON config overriding the preset")
    r.add_argument("--preset", default="small", help="config preset: paper, small (default), tiny")
    r.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite:///<abs DIR>/mlflow.db)")
    r.add_argument("--experiment", default="refine-more-cohort", help="MLflow experiment name")
    r.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    r.add_argument("--force", action="store_true", help="redo subjects that are already done")
    r.add_argument("--max-retries", type=int, default=2,
                   help="retries of a task whose worker or node died (default 2); Python errors are never retried")
    r.add_argument("--allow-failures", action="store_true", help="exit 0 even when some subjects failed")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.command != "run":
        return 2
    from refine_more.config import load_config

    from .driver import run_cohort
    from .manifest import ManifestError

    if args.gpus_per_task is not None and args.gpus_per_task < 0:
        print("error: --gpus-per-task must be >= 0", file=sys.stderr)
        return 2
    if args.max_retries < 0:
        print("error: --max-retries must be >= 0", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, preset_name=args.preset)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_cohort(args.manifest, args.out, mode=args.mode, config=config, address=args.address,
                            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                            tracking_uri=args.tracking_uri, experiment=args.experiment,
                            tracking=not args.no_tracking, force=args.force, max_retries=args.max_retries,
                            num_cpus=args.num_cpus, progress=not args.no_progress)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if report.n_failed and not args.allow_failures else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
