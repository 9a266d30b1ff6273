"""The cohort report's charts, MRIQC-style: one dot per subject (jittered within its column),
coloured by mode, a flagged subject ringed in red, each dot a link to the subject's report with
its id and value as tooltip (inline SVG, refine_more/evaluation/report/svg.py).

Each function takes the report's entries (:func:`cohort.report.entries`: one per ok subject and
mode, with its row, QC view, diagnostics and report link) and returns a list of charts.
"""
from __future__ import annotations

import math

from refine_more.evaluation.cohort_tables import bland_altman
from refine_more.evaluation.plots import DISPLAY
from refine_more.evaluation.report.svg import chart
from refine_more.files.names import MAP_NAMES, SCORED_MAPS

MODE_COLORS = {"scratch": "#1f77b4", "adapted": "#ff7f0e", "reference": "#9e9e9e"}
TIMES = (("total_s", "total"), ("stage1_s", "stage 1"), ("stage2_s", "stage 2"), ("setup_s", "set-up"))


def _num(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _jitter(i: int) -> float:
    return ((i * 0.618034) % 1.0 - 0.5) * 0.44


def _dot(e: dict, x: float, y: float, what: str) -> dict:
    return {"x": x, "y": y, "href": e["link"], "flagged": e["qc"]["flagged"],
            "tip": f"{e['sid']} {e['mode']}: {what} = {y:.4g}" + (" (QC flagged: " + "; ".join(e["qc"]["reasons"]) + ")"
                                                                  if e["qc"]["flagged"] else "")}


def _strip(columns: list, title: str, ylabel: str = "", hlines=(), width=None):
    """``columns``: (category, colour key, [(entry, value)]) → one strip chart."""
    series = []
    for x, (cat, key, pairs) in enumerate(columns):
        pts = [_dot(e, x + _jitter(i), _num(v), cat) for i, (e, v) in enumerate(pairs) if _num(v) is not None]
        series.append({"kind": "dots", "label": key, "color": MODE_COLORS.get(key), "points": pts})
    return chart(series, title=title, ylabel=ylabel, categories=[c for c, _, _ in columns], hlines=hlines,
                 width=width or max(260, 70 * len(columns) + 90), height=260)


def _unit(name: str) -> str:
    unit = DISPLAY.get(name, ("", None, ""))[2]
    return f"{name} ({unit})" if unit else name


def roi_strips(entries: list, modes: list) -> list:
    """ROI means per map: WM and GM of each mode, and of the reference when there is one."""
    out = []
    for name in MAP_NAMES:
        columns = []
        for tissue in ("WM", "GM"):
            for mode in modes:
                pairs = [(e, ((e["diag"].get("roi_means") or {}).get(tissue) or {}).get(name))
                         for e in entries if e["mode"] == mode]
                columns.append((f"{tissue} {mode}", mode, pairs))
            ref = [(e, ((e["diag"].get("roi_means_reference") or {}).get(tissue) or {}).get(name))
                   for e in entries if e["mode"] == modes[0]]
            if any(_num(v) is not None for _, v in ref):
                columns.append((f"{tissue} reference", "reference", ref))
        if any(_num(v) is not None for _, _, pairs in columns for _, v in pairs):
            out.append(_strip(columns, f"{name}: ROI means", _unit(name)))
    return out


def qc_strips(entries: list, modes: list) -> list:
    """Each numeric QC metric (its threshold as a dashed line), the data residual and the final loss."""
    metrics = sorted({k for e in entries for k in e["qc"]["metrics"]})
    out = []
    for k in metrics:
        thr = [_num(e["qc"]["thresholds"].get(k)) for e in entries if _num(e["qc"]["thresholds"].get(k)) is not None]
        columns = [(m, m, [(e, e["qc"]["metrics"].get(k)) for e in entries if e["mode"] == m]) for m in modes]
        out.append(_strip(columns, f"QC: {k}", k, hlines=[(thr[0], f"threshold {thr[0]:g}")] if thr else ()))
    columns = [(m, m, [(e, _mean((e["diag"].get("residual") or {}).get("maps"))) for e in entries if e["mode"] == m])
               for m in modes]
    out.append(_strip(columns, "data residual (mean over images)", "‖A x − d‖ / ‖d‖"))
    columns = [(m, m, [(e, e["row"].get("loss_final")) for e in entries if e["mode"] == m]) for m in modes]
    out.append(_strip(columns, "final loss", "loss"))
    return out


def _mean(vals):
    vals = [v for v in (vals or []) if _num(v) is not None]
    return sum(vals) / len(vals) if vals else None


def time_strips(entries: list, modes: list) -> list:
    return [_strip([(m, m, [(e, e["row"].get(col)) for e in entries if e["mode"] == m]) for m in modes],
                   f"time: {label}", "seconds") for col, label in TIMES]


def ratio_strips(entries: list) -> list:
    """Adapted against scratch, per subject: scratch / adapted total time, adapted / scratch nRMSE."""
    by = {(e["sid"], e["mode"]): e for e in entries}
    pairs = [(by[(s, "adapted")], by[(s, "scratch")]) for s, m in by if m == "adapted" and (s, "scratch") in by]
    if not pairs:
        return []
    times = [(a, _ratio(s["row"].get("total_s"), a["row"].get("total_s"))) for a, s in pairs]
    out = [_strip([("scratch / adapted", "adapted", times)], "time: scratch / adapted", "ratio",
                  hlines=[(1.0, "equal")], width=260)]
    columns = [(name, "adapted", [(a, _ratio(a["row"].get(f"nrmse_{name}"), s["row"].get(f"nrmse_{name}")))
                                  for a, s in pairs]) for name in SCORED_MAPS]
    if any(v is not None for _, _, ps in columns for _, v in ps):
        out.append(_strip(columns, "quality: adapted / scratch nRMSE", "ratio", hlines=[(1.0, "equal")]))
    return out


def _ratio(num, den):
    num, den = _num(num), _num(den)
    return num / den if num is not None and den else None


def bland_altman_charts(entries: list, modes: list) -> list:
    """Per map and mode: ROI mean difference (estimate − reference) against the mean, with the bias
    and the 95 % limits of agreement (refine_more/evaluation/cohort_tables.py's quadrant ROIs)."""
    out = []
    for name in SCORED_MAPS:
        for mode in modes:
            pts, est_all, ref_all = [], [], []
            for e in (e for e in entries if e["mode"] == mode):
                est, ref = ((e["diag"].get("roi_pairs") or {}).get(name) or [[], []])
                for i, (a, b) in enumerate(zip(est, ref)):
                    est_all.append(a)
                    ref_all.append(b)
                    pts.append(_dot(e, (a + b) / 2, a - b, f"ROI {i + 1} {name} difference"))
            if len(pts) < 2:
                continue
            ba = bland_altman(est_all, ref_all)
            hl = [(ba["bias"], f"bias {ba['bias']:.3g}"), (ba["loa_low"], f"LoA {ba['loa_low']:.3g}"),
                  (ba["loa_high"], f"LoA {ba['loa_high']:.3g}"), (0.0, "zero")]
            out.append(chart([{"kind": "dots", "label": mode, "color": MODE_COLORS.get(mode), "points": pts}],
                             title=f"{mode}: {name} (bias {ba['bias']:.3g}, LoA ±{1.96 * ba['sd']:.2g})",
                             xlabel=f"mean of {_unit(name)} and reference", ylabel="estimate − reference",
                             hlines=hl, width=360, height=260, legend=False))
    return out
