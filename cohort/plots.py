"""Figures of a cohort run (matplotlib, Agg backend, written atomically).

- :func:`montage` -- the four maps (middle slice) beside the reference when there is one.
- :func:`loss_plot` -- loss curves over the global iteration index, stage boundary marked.
- :func:`summary_plot` -- runtime per subject and mode (grouped bars).

Kept here so that ``cohort/`` does not depend on a plotting module of ``refine_more`` that may not
exist yet; ``refine_more/plots.py`` may take these over later (same signatures).
"""
from __future__ import annotations

import math

import numpy as np

MAP_NAMES = ("I0", "T1F", "f", "kF")
UNITS = {"I0": "a.u.", "T1F": "s", "f": "", "kF": "1/s"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    from refine_more.maps_io import atomic_write
    plt = _plt()
    try:
        atomic_write(str(path), lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return str(path)


def _robust_range(*arrays, mask=None):
    vals = []
    for a in arrays:
        a = np.asarray(a, dtype=np.float64)
        sel = a[mask] if mask is not None and mask.shape == a.shape and mask.any() else a.ravel()
        sel = sel[np.isfinite(sel)]
        if sel.size:
            vals.append(sel)
    if not vals:
        return 0.0, 1.0
    v = np.concatenate(vals)
    lo, hi = np.percentile(v, [1, 99])
    if not hi > lo:
        hi = lo + 1.0
    return float(min(lo, 0.0)), float(hi)


def montage(path, maps: dict, reference: dict | None = None, tissue_mask=None, title: str = "") -> str:
    """Middle slice of I0, T1F, f, kF (row 1) and the reference maps (row 2, when given)."""
    plt = _plt()
    reference = {k: v for k, v in (reference or {}).items() if k in MAP_NAMES}
    rows = 2 if reference else 1
    fig, axes = plt.subplots(rows, len(MAP_NAMES), figsize=(3.0 * len(MAP_NAMES), 2.8 * rows), squeeze=False)
    z = None
    for j, name in enumerate(MAP_NAMES):
        est = np.asarray(maps[name])
        z = est.shape[0] // 2
        m = None if tissue_mask is None else np.asarray(tissue_mask, bool)
        ref = reference.get(name)
        lo, hi = _robust_range(est, *([ref] if ref is not None else []), mask=m)
        for i, (label, arr) in enumerate((("estimate", est), ("reference", ref))[:rows]):
            ax = axes[i][j]
            ax.axis("off")
            if arr is None:
                continue
            im = ax.imshow(np.asarray(arr)[z], cmap="gray" if name == "I0" else "viridis", vmin=lo, vmax=hi)
            ax.set_title(f"{name} ({UNITS[name]}) {label}" if UNITS[name] else f"{name} {label}", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(f"{title} (slice {z})", fontsize=10)
    return _save(fig, path)


def loss_plot(path, history: list, title: str = "") -> str:
    """Loss terms against the global iteration index (stage 2 continues after stage 1)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = global_steps(history)
    for key in ("loss", "loss1", "loss2", "loss3"):
        pts = [(s, h[key]) for s, h in zip(steps, history) if key in h and h[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, lw=1.5 if key == "loss" else 1.0)
    s2 = [s for s, h in zip(steps, history) if h.get("stage") == 2]
    if s2:
        ax.axvline(min(s2), color="k", ls=":", lw=0.8)
    if any(h.get("loss", 1) > 0 for h in history):
        ax.set_yscale("log")
    ax.set_xlabel("iteration (stage 1, then stage 2)")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def global_steps(history: list) -> list:
    """Global iteration index of each history entry: stage-2 iterations follow the last of stage 1."""
    n1 = max((int(h["iteration"]) + 1 for h in history if h.get("stage") == 1), default=0)
    return [int(h["iteration"]) + (n1 if h.get("stage") == 2 else 0) for h in history]


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
