"""Figures of a cohort run (matplotlib, Agg backend, written atomically).

- :func:`montage` -- the four maps (middle slice) beside the reference when there is one.
- :func:`loss_plot` -- loss curves over the global iteration index, stage boundary marked.
- :func:`summary_plot` -- runtime per subject and mode (grouped bars).

Map and loss pictures live in :mod:`refine_more.evaluation.plots`; this module adds the cohort chart.
"""
from __future__ import annotations

import math

from refine_more.evaluation.plots import global_steps, loss_png, montage_png  # noqa: F401 (re-exported)



def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    from refine_more.files.maps_io import atomic_write
    plt = _plt()
    try:
        atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return str(path)


def montage(path, maps: dict, reference: dict | None = None, tissue_mask=None, title: str = "") -> str:
    """The four maps beside the reference (and their difference) when there is one."""
    return montage_png(path, maps, reference, title=title)


def loss_plot(path, history: list, title: str = "") -> str:
    """Loss curves (and nRMSE when tracked) against the global iteration index."""
    return loss_png(path, history, title=title)


def summary_plot(path, rows: list, title: str = "") -> str:
    """Grouped bars of total runtime per subject, one bar per mode (ok rows only)."""
    plt = _plt()
    ok = [r for r in rows if r.get("status") == "ok" and r.get("total_s") is not None
          and not (isinstance(r.get("total_s"), float) and math.isnan(r["total_s"]))]
    subjects = sorted({r["subject_id"] for r in rows})
    modes = [m for m in ("scratch", "adapted") if any(r["mode"] == m for r in ok)]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(subjects) + 2), 3.5))
    width = 0.8 / max(1, len(modes))
    for k, mode in enumerate(modes):
        t = {r["subject_id"]: r["total_s"] for r in ok if r["mode"] == mode}
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(len(subjects))]
        ax.bar(xs, [t.get(s, 0.0) for s in subjects], width, label=mode)
    failed = {r["subject_id"] for r in rows if r.get("status") == "failed"}
    ax.set_xticks(range(len(subjects)))
    ax.set_xticklabels([s + (" (failed)" if s in failed else "") for s in subjects], rotation=45,
                       ha="right", fontsize=8)
    ax.set_ylabel("reconstruction time (s)")
    if modes:
        ax.legend(fontsize=8)
    ax.set_title(title or "runtime per subject and mode", fontsize=9)
    return _save(fig, path)
