"""``refine-more cohort sync-mlflow DIR``: log to MLflow what a cohort run could not (the server was
down at the start, or went away mid-run), from what the run left in ``DIR``: ``tracking.json``
(the parent run's params, manifest, end metrics and status), ``results.parquet``, ``config.json``
and each subject's ``history.json``.

The parent run is the run's own when the store still has it (a server lost mid-run), else a new
one tagged ``refine_more.synced``. Every row without an ``mlflow_run_id`` gets its child run;
``results.parquet`` is then rewritten (atomically) with the run ids. Running it again logs nothing
new: rows with ids are skipped, and a child run found under the parent with the row's subject and
mode is reused (one left RUNNING, half-logged when the server died, is deleted and logged again).
System metrics of the original run cannot be recovered.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .results import CONFIG_FILE, RESULTS_FILE, SUMMARY_FILE, SUMMARY_PNG, write_results
from .tracking import OK, CohortTracker, TrackingError, default_tracking_uri, flatten, read_journal

DEFAULT_EXPERIMENT = "refine-more-cohort"


class SyncError(ValueError):
    """DIR is not a cohort output folder, or MLflow failed (one line naming the folder or server)."""


@dataclass
class SyncReport:
    tracking_uri: str
    parent_run_id: str
    parent_created: bool
    children_logged: int
    children_reused: int


def _read_json(path) -> dict:
    try:
        with open(path) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _fallback_parent(out_dir: Path, rows: list) -> dict:
    """Parent-run fields for a folder without ``tracking.json`` (from config.json and the rows)."""
    cfg = _read_json(out_dir / CONFIG_FILE)
    modes = {r["mode"] for r in rows}
    mode = "both" if len(modes) > 1 else (modes.pop() if modes else "adapted")
    params = {"config_hash": cfg.get("config_hash"), "mode": mode, "out_dir": str(out_dir),
              "n_subjects": len({r["subject_id"] for r in rows}),
              **{f"config.{k}": v for k, v in flatten(cfg.get("config") or {}).items()}}
    return {"mode": mode, "manifest": None, "params": {k: str(v) for k, v in params.items() if v is not None}}


def _clean(row: dict) -> dict:
    """A results.parquet record as the driver's row: NaN/NA -> None."""
    import pandas as pd
    return {k: (None if not isinstance(v, (list, dict)) and pd.isna(v) else v) for k, v in row.items()}


def _history(row: dict) -> list:
    p = row.get("history_path")
    if row["status"] != "ok" or not p:
        return []
    try:
        with open(p) as fh:
            h = json.load(fh)
        return h if isinstance(h, list) else []
    except (OSError, ValueError):
        return []


def _attach_parent(tracker: CohortTracker, run_id: Optional[str]) -> bool:
    """Use the store's run ``run_id`` as the parent (False when the store does not have it)."""
    from mlflow.exceptions import MlflowException
    if not run_id:
        return False
    try:
        run = tracker._client().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    if run.info.lifecycle_stage != "active":
        return False
    tracker.parent_run_id, tracker.experiment_id = run_id, run.info.experiment_id
    return True


def _children(tracker: CohortTracker) -> dict:
    """(subject_id, mode) -> run id of the parent's finished children; RUNNING ones are deleted."""
    client, found, token = tracker.client, {}, None
    while True:
        page = client.search_runs([tracker.experiment_id], max_results=1000, page_token=token,
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
        for run in page:
            key = (run.data.tags.get("subject_id"), run.data.tags.get("mode"))
            if run.info.status == "RUNNING":
                client.delete_run(run.info.run_id)
            else:
                found.setdefault(key, run.info.run_id)
        token = page.token
        if not token:
            return found


def _sync_children(tracker: CohortTracker, rows: list, lora_rank) -> tuple:
    existing = _children(tracker)
    logged = reused = 0
    for row in rows:
        if row.get("mlflow_run_id") or row.get("status") not in ("ok", "failed"):
            continue
        rid = existing.get((row["subject_id"], row["mode"]))
        if rid:
            row["mlflow_run_id"], row["tracking"] = rid, OK
            reused += 1
        else:
            tracker.log_child(row, _history(row), lora_rank=lora_rank if row["status"] == "ok" else None,
                              synced=True)
            logged += 1
    return logged, reused


def sync_mlflow(out_dir, tracking_uri: Optional[str] = None, experiment: Optional[str] = None,
                log=print) -> SyncReport:
    """Log the parent run and every missing child run of the cohort output ``out_dir``, under the
    folder's lock (not while a cohort run writes it)."""
    from .guards import RunRefused, output_lock

    out_dir = Path(out_dir).resolve()
    if not (out_dir / RESULTS_FILE).is_file():
        raise SyncError(f"{out_dir}: no {RESULTS_FILE} (not a cohort output folder)")
    try:
        with output_lock(out_dir):
            return _sync(out_dir, tracking_uri, experiment, log)
    except RunRefused as exc:
        raise SyncError(str(exc).split("; wait")[0]) from None


def _sync(out_dir: Path, tracking_uri, experiment, log) -> SyncReport:
    import pandas as pd

    rows = [_clean(r) for r in pd.read_parquet(out_dir / RESULTS_FILE).to_dict("records")]
    journal = read_journal(out_dir) or _fallback_parent(out_dir, rows)
    uri = (tracking_uri or journal.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
           or default_tracking_uri(out_dir))
    tracker = CohortTracker(uri, experiment or journal.get("experiment") or DEFAULT_EXPERIMENT, out_dir,
                            log=log, system_metrics=False, strict=True)
    tracker.journal.update({k: v for k, v in journal.items() if k not in ("tracking_uri", "experiment", "tracking")})
    lora_rank = ((_read_json(out_dir / CONFIG_FILE).get("config") or {}).get("adapt") or {}).get("lora_rank")
    logged = reused = 0
    try:
        from .tracking_system import check_reachable
        check_reachable(uri)
        created = not _attach_parent(tracker, journal.get("parent_run_id"))
        if created:
            tracker.journal["parent_done"] = False
            tracker.create_parent(synced=True)
        try:
            logged, reused = _sync_children(tracker, rows, lora_rank)
        finally:
            if logged or reused:
                write_results(out_dir, rows)
        _finish(tracker, out_dir, changed=bool(logged or reused))
    except (TrackingError, ConnectionError) as exc:
        raise SyncError(str(exc)) from None
    except Exception as exc:
        raise SyncError(f"MLflow at {uri}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
    tracker.save_journal(tracking=OK)
    log(f"sync-mlflow {out_dir}: parent run {tracker.parent_run_id} ({'new' if created else 'existing'}), "
        f"{logged} child run(s) logged, {reused} found already logged; at {uri}")
    return SyncReport(uri, tracker.parent_run_id, created, logged, reused)


def _finish(tracker: CohortTracker, out_dir: Path, changed: bool) -> None:
    """The seed state and the end of the parent run, unless logged already; a rewritten
    results.parquet replaces the parent's copy."""
    j = tracker.journal
    if j.get("seed_state") and not j.get("seed_state_logged"):
        tracker.log_seed_state(j["seed_state"])
    results = str(out_dir / RESULTS_FILE)
    if not j.get("parent_done"):
        fin = j.get("finish") or {"metrics": {}, "status": "KILLED",   # the driver never finished
                                  "artifacts": [results, str(out_dir / SUMMARY_FILE), str(out_dir / SUMMARY_PNG)]}
        if results not in fin["artifacts"]:
            fin["artifacts"] = [results, *fin["artifacts"]]
        j["finish"] = {**fin, "artifacts": [a for a in fin["artifacts"] if os.path.exists(a)]}
        tracker.log_finish()
    elif changed:
        tracker._artifacts(tracker.parent_run_id, [results])
