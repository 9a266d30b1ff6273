"""Pictures people look at: map montages, loss curves (PNG, written atomically)."""
from __future__ import annotations

import numpy as np

from refine_more.files.atomic import atomic_path

DISPLAY = {  # name: (colormap, range or None for robust auto, unit)
    "I0": ("gray", None, "a.u."),
    "T1F": ("magma", (0.0, 3.0), "s"),
    "f": ("viridis", (0.0, 0.2), ""),
    "kF": ("cividis", (0.0, 5.0), "1/s"),
}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path, title: str) -> str:
    """Title, tight layout, an atomic PNG write, and the figure closed."""
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(str(path)) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return str(path)


def global_steps(history: list) -> list:
    """Global iteration index of each history entry: stage-2 iterations follow the last of stage 1."""
    n1 = max((int(h["iteration"]) + 1 for h in history if h.get("stage") == 1), default=0)
    return [int(h["iteration"]) + (n1 if h.get("stage") == 2 else 0) for h in history]


def montage_png(path, maps: dict, reference: dict | None = None, title: str = "", slice_index: int | None = None):
    """One row per source (reconstruction, reference, |difference|), one column per map, central slice."""
    plt = _plt()
    names = [n for n in DISPLAY if n in maps]
    reference = {k: v for k, v in (reference or {}).items() if k in DISPLAY} or None
    z = maps[names[0]].shape[0] // 2 if slice_index is None else slice_index
    rows = [("reconstruction", maps)]
    if reference:
        rows.append(("reference", reference))
        rows.append(("|difference|", {n: np.abs(maps[n] - reference[n]) for n in names if n in reference}))
    fig, axes = plt.subplots(len(rows), len(names), figsize=(2.6 * len(names), 2.5 * len(rows)), squeeze=False)
    for r, (label, src) in enumerate(rows):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.axis("off")
            if name not in src:
                continue
            cmap, rng, unit = DISPLAY[name]
            img = src[name][z]
            if rng is None or label == "|difference|":
                hi = float(np.percentile(np.abs(maps[name][z]), 99)) or 1.0
                rng = (0.0, hi if label != "|difference|" else hi * (0.2 if name != "I0" else 0.2))
            im = ax.imshow(img, cmap=cmap, vmin=rng[0], vmax=rng[1], origin="lower")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title((f"{name} ({unit})" if unit else name) if r == 0 else f"{label}: {name}", fontsize=8)
    return _save(plt, fig, path, title)


def loss_png(path, history: list, title: str = ""):
    """Loss terms against iteration (log scale), stage boundary marked; nRMSE on a second panel when present."""
    plt = _plt()
    has_err = any(k.startswith("nrmse_") for h in history for k in h)
    fig, axes = plt.subplots(1, 2 if has_err else 1, figsize=(10 if has_err else 5.5, 3.6), squeeze=False)
    n1 = max([h["iteration"] + 1 for h in history if h["stage"] == 1], default=0)
    x = global_steps(history)
    ax = axes[0, 0]
    for key in ("loss1", "loss2", "loss3", "loss"):
        pts = [(xi, h[key]) for xi, h in zip(x, history) if key in h]
        if pts:
            ax.semilogy(*zip(*pts), label=key)
    if n1 and any(h["stage"] == 2 for h in history):
        ax.axvline(n1, color="k", lw=0.6, ls="--")
    ax.set_xlabel("iteration")
    ax.legend(fontsize=7)
    ax.set_title(title or "losses", fontsize=9)
    if has_err:
        ax = axes[0, 1]
        for key in sorted({k for h in history for k in h if k.startswith("nrmse_")}):
            pts = [(xi, h[key]) for xi, h in zip(x, history) if key in h]
            ax.plot(*zip(*pts), label=key.replace("nrmse_", "nRMSE "))
        ax.set_xlabel("iteration")
        ax.set_ylabel("nRMSE (%)")
        ax.legend(fontsize=7)
    return _save(plt, fig, path, "")


def montage_images_png(path, images: np.ndarray, labels: list, title: str = "", slice_index: int | None = None):
    """Magnitude images (N, Z, Y, X), one panel each, central slice, one grey scale for all."""
    plt = _plt()
    z = images.shape[1] // 2 if slice_index is None else slice_index
    hi = float(np.percentile(images[:, z], 99.5)) or 1.0
    fig, axes = plt.subplots(1, len(images), figsize=(2.4 * len(images), 2.6), squeeze=False)
    for ax, img, label in zip(axes[0], images, labels):
        ax.imshow(img[z], cmap="gray", vmin=0.0, vmax=hi, origin="lower")
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    return _save(plt, fig, path, title)
