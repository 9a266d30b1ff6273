"""The cohort report, ``DIR/report.html``, and the subject reports beside it
(``DIR/<subject>/<mode>/report.html``, refine_more/evaluation/report/subject.py), from a cohort's
outputs alone: ``results.parquet`` (or the rows in memory), ``summary.json`` and each subject
folder's files.

The page: the run's numbers and QC totals; a table of subjects (one row each, a column group per
mode: status, QC, time, nRMSE/SSIM when references exist; adapted against scratch) that sorts and
filters and links to each subject report; MRIQC-style strip plots of ROI means (WM, GM), QC
metrics and times; adapted against scratch; Bland–Altman plots when references exist (charts:
cohort/report_plots.py). Writing a report never fails a run: :func:`write_reports` logs and goes on.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from refine_more.evaluation.report.data import REPORT_FILE, missing, qc_view, read_diagnostics, read_json
from refine_more.evaluation.report.html import render, write_html
from refine_more.files.names import SCORED_MAPS

from . import report_plots as plots
from .report_plots import _num
from .results import DONE, MODES, RESULTS_FILE, SUMMARY_FILE, SUMMARY_PNG, subject_dir

TEMPLATES = Path(__file__).resolve().parent / "templates"
LINKED_FILES = (RESULTS_FILE, SUMMARY_FILE, SUMMARY_PNG, "config.json", "tracking.json")


def read_rows(out_dir) -> list:
    """The rows of ``DIR/results.parquet`` as dicts ([] when absent)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.is_file():
        return []
    import pandas as pd
    return pd.read_parquet(path).to_dict("records")


def _link(out_dir: Path, sid: str, mode: str) -> Optional[str]:
    return f"{sid}/{mode}/{REPORT_FILE}" if (subject_dir(out_dir, sid, mode) / REPORT_FILE).is_file() else None


def entries(out_dir, rows: list, thresholds: Optional[dict] = None) -> list:
    """One per ok subject and mode: id, mode, row, QC view (``thresholds``, the cohort's, where the
    row has none), diagnostics, link to its report."""
    out_dir = Path(out_dir)
    out = []
    for r in rows:
        if r.get("status") != "ok":
            continue
        qc = qc_view(r)
        qc["thresholds"] = qc["thresholds"] or dict(thresholds or {})
        out.append({"sid": r["subject_id"], "mode": r["mode"], "row": r, "qc": qc,
                    "diag": read_diagnostics(subject_dir(out_dir, r["subject_id"], r["mode"]))[0],
                    "link": _link(out_dir, r["subject_id"], r["mode"])})
    return out


def _cell(out_dir: Path, r: dict) -> dict:
    ssim = [_num(r.get(f"ssim_{p}")) for p in SCORED_MAPS]
    ssim = [v for v in ssim if v is not None]
    error = "" if missing(r.get("error")) else str(r["error"]).strip().splitlines()[0][:300]
    qc, status = qc_view(r), r.get("status") or "–"
    order = ("0" if qc["flagged"] else "1" if status != "ok" else "2") + status
    return {"status": status, "error": error, "qc": qc, "order": order, "total_s": _num(r.get("total_s")),
            "nrmse": {p: _num(r.get(f"nrmse_{p}")) for p in SCORED_MAPS},
            "ssim": sum(ssim) / len(ssim) if ssim else None, "link": _link(out_dir, r["subject_id"], r["mode"]),
            "is_seed": bool(r.get("is_seed"))}


def _ratios(cells: dict) -> tuple:
    sc, ad = cells.get("scratch"), cells.get("adapted")
    if not (sc and ad and sc["status"] == ad["status"] == "ok"):
        return None, None
    t = sc["total_s"] / ad["total_s"] if sc["total_s"] and ad["total_s"] else None
    q = [ad["nrmse"][p] / sc["nrmse"][p] for p in SCORED_MAPS if ad["nrmse"][p] and sc["nrmse"][p]]
    return t, (sum(q) / len(q) if q else None)


def subject_table(out_dir, rows: list, modes: list) -> list:
    """One entry per subject (sorted by id): its cells per mode, QC state, ratios."""
    out_dir = Path(out_dir)
    table = []
    for sid in sorted({r["subject_id"] for r in rows}):
        cells = {r["mode"]: _cell(out_dir, r) for r in rows if r["subject_id"] == sid}
        present = [c for c in cells.values()]
        flagged = any(c["qc"]["flagged"] for c in present)
        computed = any(c["qc"]["computed"] for c in present)
        failed = any(c["status"] != "ok" for c in present)
        t, q = _ratios(cells)
        table.append({"sid": sid, "cells": {m: cells.get(m) for m in modes}, "flagged": flagged, "failed": failed,
                      "qc_state": "flagged" if flagged else ("ok" if computed else "none"),
                      "status": "failed" if failed else "ok", "is_seed": any(c["is_seed"] for c in present),
                      "time_ratio": t, "nrmse_ratio": q,
                      "reasons": sorted({x for c in present for x in c["qc"]["reasons"]})})
    return table


def _header(rows: list, summary: dict, modes: list) -> dict:
    flagged = sum(qc_view(r)["flagged"] for r in rows)
    computed = sum(qc_view(r)["computed"] for r in rows)
    return {"n_subjects": len({r["subject_id"] for r in rows}), "modes": modes,
            "per_mode": {m: (summary.get("modes") or {}).get(m, {}) for m in modes},
            "speedup": _num(summary.get("speedup")), "nrmse_ratio": summary.get("nrmse_ratio") or {},
            "wall_s": _num(summary.get("wall_s")), "seed": summary.get("seed_subject"),
            "seed_failures": summary.get("seed_failures") or [],
            "qc": {"computed": computed, "flagged": flagged, "of": len(rows),
                   "thresholds": qc_view(summary)["thresholds"]}}


def cohort_context(out_dir, rows: list, summary: dict) -> dict:
    out_dir = Path(out_dir)
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)] or list(MODES)
    ents = entries(out_dir, rows, qc_view(summary)["thresholds"])
    has_scores = any(_num(r.get(f"nrmse_{p}")) is not None for r in rows for p in SCORED_MAPS)
    failures = [{"sid": r["subject_id"], "mode": r["mode"], "error": _cell(out_dir, r)["error"]}
                for r in rows if r.get("status") != "ok"]
    return {
        "title": f"cohort {out_dir.name}", "header": _header(rows, summary, modes), "modes": modes,
        "subjects": subject_table(out_dir, rows, modes), "has_scores": has_scores, "scored": SCORED_MAPS,
        "both": set(modes) == set(MODES), "failures": failures,
        "roi": plots.roi_strips(ents, modes), "qc_charts": plots.qc_strips(ents, modes),
        "time_charts": plots.time_strips(ents, modes), "ratio_charts": plots.ratio_strips(ents),
        "ba_charts": plots.bland_altman_charts(ents, modes) if has_scores else [],
        "files": [f for f in LINKED_FILES if (out_dir / f).is_file()],
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_cohort_report(out_dir, rows: Optional[list] = None, summary: Optional[dict] = None) -> str:
    """``DIR/report.html`` (atomically) from ``rows`` (default: results.parquet) and ``summary``
    (default: summary.json); returns its path. Raises on failure."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir) if rows is None else rows
    summary = (read_json(out_dir / SUMMARY_FILE) or {}) if summary is None else summary
    return write_html(out_dir / REPORT_FILE, render("cohort.html.j2", cohort_context(out_dir, rows, summary), TEMPLATES))


def _qc_changed(row: dict, folder: Path) -> bool:
    """The final row's QC differs from what the subject's own record (done.json) says."""
    done = read_json(folder / DONE) or {}
    a, b = qc_view(row), qc_view(done)
    return (a["status"], a["reasons"]) != (b["status"], b["reasons"])


def refresh_subject_reports(out_dir, rows: list, *, rebuild: bool = False, log=print) -> list:
    """Write the subject reports that are missing or whose QC changed after the subject finished
    (every one with ``rebuild``); scratch first, so an adapted report finds its seed's. Returns
    the paths written."""
    from refine_more.evaluation.report.subject import try_write_subject_report

    out_dir = Path(out_dir)
    written = []
    for r in sorted(rows, key=lambda r: (r.get("mode") != "scratch", r["subject_id"])):
        folder = subject_dir(out_dir, r["subject_id"], r["mode"])
        if r.get("status") != "ok" or not (folder / "maps.h5").is_file():
            continue
        if rebuild or not (folder / REPORT_FILE).is_file() or _qc_changed(r, folder):
            path = try_write_subject_report(folder, r, log=log)
            if path:
                written.append(path)
    return written


def write_reports(out_dir, rows: Optional[list] = None, summary: Optional[dict] = None, *,
                  rebuild_subjects: bool = False, log=print) -> dict:
    """Subject reports (:func:`refresh_subject_reports`), then the cohort report. Never raises:
    returns ``{"path": cohort report or None, "seconds", "subject_reports": n written}``."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    path, written = None, []
    try:
        rows = read_rows(out_dir) if rows is None else rows
        written = refresh_subject_reports(out_dir, rows, rebuild=rebuild_subjects, log=log)
        path = write_cohort_report(out_dir, rows, summary)
    except Exception as exc:       # a report never fails a run
        log(f"warning: cohort report not written: {type(exc).__name__}: {exc}")
    return {"path": path, "seconds": time.perf_counter() - t0, "subject_reports": len(written)}


# -- `refine-more report DIR` ------------------------------------------------------------------
def _report_command(args) -> int:
    """Rebuild the reports of a cohort folder (every subject report, then the cohort's) or of one
    result folder (``recon --out``, or a cohort's ``<subject>/<mode>``) from its files alone."""
    from refine_more.evaluation.report.subject import try_write_subject_report

    out = Path(args.dir)
    if (out / RESULTS_FILE).is_file():
        done = write_reports(out, rebuild_subjects=True)
        print(f"{done['subject_reports']} subject reports; cohort report: {done['path']} ({done['seconds']:.1f} s)")
        return 0 if done["path"] else 1
    if (out / "maps.h5").is_file():
        path = try_write_subject_report(out)
        print(f"report: {path}" if path else f"{out}: report not written")
        return 0 if path else 1
    print(f"error: {out}: neither a cohort folder ({RESULTS_FILE}) nor a result folder (maps.h5)", file=sys.stderr)
    return 2


def add_commands(sub) -> None:
    """``report DIR``."""
    r = sub.add_parser("report", help="rebuild the HTML reports of a cohort or result folder from its files",
                       description="Rebuild DIR/report.html and every DIR/<subject>/<mode>/report.html of a "
                                   "cohort folder, or the report.html of one result folder (refine-more recon --out).")
    r.add_argument("dir", metavar="DIR", help="a cohort output folder or a result folder")
    r.set_defaults(func=_report_command)
