"""The cohort driver: plain, testable functions; the Ray tasks in :mod:`cohort.tasks` wrap them.

Plan of a run (``run_cohort``):

1. read the manifest (:mod:`cohort.manifest`), validate every subject file up front; bad or
   missing files become ``failed`` rows (one per requested mode) and are not scheduled;
2. resume: a (subject, mode) whose ``DIR/<id>/<mode>/done.json`` holds the same config hash (and,
   for adapted rows, the same seed subject) is not redone (row ``status='ok'``, ``resumed=True``)
   unless ``force``;
3. the seed (``role == 'seed'``, else the first valid row) is reconstructed from scratch in full as
   one Ray task that writes its outputs and returns its row plus the ``SeedState`` numpy dict; the
   driver ``ray.put``\\ s that dict ONCE and passes the ObjectRef as a top-level argument to every
   adaptation task (Ray resolves it before the task starts; workers on a node share one copy);
4. results are collected in the order they finish (``ray.wait(num_returns=1)``), logged to MLflow
   by the driver (:mod:`cohort.tracking`), and written to ``DIR/results.parquet`` after every
   completion, so an interrupted run leaves a consistent table.

Modes, and what the seed's rows are (decided here, documented in the CLI help):

- ``scratch``: every valid subject from scratch (no seed).
- ``adapted``: the seed is reconstructed from scratch (a ``scratch`` row; the seed's rows carry
  ``is_seed=True``: that run is the real cost of the adapted cohort), then EVERY valid subject, the seed included, is
  adapted from the seed state (``adapted`` rows). Adapting the seed to itself costs one short
  adapted run and keeps the contract ``DIR/<id>/adapted/maps.h5`` true for every subject.
- ``both``: every valid subject from scratch (the seed's scratch run is the seed) and every valid
  subject adapted, the seed included, as above: one row per subject and mode.

Outputs per subject and mode, under ``DIR/<subject_id>/<mode>/``: ``maps.h5`` and the NIfTI maps
(:func:`refine_more.maps_io.write_maps`), ``montage.png``, ``history.json``, ``history.csv``,
``loss.png``, the seed's ``seed_state.safetensors``, and ``done.json`` written LAST. Every file is
written atomically (temporary file + ``os.replace``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .manifest import Entry, choose_seed, file_sha256, read_manifest, validate_entries

MODES = ("scratch", "adapted")
MAP_NAMES = ("I0", "T1F", "f", "kF")
DONE = "done.json"
SEED_STATE_FILE = "seed_state.safetensors"
RESULTS_FILE = "results.parquet"
SUMMARY_PNG = "summary.png"

# leading columns of results.parquet (others follow in a stable order)
COLUMNS = [
    "subject_id", "mode", "status", "error", "resumed", "is_seed", "seed_subject", "method", "node",
    "device", "setup_s", "stage1_s", "stage2_s", "total_s", "wall_s", "iterations_stage1",
    "iterations_stage2", "trainable_stage1", "trainable_stage2",
    "loss_final", "loss1_final", "loss2_final", "loss3_final",
    *[f"{m}_{p}" for p in MAP_NAMES for m in ("nrmse", "ssim")],
    "mlflow_run_id", "config_hash", "subject_path", "out_dir", "maps_path", "montage_path",
    "loss_png_path", "history_path", "started_at", "finished_at",
]


# ------------------------------------------------------------------------------------------------
# small file helpers
# ------------------------------------------------------------------------------------------------
def subject_dir(out_dir, subject_id: str, mode: str) -> Path:
    return Path(out_dir) / subject_id / mode


def _write_text(path, text: str) -> str:
    from refine_more.maps_io import atomic_write

    def w(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
    return atomic_write(str(path), w)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(v):
    """JSON/Parquet-friendly scalar (NaN stays NaN for floats)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def read_done(out_dir, subject_id: str, mode: str) -> Optional[dict]:
    """The row stored in ``done.json`` (None when absent or unreadable)."""
    p = subject_dir(out_dir, subject_id, mode) / DONE
    try:
        with open(p) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def resumable(out_dir, subject_id: str, mode: str, config_hash: str, seed_subject: Optional[str]) -> Optional[dict]:
    """The stored row if (subject, mode) finished with this config (and seed, for adapted rows)."""
    d = read_done(out_dir, subject_id, mode)
    if not d or d.get("config_hash") != config_hash or d.get("mode") != mode or d.get("status") != "ok":
        return None
    if mode == "adapted" and d.get("seed_subject") != seed_subject:
        return None
    return d


# ------------------------------------------------------------------------------------------------
# one subject (what a Ray task runs)
# ------------------------------------------------------------------------------------------------
def _scores(maps: dict, reference: dict, mask) -> dict:
    ref = {k: v for k, v in (reference or {}).items() if k in MAP_NAMES}
    if not ref:
        return {}
    try:
        from refine_more.metrics import score_maps
    except ImportError:  # metrics.py is being written in parallel; nRMSE alone as a fallback
        def score_maps(est, ref, mask):
            m = np.asarray(mask, bool)
            return {p: {"nrmse": float(100 * np.linalg.norm(est[p][m] - ref[p][m]) / np.linalg.norm(ref[p][m])),
                        "ssim": float("nan")} for p in ref}
    out = {}
    for p, s in score_maps({k: maps[k] for k in MAP_NAMES}, ref, mask).items():
        out[f"nrmse_{p}"] = float(s["nrmse"])
        out[f"ssim_{p}"] = float(s["ssim"])
    return out


def _history_csv(history: list) -> str:
    keys = []
    for h in history:
        keys += [k for k in h if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for h in history:
        w.writerow(h)
    return buf.getvalue()


def _reconstruct_subject(path, out_dir, mode: str, config_dict: dict, seed_state=None, *,
                         subject_id: Optional[str] = None, is_seed: bool = False,
                         seed_subject: Optional[str] = None, save_seed_state: bool = False,
                         node: Optional[str] = None):
    """Reconstruct one subject, write its outputs (``done.json`` last); return ``(row, result)``."""
    from refine_more.config import ReconConfig
    from refine_more.maps_io import write_maps
    from refine_more.recon import reconstruct
    from refine_more.subject import read_subject

    from . import plots

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "adapted" and seed_state is None:
        raise ValueError("an adapted reconstruction needs a seed state")
    started = time.time()
    config = ReconConfig.from_dict(config_dict)
    subject = read_subject(path)
    sid = subject_id or subject.subject_id
    odir = subject_dir(out_dir, sid, mode)
    odir.mkdir(parents=True, exist_ok=True)
    (odir / DONE).unlink(missing_ok=True)          # a redo is not "done" until it finishes
    # temporaries of an attempt that was killed mid-write (SIGKILL skips atomic_path's clean-up);
    # one attempt writes a subject folder at a time (Ray retries only after a worker died)
    for stale in odir.glob(".*.tmp*"):
        stale.unlink(missing_ok=True)

    result = reconstruct(subject, config, seed_state=seed_state if mode == "adapted" else None,
                         track_reference=True, progress_desc=f"{sid}/{mode}")
    scores = _scores(result.maps, subject.reference, result.tissue_mask)

    maps_path = write_maps(odir, result.maps, result.tissue_mask, subject_id=sid, method=result.method,
                           config_hash=result.config_hash, voxel_size_mm=subject.voxel_size_mm)
    title = f"{sid} {mode} ({result.method})"
    montage_path = plots.montage(odir / "montage.png", result.maps, subject.reference, result.tissue_mask, title)
    history = [{k: _clean(v) for k, v in h.items()} for h in result.history]
    history_path = _write_text(odir / "history.json", json.dumps(history, indent=1, default=_json_default))
    _write_text(odir / "history.csv", _history_csv(history))
    loss_png = plots.loss_plot(odir / "loss.png", history, title)
    if save_seed_state:
        from refine_more.adaptation import SeedState
        SeedState.from_result(result).save(odir / SEED_STATE_FILE)

    final = result.final_losses()
    row = {
        "subject_id": sid, "mode": mode, "status": "ok", "error": None, "resumed": False,
        "is_seed": bool(is_seed), "seed_subject": seed_subject if mode == "adapted" else (sid if is_seed else None),
        "method": result.method, "node": node or socket.gethostname(), "device": result.device,
        "setup_s": result.timings.get("setup"), "stage1_s": result.timings.get("stage1"),
        "stage2_s": result.timings.get("stage2"), "total_s": result.timings.get("total"),
        "iterations_stage1": int(result.iterations.get("stage1", 0)),
        "iterations_stage2": int(result.iterations.get("stage2", 0)),
        "trainable_stage1": int(result.trainable_parameters.get("stage1", 0)),
        "trainable_stage2": int(result.trainable_parameters.get("stage2", 0)),
        "loss_final": final.get("loss"), "loss1_final": final.get("loss1"),
        "loss2_final": final.get("loss2"), "loss3_final": final.get("loss3"),
        **scores,
        "config_hash": result.config_hash, "subject_path": str(path), "out_dir": str(odir),
        "maps_path": str(maps_path), "montage_path": str(montage_path), "loss_png_path": str(loss_png),
        "history_path": str(history_path), "started_at": started,
    }
    row["finished_at"] = time.time()
    row["wall_s"] = row["finished_at"] - started
    row = {k: _clean(v) for k, v in row.items()}
    _write_text(odir / DONE, json.dumps(row, indent=1, default=_json_default))   # LAST: marks it done
    row["history"] = history    # for the driver's MLflow logging; not stored in results.parquet
    return row, result


def run_subject(path, out_dir, mode: str, config_dict: dict, seed_state=None, *,
                subject_id: Optional[str] = None, is_seed: bool = False, seed_subject: Optional[str] = None,
                node: Optional[str] = None) -> dict:
    """Reconstruct one subject (``mode`` 'scratch' or 'adapted', the latter with ``seed_state``:
    a SeedState or its numpy dict), write its outputs; return its results row (with ``history``).

    Raises what the reconstruction raises (``SubjectFormatError``/``ValueError`` for bad data).
    """
    row, _ = _reconstruct_subject(path, out_dir, mode, config_dict, seed_state, subject_id=subject_id,
                                  is_seed=is_seed, seed_subject=seed_subject, node=node)
    return row


def run_seed(path, out_dir, config_dict: dict, *, subject_id: Optional[str] = None,
             node: Optional[str] = None) -> tuple:
    """Reconstruct the seed from scratch (outputs under ``<id>/scratch``, plus
    ``seed_state.safetensors`` for resuming); return ``(row, SeedState numpy dict)``."""
    from refine_more.adaptation import SeedState
    row, result = _reconstruct_subject(path, out_dir, "scratch", config_dict, None, subject_id=subject_id,
                                       is_seed=True, save_seed_state=True, node=node)
    return row, SeedState.from_result(result).to_numpy_dict()


def load_seed_state_dict(out_dir, seed_id: str) -> Optional[dict]:
    """The saved seed state of a finished seed (resume), as a numpy dict; None when unusable."""
    from refine_more.adaptation import SeedState, SeedStateError
    p = subject_dir(out_dir, seed_id, "scratch") / SEED_STATE_FILE
    try:
        return SeedState.load(p).to_numpy_dict()
    except (SeedStateError, OSError, ValueError):
        return None


def failed_row(subject_id: str, mode: str, error: str, *, path=None, is_seed=False, config_hash=None,
               seed_subject=None, node=None) -> dict:
    return {"subject_id": subject_id, "mode": mode, "status": "failed", "error": error, "resumed": False,
            "is_seed": bool(is_seed), "seed_subject": seed_subject, "node": node, "config_hash": config_hash,
            "subject_path": None if path is None else str(path)}


# ------------------------------------------------------------------------------------------------
# results table and summary
# ------------------------------------------------------------------------------------------------
def rows_frame(rows: list):
    import pandas as pd
    rows = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    df = pd.DataFrame(rows)
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    extra = sorted(c for c in df.columns if c not in COLUMNS)
    df = df[COLUMNS + extra]
    for c in ("resumed", "is_seed"):
        df[c] = df[c].fillna(False).astype(bool)
    num = [c for c in COLUMNS if (c.endswith("_s") or c.startswith(("iterations_", "trainable_", "nrmse_", "ssim_"))
           or c.endswith("_final") or c in ("started_at", "finished_at"))]
    for c in num:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in ("error", "mlflow_run_id", "node", "device", "method", "seed_subject", "config_hash"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    order = {m: i for i, m in enumerate(MODES)}
    df["_o"] = df["mode"].map(order)
    return df.sort_values(["subject_id", "_o"]).drop(columns="_o").reset_index(drop=True)


def write_results(out_dir, rows: list) -> str:
    from refine_more.maps_io import atomic_write
    df = rows_frame(rows)
    return atomic_write(str(Path(out_dir) / RESULTS_FILE), lambda tmp: df.to_parquet(tmp, index=False))


def _mean(vals):
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def summarize(rows: list) -> dict:
    """Per mode: count, mean total_s, mean nRMSE/SSIM per map; speedup scratch/adapted."""
    out = {"modes": {}}
    for mode in MODES:
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        if not ok and not any(r["mode"] == mode for r in rows):
            continue
        s = {"ok": len(ok), "failed": sum(r["mode"] == mode and r["status"] == "failed" for r in rows),
             "mean_total_s": _mean(r.get("total_s") for r in ok)}
        for p in MAP_NAMES:
            s[f"mean_nrmse_{p}"] = _mean(r.get(f"nrmse_{p}") for r in ok)
            s[f"mean_ssim_{p}"] = _mean(r.get(f"ssim_{p}") for r in ok)
        out["modes"][mode] = s
    sc, ad = out["modes"].get("scratch"), out["modes"].get("adapted")
    out["speedup"] = (sc["mean_total_s"] / ad["mean_total_s"]) if sc and ad and ad["mean_total_s"] > 0 else float("nan")
    return out


def format_summary(summary: dict, n_subjects: int, wall_s: float) -> str:
    lines = [f"cohort: {n_subjects} subjects in {wall_s:.1f} s"]
    for mode, s in summary["modes"].items():
        nr = "  ".join(f"{p} {s[f'mean_nrmse_{p}']:.1f}%" for p in MAP_NAMES if not math.isnan(s[f"mean_nrmse_{p}"]))
        lines.append(f"  {mode:8s} ok {s['ok']:3d}  failed {s['failed']:3d}  mean total {s['mean_total_s']:.2f} s"
                     + (f"  mean nRMSE {nr}" if nr else ""))
    if not math.isnan(summary["speedup"]):
        lines.append(f"  speedup (mean scratch / mean adapted total time): {summary['speedup']:.1f}x")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the cohort run
# ------------------------------------------------------------------------------------------------
@dataclass
class CohortReport:
    rows: list
    results_path: str
    summary: dict
    summary_text: str
    wall_s: float
    seed_subject: Optional[str] = None
    seed_puts: int = 0                 # ray.put calls of the seed state (1 when any adaptation ran)
    n_reconstructed: int = 0           # reconstructions that ran (ok or failed) in this run
    n_resumed: int = 0
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    resources: dict = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)


def connect_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, log=print) -> bool:
    """Join ``address`` (or ``RAY_ADDRESS``); else start a local Ray. True when this call started
    (and so should shut down) Ray. Token authentication stays as Ray's default (on for a local
    cluster): it is never disabled here."""
    import ray
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local" always starts a fresh cluster (never attaches to another one on this machine)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, dashboard_host="127.0.0.1")
    return True


def _task_error(exc) -> str:
    import ray
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
    if cause is not None and not isinstance(cause, ray.exceptions.RayTaskError):
        msg = f"{type(cause).__name__}: {cause}"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return msg.strip()[:4000]


def run_cohort(manifest, out_dir, *, mode: str = "adapted", config=None, address: Optional[str] = None,
               gpus_per_task: Optional[float] = None, cpus_per_task: float = 1, tracking_uri: Optional[str] = None,
               experiment: str = "refine-more-cohort", tracking: bool = True, force: bool = False,
               max_retries: int = 2, num_cpus: Optional[int] = None, progress: bool = True,
               log=print) -> CohortReport:
    """Run a cohort (see the module docstring); returns a :class:`CohortReport`."""
    import ray
    from tqdm import tqdm

    from refine_more.config import ReconConfig, preset

    from . import plots, tasks
    from .tracking import CohortTracker, default_tracking_uri

    if mode not in ("scratch", "adapted", "both"):
        raise ValueError(f"mode must be scratch, adapted or both, got {mode!r}")
    modes = MODES if mode == "both" else (mode,)
    config = config if config is not None else preset("small")
    if isinstance(config, dict):
        config = ReconConfig.from_dict(config)
    config_hash = config.hash()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    entries = read_manifest(manifest, out_dir)
    validate_entries(entries, progress=progress)
    seed = choose_seed(entries) if "adapted" in modes else None
    seed_id = seed.subject_id if seed else None

    rows: dict = {}          # (subject_id, mode) -> row
    for e in entries:
        if not e.valid:
            for m in modes:
                rows[(e.subject_id, m)] = failed_row(e.subject_id, m, "; ".join(e.problems), path=e.path,
                                                     config_hash=config_hash,
                                                     seed_subject=seed_id if m == "adapted" else None)
            log(f"skipping {e.subject_id}: invalid subject file:\n  " + "\n  ".join(e.problems))
    valid = [e for e in entries if e.valid]

    # -- resume ------------------------------------------------------------------------------------
    todo = []                # (entry, mode) still to run
    for e in valid:
        for m in modes:
            prev = None if force else resumable(out_dir, e.subject_id, m, config_hash, seed_id)
            if prev is not None:
                prev.update(resumed=True)
                rows[(e.subject_id, m)] = prev
            else:
                todo.append((e, m))
    if seed_id and not force and (seed_id, "scratch") not in rows:
        # adapted mode: the seed's scratch run belongs to the cohort's results too
        prev_seed = resumable(out_dir, seed_id, "scratch", config_hash, None)
        if prev_seed is not None:
            rows[(seed_id, "scratch")] = {**prev_seed, "resumed": True}
    need_seed_state = any(m == "adapted" for _, m in todo)
    seed_todo = False
    seed_dict = None
    if need_seed_state:
        if rows.get((seed_id, "scratch"), {}).get("resumed"):
            seed_dict = load_seed_state_dict(out_dir, seed_id)
        if seed_dict is None:             # redo the seed (its scratch run IS the seed: never twice)
            seed_todo = True
            rows.pop((seed_id, "scratch"), None)
            todo = [(e, m) for e, m in todo if not (e.subject_id == seed_id and m == "scratch")]
    n_resumed = sum(bool(r.get("resumed")) for r in rows.values())
    if n_resumed:
        log(f"resuming: {n_resumed} subject/mode results already done with config {config_hash} (use --force to redo)")

    # -- Ray ---------------------------------------------------------------------------------------
    report = CohortReport(rows=[], results_path=str(out_dir / RESULTS_FILE), summary={}, summary_text="",
                          wall_s=0.0, seed_subject=seed_id, n_resumed=n_resumed)
    n_tasks = len(todo) + int(seed_todo)
    started_ray = connect_ray(address, num_cpus, log) if n_tasks else False
    tracker = None
    try:
        resources = {}
        n_gpu = 0.0
        if ray.is_initialized():
            cres = ray.cluster_resources()
            n_gpu = float(cres.get("GPU", 0))
            resources = {"CPU": float(cres.get("CPU", 0)), "GPU": n_gpu,
                         "nodes": sum(1 for n in ray.nodes() if n.get("Alive"))}
        gpus = (1.0 if n_gpu > 0 else 0.0) if gpus_per_task is None else float(gpus_per_task)
        if gpus > 0 and n_gpu <= 0:
            warnings.warn(f"--gpus-per-task {gpus:g} but the Ray cluster has no GPUs: running on CPU")
            log(f"warning: --gpus-per-task {gpus:g} but the Ray cluster has no GPUs: running on CPU")
            gpus = 0.0
        task_cfg = config.to_dict()
        task_cfg["progress"] = False                    # progress bar in the driver only
        if gpus == 0 and task_cfg.get("device", "auto") == "auto":
            task_cfg["device"] = "cpu"                  # a CPU task never takes a GPU Ray did not give it
        report.resources = {**resources, "gpus_per_task": gpus, "cpus_per_task": float(cpus_per_task)}
        opts = dict(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=int(max_retries), retry_exceptions=False)

        # -- MLflow: the driver is the single writer ---------------------------------------------
        # Workers return their rows (small: metrics, loss history, output paths) and only the
        # driver talks to MLflow. This works with the embedded sqlite default (one process writes
        # the file, no "database is locked") and with remote nodes that cannot reach the tracking
        # store; artifacts are read from the output folder, which the cluster must share anyway.
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir)
        report.tracking_uri = uri
        tracker = CohortTracker(uri, experiment, out_dir, enabled=tracking, log=log)
        tracker.start_parent(config, mode=mode, manifest=manifest, manifest_sha256=file_sha256(manifest),
                             resources=report.resources, n_subjects=len(entries), seed_subject=seed_id)

        pending: dict = {}   # ObjectRef -> (kind, entry, mode)
        seed_ref_holder = {}

        def submit(e: Entry, m: str):
            is_seed = e.subject_id == seed_id
            ref = tasks.subject_task.options(**opts).remote(
                e.path, str(out_dir), m, task_cfg, seed_ref_holder["ref"] if m == "adapted" else None,
                subject_id=e.subject_id, is_seed=is_seed,
                seed_subject=seed_id if m == "adapted" else None)
            pending[ref] = ("subject", e, m)

        def put_seed_state(d):
            seed_ref_holder["ref"] = ray.put(d)       # ONCE per cohort run
            report.seed_puts += 1

        if seed_todo:
            ref = tasks.seed_task.options(**opts).remote(seed.path, str(out_dir), task_cfg, subject_id=seed_id)
            pending[ref] = ("seed", seed, "scratch")
        elif seed_dict is not None:
            put_seed_state(seed_dict)
            seed_dict = None
        for e, m in todo:
            if m == "scratch" or "ref" in seed_ref_holder:
                submit(e, m)
        waiting_for_seed = [(e, m) for e, m in todo if m == "adapted" and "ref" not in seed_ref_holder]

        counts = {"ok": 0, "failed": 0}
        bar = tqdm(total=n_tasks, desc="cohort", unit="recon", disable=not progress)

        def refresh():
            bar.set_postfix(ok=counts["ok"], failed=counts["failed"], in_flight=len(pending), refresh=False)  # submitted, not yet finished (queued or running)
            bar.refresh()

        refresh()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            kind, e, m = pending.pop(ref)
            try:
                value = ray.get(ref)
                row, state = value if kind == "seed" else (value, None)
            except ray.exceptions.RayError as exc:   # task raised, or its worker/node died past max_retries
                row, state = failed_row(e.subject_id, m, _task_error(exc), path=e.path, is_seed=kind == "seed",
                                        config_hash=config_hash,
                                        seed_subject=seed_id if m == "adapted" else None), None
            report.n_reconstructed += 1
            if kind == "seed":
                if state is not None:
                    put_seed_state(state)
                    del state
                    for e2, m2 in waiting_for_seed:
                        submit(e2, m2)
                else:
                    for e2, m2 in waiting_for_seed:
                        rows[(e2.subject_id, m2)] = failed_row(
                            e2.subject_id, m2, f"seed {seed_id} failed: {row['error']}", path=e2.path,
                            config_hash=config_hash, seed_subject=seed_id)
                        counts["failed"] += 1
                        bar.update(1)
                waiting_for_seed = []
            history = row.pop("history", None)
            if row["status"] == "ok":
                row["mlflow_run_id"] = tracker.log_child(row, history or [], lora_rank=config.adapt.lora_rank)
                counts["ok"] += 1
            else:
                log(f"failed: {e.subject_id}/{m}: {row['error'].splitlines()[0] if row['error'] else ''}")
                row["mlflow_run_id"] = tracker.log_child(row, [])
                counts["failed"] += 1
            rows[(e.subject_id, m)] = row
            write_results(out_dir, list(rows.values()))
            bar.update(1)
            refresh()
        bar.close()

        all_rows = list(rows.values())
        report.rows = rows_frame(all_rows).to_dict("records") if all_rows else []
        report.results_path = write_results(out_dir, all_rows) if all_rows else report.results_path
        summary_png = plots.summary_plot(out_dir / SUMMARY_PNG, all_rows, f"cohort {out_dir.name} ({mode})")
        report.wall_s = time.time() - t_start
        report.summary = summarize(all_rows)
        report.summary_text = format_summary(report.summary, len(entries), report.wall_s)
        n_ok = sum(r["status"] == "ok" for r in all_rows if not r.get("resumed"))
        tracker.finish_parent(
            metrics={"cohort_wall_s": report.wall_s,
                     "subjects_per_hour": (len({r["subject_id"] for r in all_rows if r["status"] == "ok"
                                                and not r.get("resumed")}) / (report.wall_s / 3600.0))
                     if report.wall_s > 0 else 0.0,
                     "n_ok": float(sum(r["status"] == "ok" for r in all_rows)),
                     "n_failed": float(sum(r["status"] == "failed" for r in all_rows)),
                     "n_resumed": float(n_resumed), "n_reconstructed": float(report.n_reconstructed),
                     "reconstructions_ok": float(n_ok),
                     "speedup": report.summary["speedup"]},   # NaN (not logged) without both modes
            artifacts=[report.results_path, summary_png],
            status="FINISHED")
        report.parent_run_id = tracker.parent_run_id
        log(report.summary_text)
        log(f"results: {report.results_path}" + (f"; MLflow run {tracker.parent_run_id} at {uri}" if tracker.parent_run_id else ""))
        return report
    except BaseException:
        if tracker is not None:
            tracker.finish_parent(metrics={}, artifacts=[], status="FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
