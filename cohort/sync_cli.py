"""``refine-more cohort sync-mlflow DIR [--tracking-uri URI]``: log what a cohort run could not log
to MLflow (:mod:`cohort.tracking_sync`). Exit 0 when everything is logged, 1 with one line when
DIR is not a cohort output folder or MLflow still fails (nothing logged twice on a rerun)."""
from __future__ import annotations

import sys


def add_sync(sub) -> None:
    """The ``sync-mlflow`` subcommand, added to ``cohort``'s subcommands by :mod:`cohort.cli`."""
    s = sub.add_parser("sync-mlflow", help="log to MLflow what a cohort run missed (server down or lost)",
                       description="Log the parent run and every missing child run of a cohort output folder "
                                   "to MLflow, then record the run ids in DIR/results.parquet.")
    s.add_argument("dir", help="the cohort's output folder (--out of cohort run)")
    s.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the run's, from DIR/tracking.json; else "
                        "MLFLOW_TRACKING_URI, else sqlite:///<abs DIR>/mlflow.db)")
    s.add_argument("--experiment", default=None, help="MLflow experiment (default: the run's)")
    s.set_defaults(func=_sync)


def _sync(args) -> int:
    from .tracking_sync import SyncError, sync_mlflow
    try:
        sync_mlflow(args.dir, tracking_uri=args.tracking_uri, experiment=args.experiment)
    except SyncError as exc:
        print(f"error: sync-mlflow: {exc}", file=sys.stderr)
        return 1
    return 0
