"""The results of a cohort run: file names, one row per (subject, mode), the results table, the
cohort summary and ``done.json`` (what a rerun resumes from).

Outputs per subject and mode, under ``DIR/<subject_id>/<mode>/``: ``maps.h5`` and the NIfTI maps,
``config.json`` (the resolved config), ``montage.png``, ``history.json``, ``history.csv``,
``loss.png``, ``diagnostics.json``/``.safetensors`` and ``report.html`` (cohort/report.py),
``qc.json`` (the quality control: status, reasons, metrics, thresholds; docs/decisions/017), the
seed's ``seed_state.safetensors`` (only when it passed QC), and ``done.json`` written LAST. Per
cohort: ``DIR/results.parquet`` (rewritten after every finished subject), ``DIR/summary.json``,
``DIR/summary.png``, ``DIR/config.json`` and ``DIR/report.html``. Every file is written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from refine_more.config.qc import FLAGGED, SCALAR_METRICS, judge
from refine_more.files.atomic import atomic_write, atomic_write_text, json_default
from refine_more.files.names import MAP_NAMES

MODES = ("scratch", "adapted")
DONE = "done.json"
CONFIG_FILE = "config.json"
SEED_STATE_FILE = "seed_state.safetensors"
QC_FILE = "qc.json"
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.json"
SUMMARY_PNG = "summary.png"

#: the QC metrics of a results row (refine_more.config.qc.SCALAR_METRICS, prefixed)
QC_METRIC_COLUMNS = [f"qc_{m}" for m in SCALAR_METRICS]
# leading columns of results.parquet (others follow in a stable order). qc_status ("ok" | "flagged")
# and qc_reasons ("; " between them) judge status-ok rows only; failed rows have None there
COLUMNS = [
    "subject_id", "mode", "status", "qc_status", "qc_reasons", "error", "resumed", "is_seed", "seed_subject",
    "method", "warm_start_from", "prior_scale", "node", "node_id",
    "device", "setup_s", "stage1_s", "stage2_s", "total_s", "qc_s", "wall_s", "peak_rss_GiB", "iterations_stage1",
    "iterations_stage2", "trainable_stage1", "trainable_stage2",
    "loss_final", "loss1_final", "loss2_final", "loss3_final",
    *[f"{m}_{p}" for p in MAP_NAMES for m in ("nrmse", "ssim")], *QC_METRIC_COLUMNS,
    "mlflow_run_id", "tracking", "config_hash", "subject_path", "input_sha256", "out_dir", "maps_path", "montage_path",
    "loss_png_path", "history_path", "qc_path", "started_at", "finished_at",
]


def subject_dir(out_dir, subject_id: str, mode: str) -> Path:
    return Path(out_dir) / subject_id / mode


def clean(v):
    """JSON/Parquet-friendly scalar (NaN stays NaN for floats)."""
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def write_json(path, obj) -> str:
    return atomic_write_text(path, json.dumps(obj, indent=1, default=json_default))


def history_csv(history: list) -> str:
    keys = []
    for h in history:
        keys += [k for k in h if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for h in history:
        w.writerow(h)
    return buf.getvalue()


def qc_columns(report: dict) -> dict:
    """The QC columns of a results row from a QualityReport's dict (``status``, ``reasons``, ``metrics``)."""
    return {"qc_status": report["status"], "qc_reasons": "; ".join(report["reasons"]),
            **{f"qc_{m}": report["metrics"].get(m) for m in SCALAR_METRICS}}


def rejudge(row: dict, thresholds) -> dict:
    """A status-ok ``row`` with its QC status and reasons judged again, from its stored metrics,
    against ``thresholds`` (a QCConfig): a resumed result meets the thresholds of this run."""
    if row.get("status") != "ok":
        return row
    metrics = {m: row.get(f"qc_{m}") for m in SCALAR_METRICS}
    missing = lambda m: metrics.get(m) is None or metrics[m] != metrics[m]   # noqa: E731 (None, or NaN in a frame)
    if missing("fraction_f_at_one"):    # a row from before session 15: f near 0 or 1, an upper bound
        metrics["fraction_f_at_one"] = row.get("qc_fraction_f_at_bounds")
    if missing("fraction_f_unphysical"):   # before session 15: measured on the stored maps
        metrics["fraction_f_unphysical"] = _f_unphysical(row.get("maps_path"), thresholds.f_max)
    status, reasons = judge(metrics, thresholds)
    return {**row, "qc_status": status, "qc_reasons": "; ".join(reasons),
            **{f"qc_{m}": metrics[m] for m in ("fraction_f_at_one", "fraction_f_unphysical")}}


def _f_unphysical(maps_path, f_max: float) -> Optional[float]:
    """The fraction of tissue voxels with f above ``f_max`` in a result's maps.h5; None without one."""
    import h5py

    try:
        with h5py.File(maps_path, "r") as fh:
            f, tissue = fh["f"][()], fh["tissue_mask"][()].astype(bool)
    except (OSError, KeyError, TypeError):
        return None
    return float((f[tissue] > f_max).mean()) if tissue.any() else 0.0


def flagged(row: dict) -> bool:
    """A reconstruction that finished (status ok) but that its QC flagged."""
    return row.get("status") == "ok" and row.get("qc_status") == FLAGGED


def read_done(out_dir, subject_id: str, mode: str) -> Optional[dict]:
    """The row stored in ``done.json`` (None when absent or unreadable)."""
    p = subject_dir(out_dir, subject_id, mode) / DONE
    try:
        with open(p) as fh:
            d = json.load(fh)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def failed_row(subject_id: str, mode: str, error: str, *, path=None, is_seed=False, config_hash=None,
               seed_subject=None, node=None) -> dict:
    return {"subject_id": subject_id, "mode": mode, "status": "failed", "error": error, "resumed": False,
            "is_seed": bool(is_seed), "seed_subject": seed_subject, "node": node, "config_hash": config_hash,
            "subject_path": None if path is None else str(path)}


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
           or c.endswith("_final") or c in ("started_at", "finished_at", "peak_rss_GiB", *QC_METRIC_COLUMNS))]
    for c in num:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in ("error", "mlflow_run_id", "tracking", "node", "node_id", "input_sha256", "device", "method", "seed_subject",
              "config_hash", "qc_status", "qc_reasons"):
        df[c] = df[c].astype(object).where(df[c].notna(), None)
    order = {m: i for i, m in enumerate(MODES)}
    df["_o"] = df["mode"].map(order)
    return df.sort_values(["subject_id", "_o"]).drop(columns="_o").reset_index(drop=True)


def write_results(out_dir, rows: list) -> str:
    df = rows_frame(rows)
    return atomic_write(str(Path(out_dir) / RESULTS_FILE), lambda tmp: df.to_parquet(tmp, index=False))


def _mean(vals):
    vals = [float(v) for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 and not math.isnan(num) else float("nan")


def summarize(rows: list) -> dict:
    """Per mode: counts (``flagged``: the ok rows that QC flagged, named with their reasons in
    ``flagged_subjects``), mean total_s, mean nRMSE/SSIM per map (ok rows, flagged ones included).
    With both modes: ``speedup`` (mean scratch total time / mean adapted total time) and
    ``nrmse_ratio`` (per map, adapted cohort-mean nRMSE / scratch cohort-mean nRMSE); NaN without
    both modes."""
    out = {"modes": {}}
    for mode in MODES:
        ok = [r for r in rows if r["mode"] == mode and r["status"] == "ok"]
        if not ok and not any(r["mode"] == mode for r in rows):
            continue
        s = {"ok": len(ok), "failed": sum(r["mode"] == mode and r["status"] == "failed" for r in rows),
             "flagged": sum(flagged(r) for r in ok),
             "flagged_subjects": [{"subject_id": r["subject_id"], "reasons": r.get("qc_reasons") or ""}
                                  for r in sorted(ok, key=lambda r: r["subject_id"]) if flagged(r)],
             "mean_total_s": _mean(r.get("total_s") for r in ok)}
        for p in MAP_NAMES:
            s[f"mean_nrmse_{p}"] = _mean(r.get(f"nrmse_{p}") for r in ok)
            s[f"mean_ssim_{p}"] = _mean(r.get(f"ssim_{p}") for r in ok)
        out["modes"][mode] = s
    sc, ad = out["modes"].get("scratch"), out["modes"].get("adapted")
    out["speedup"] = _ratio(sc["mean_total_s"], ad["mean_total_s"]) if sc and ad else float("nan")
    out["nrmse_ratio"] = {p: _ratio(ad[f"mean_nrmse_{p}"], sc[f"mean_nrmse_{p}"]) if sc and ad else float("nan")
                          for p in MAP_NAMES}
    return out


def format_summary(summary: dict, n_subjects: int, wall_s: float) -> str:
    lines = [f"cohort: {n_subjects} subjects in {wall_s:.1f} s"]
    for mode, s in summary["modes"].items():
        nr = "  ".join(f"{p} {s[f'mean_nrmse_{p}']:.1f}%" for p in MAP_NAMES if not math.isnan(s[f"mean_nrmse_{p}"]))
        lines.append(f"  {mode:8s} ok {s['ok']:3d} (QC flagged {s.get('flagged', 0)})  failed {s['failed']:3d}  "
                     f"mean total {s['mean_total_s']:.2f} s" + (f"  mean nRMSE {nr}" if nr else ""))
    if not math.isnan(summary["speedup"]):
        lines.append(f"  speedup (mean scratch / mean adapted total time): {summary['speedup']:.2f}x")
    ratios = "  ".join(f"{p} {r:.3f}" for p, r in summary.get("nrmse_ratio", {}).items() if not math.isnan(r))
    if ratios:
        lines.append(f"  mean nRMSE adapted / scratch: {ratios}")
    named = [(mode, f) for mode, s in summary["modes"].items() for f in s.get("flagged_subjects", [])]
    if named:
        lines.append("  flagged by QC (finished, but check before use; docs/decisions/017):")
        lines += [f"    {f['subject_id']}/{mode}: {f['reasons']}" for mode, f in named]
    return "\n".join(lines)


def summary_metrics(summary: dict) -> dict:
    """The summary's cohort-level numbers as flat MLflow metrics (NaN ones are not logged)."""
    return {"speedup": summary["speedup"],
            **{f"nrmse_ratio_{p}": r for p, r in summary.get("nrmse_ratio", {}).items()},
            **{f"n_flagged_{mode}": float(s.get("flagged", 0)) for mode, s in summary["modes"].items()}}


@dataclass
class CohortReport:
    rows: list
    results_path: str
    summary: dict
    summary_text: str
    wall_s: float
    seed_subject: Optional[str] = None     # the seed the adapted rows used (after any fallback)
    seed_failures: list = field(default_factory=list)   # {"seed", "error"} of seeds not published (failed or
    #                                                    QC-flagged: "flagged by QC: ..."), in order
    seed_puts: int = 0                 # ray.put calls of the seed state (1 when any adaptation ran)
    n_reconstructed: int = 0           # reconstructions that ran (ok or failed) in this run
    n_resumed: int = 0
    warmed_workers: int = 0            # idle workers warmed up while the seed ran (Scheduler.warm_up)
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    resources: dict = field(default_factory=dict)

    @property
    def n_failed(self) -> int:
        return sum(r["status"] == "failed" for r in self.rows)

    @property
    def n_flagged(self) -> int:
        """Finished reconstructions that QC flagged."""
        return sum(flagged(r) for r in self.rows)
