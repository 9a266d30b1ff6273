"""The subject report's figures: map and residual panels (each a small PNG through a colormap, laid
out and labelled by the page, which is ~50× faster than a matplotlib grid of axes and colour
bars), the residual bars and the loss curves per stage (inline SVG, svg.py).

Windows: one per map, shared by every row of that map (reconstruction, zero-filled fit,
reference), from the 1st to the 99th percentile in tissue of the reference when there is one,
else of the reconstruction; differences are shown on ±25 % of that window's width.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from refine_more.evaluation.plots import DISPLAY
from refine_more.files.names import MAP_NAMES

from . import svg

DIFF_FRACTION = 0.25
DIFF_CMAP = "RdBu_r"
STAGE_NAMES = {1: "stage 1 (INR: loss 1 + loss 2)", 2: "stage 2 (refinement: loss 3)"}
LOSS_KEYS = ("loss1", "loss2", "loss3", "loss")
LOSS_COLORS = {"loss1": "#1f77b4", "loss2": "#ff7f0e", "loss3": "#2ca02c", "loss": "#222222"}


def windows(maps: dict, reference: dict, tissue) -> dict:
    """{map: (low, high)} (see the module docstring)."""
    out = {}
    for name in MAP_NAMES:
        src = reference.get(name) if reference.get(name) is not None else maps.get(name)
        if src is None:
            continue
        vals = np.asarray(src, np.float64)[np.asarray(tissue, bool)] if tissue is not None else np.ravel(src)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            out[name] = (0.0, 1.0)
            continue
        lo, hi = (float(v) for v in np.percentile(vals, [1, 99]))
        out[name] = (lo, hi if hi > lo else lo + (abs(lo) or 1.0))
    return out


def _unit(name: str) -> str:
    unit = DISPLAY.get(name, ("gray", None, ""))[2]
    return f"{name} ({unit})" if unit else name


def panel_uri(img, cmap: str, vmin: float, vmax: float, outside=None) -> str:
    """One 2-D image through a colormap as a PNG data URI, row 0 at the bottom, transparent
    outside tissue (no axes: the page lays the panels out and scales them, pixels kept sharp)."""
    import matplotlib
    from matplotlib.image import imsave

    a = np.asarray(img, dtype=np.float64)
    span = (vmax - vmin) or 1.0
    norm = np.clip((np.nan_to_num(a, nan=vmin) - vmin) / span, 0.0, 1.0)
    rgba = matplotlib.colormaps[cmap](norm, bytes=True)
    if outside is not None and np.shape(outside) == a.shape:
        rgba[np.asarray(outside, bool), 3] = 0
    buf = io.BytesIO()
    imsave(buf, rgba, origin="lower", format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colorbar_uri(cmap: str) -> str:
    """A horizontal colour bar (the colormap from low to high) as a PNG data URI."""
    return panel_uri(np.tile(np.linspace(0.0, 1.0, 128), (6, 1)), cmap, 0.0, 1.0)


def maps_grid(rows: list, wins: dict, tissue=None) -> dict:
    """``rows``: (label, {map: 2-D slice}, kind) with kind 'map' or 'diff'; returns the panels as
    data URIs, one column per map, and each column's colour bars and their ranges."""
    names = [n for n in MAP_NAMES if n in wins]
    outside = None if tissue is None else ~np.asarray(tissue, bool)
    columns = []
    for name in names:
        lo, hi = wins[name]
        half = DIFF_FRACTION * (hi - lo)
        cmap = DISPLAY.get(name, ("gray",))[0]
        columns.append({"name": name, "label": _unit(name), "cmap": cmap, "lo": lo, "hi": hi,
                        "bar": colorbar_uri(cmap), "half": half})
    out_rows = []
    for label, src, kind in rows:
        cells = []
        for col in columns:
            img = src.get(col["name"])
            if img is None:
                cells.append(None)
            elif kind == "diff":
                cells.append(panel_uri(img, DIFF_CMAP, -col["half"], col["half"], outside))
            else:
                cells.append(panel_uri(img, col["cmap"], col["lo"], col["hi"], outside))
        out_rows.append({"label": label, "kind": kind, "cells": cells})
    return {"columns": columns, "rows": out_rows, "diff_bar": colorbar_uri(DIFF_CMAP),
            "has_diff": any(r["kind"] == "diff" for r in out_rows)}


def residual_bars_svg(rel_maps: list, rel_inr: list, labels: list):
    """Relative k-space residual per image: the final maps' model images and the INR's images."""
    series = [{"kind": "bars", "label": "maps (model images)", "color": "#1f77b4", "offset": -0.2, "width": 0.4,
               "points": [{"x": i, "y": v, "tip": f"{labels[i]}: maps {v:.4g}"} for i, v in enumerate(rel_maps)]}]
    if rel_inr:
        series.append({"kind": "bars", "label": "INR images W⁽⁰⁾", "color": "#bbbbbb", "offset": 0.2, "width": 0.4,
                       "points": [{"x": i, "y": v, "tip": f"{labels[i]}: INR {v:.4g}"} for i, v in enumerate(rel_inr)]})
    return svg.chart(series, title="relative k-space residual per image", ylabel="‖A x − d‖ / ‖d‖",
                     categories=[lab.split(":")[0] for lab in labels], width=max(360, 52 * len(labels) + 80))


def residual_panels(residual: np.ndarray, labels: list) -> dict:
    """|Aᴴ(A x − d)| of each image on the central slice, one shared window from 0."""
    hi = float(np.percentile(residual, 99.5)) or 1.0
    return {"panels": [{"label": lab, "uri": panel_uri(img, "magma", 0.0, hi)} for img, lab in zip(residual, labels)],
            "hi": hi, "bar": colorbar_uri("magma")}


def loss_svgs(history: list) -> list:
    """One chart per stage: the loss terms against the stage's own iteration (log scale)."""
    out = []
    for stage in sorted({int(h.get("stage", 1)) for h in history}):
        hs = [h for h in history if int(h.get("stage", 1)) == stage]
        series = [{"kind": "line", "label": key, "lw": 2.0 if key == "loss" else 1.3, "color": LOSS_COLORS[key],
                   "points": [(h["iteration"], h[key]) for h in hs if key in h]} for key in LOSS_KEYS
                  if any(key in h for h in hs)]
        out.append(svg.chart(series, title=STAGE_NAMES.get(stage, f"stage {stage}"), xlabel="iteration",
                             ylabel="loss", ylog=True, width=460, height=270))
    return out
