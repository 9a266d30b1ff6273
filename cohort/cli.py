"""The cohort's commands: ``refine-more cohort run ...`` (also ``python -m cohort run ...``, the
``ray job submit`` entrypoint) and ``refine-more demo``.

``cohort run MANIFEST --out DIR [--mode adapted|scratch|both] ...`` writes
``DIR/<subject_id>/<mode>/maps.h5`` (+ NIfTI, montage, loss history, config.json),
``DIR/results.parquet`` and ``DIR/summary.json``. It returns the exit status: 0 when every
subject/mode is ok, 1 when some failed (everything else is still written; ``--allow-failures``
makes that 0), 2 for usage, config or manifest errors. Results that QC flagged are results: they
exit 0 and are named in the summary and ``qc_status`` (docs/decisions/017).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .sync_cli import add_sync

MODE_HELP = ("scratch: every subject from scratch. adapted: the seed (role 'seed', else the first valid "
             "row) from scratch (a 'scratch' row marked is_seed), then every subject, the seed included, "
             "adapted from it. both: every subject from scratch (the seed's run is the seed) and every "
             "subject adapted. Default: adapted.")


def _add_run(sub) -> None:
    from refine_more.cli import add_config_arguments

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
    add_config_arguments(r)
    r.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else sqlite:///<abs DIR>/mlflow.db)")
    r.add_argument("--experiment", default="refine-more-cohort", help="MLflow experiment name")
    r.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    r.add_argument("--force", action="store_true", help="redo subjects that are already done")
    r.add_argument("--max-retries", type=int, default=2,
                   help="retries of a task whose worker or node died (default 2); Python errors are never retried")
    r.add_argument("--allow-failures", action="store_true", help="exit 0 even when some subjects failed")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--seed-from", default=None, metavar="DIR_OR_MLFLOW_RUN",
                   help="adapt every subject from the seed state of an earlier run (its output folder, its "
                        "seed_state.safetensors, or its MLflow parent run: runs:/<run id>); no seed is reconstructed")
    r.add_argument("--bids", default=None, metavar="DIR",
                   help="also write the finished maps as BIDS derivatives in DIR (refine_more/files/interop/bids.py)")
    r.set_defaults(func=_run)


def _run(args) -> int:
    from refine_more.cli import UsageError, check_out_dir
    from refine_more.config import load_config

    from .driver import run_cohort
    from .guards import RunRefused
    from .manifest import ManifestError, read_manifest
    from .seed_source import SeedSourceError

    if args.gpus_per_task is not None and args.gpus_per_task < 0:
        print("error: --gpus-per-task must be >= 0", file=sys.stderr)
        return 2
    if args.max_retries < 0:
        print("error: --max-retries must be >= 0", file=sys.stderr)
        return 2
    try:   # refused before the driver starts: no worker runs, no empty --out is left behind
        config = load_config(args.config, args.preset, args.set)
        check_out_dir(args.out)
        read_manifest(args.manifest, args.out)
    except (ValueError, FileNotFoundError, UsageError) as exc:   # ManifestError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run_cohort(args.manifest, args.out, mode=args.mode, config=config, address=args.address,
                            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task,
                            tracking_uri=args.tracking_uri, experiment=args.experiment,
                            tracking=not args.no_tracking, force=args.force, max_retries=args.max_retries,
                            num_cpus=args.num_cpus, progress=not args.no_progress, seed_from=args.seed_from)
    except (ManifestError, SeedSourceError, RunRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.bids:
        from refine_more.files.interop.bids import entries_from_results, write_bids
        write_bids(args.bids, entries_from_results(args.out))
    return 1 if report.n_failed and not args.allow_failures else 0


def _demo(args) -> int:
    """The main job: simulate a small cohort, run it through the Ray driver in `both` modes."""
    from refine_more.evaluation.simulate import SimulationConfig, simulate_cohort

    out = Path(args.out)
    t0 = time.perf_counter()
    manifest = simulate_cohort(out / "data", args.subjects, SimulationConfig(matrix=tuple(args.matrix)), seed=args.seed)
    argv = ["run", str(manifest), "--out", str(out / "recon"), "--mode", "both", "--preset", args.preset]
    if args.num_cpus:
        argv += ["--num-cpus", str(args.num_cpus)]
    rc = main(argv)
    wall = time.perf_counter() - t0
    print(f"demo: {args.subjects} subjects, matrix {tuple(args.matrix)}, preset {args.preset}: "
          f"{wall:.0f} s wall; results in {out / 'recon'}")
    _print_report(out / "recon", wall)
    return rc


def _print_report(recon: Path, wall: float) -> None:
    """The cohort report's path and what writing reports cost against the demo's wall time."""
    import json
    try:
        cost = json.loads((recon / "summary.json").read_text()).get("report_seconds") or {}
    except (OSError, ValueError):
        cost = {}
    if (recon / "report.html").is_file():
        in_tasks = cost.get("subject_reports_in_tasks", 0.0) + cost.get("diagnostics_in_tasks", 0.0)
        print(f"cohort report: {(recon / 'report.html').resolve()}\n  reports cost {cost.get('cohort', 0.0):.1f} s "
              f"in the driver + {in_tasks:.1f} s summed over the tasks (subject reports and their diagnostics), "
              f"{100 * (cost.get('cohort', 0.0) + in_tasks) / wall:.1f} % of the demo's wall time at most")


def add_commands(sub) -> None:
    """``cohort`` (with ``run`` and ``sync-mlflow``) and ``demo``."""
    from refine_more.config import PRESETS

    c = sub.add_parser("cohort", help="cohort reconstruction on Ray (see `refine-more cohort run -h`)",
                       description="Reconstruct a cohort on a Ray cluster.")
    cs = c.add_subparsers(dest="cohort_command", required=True)
    _add_run(cs)
    add_sync(cs)
    d = sub.add_parser("demo", help="main job: simulate a small cohort and reconstruct it on a local Ray (adapted and scratch)")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--subjects", type=int, default=4)
    d.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32], metavar=("Z", "Y", "X"))
    d.add_argument("--preset", default="small", choices=tuple(PRESETS))
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--num-cpus", type=int, default=None)
    d.set_defaults(func=_demo)


def build_parser() -> argparse.ArgumentParser:
    """``refine-more cohort`` alone (``python -m cohort``)."""
    p = argparse.ArgumentParser(prog="refine-more cohort", description="Reconstruct a cohort on a Ray cluster.")
    ps = p.add_subparsers(dest="command", required=True)
    _add_run(ps)
    add_sync(ps)
    return p


def main(argv=None) -> int:
    """``refine-more cohort ARGS`` with ARGS = ``argv`` (``["run", MANIFEST, ...]``)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
