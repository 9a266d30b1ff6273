"""Cohort evaluation (paper §3.4–4.1): Table 1 (nRMSE and SSIM as mean ± SD over subjects, per
method and map) and Bland–Altman agreement of ROI means with the reference (Fig. 4).

ROIs: white and grey matter, each split into the four quadrants of the axial plane (left/right ×
anterior/posterior), so every subject gives eight ROI means per map; the paper drew five ROIs by
hand on its in-vivo data.
"""
from __future__ import annotations

import numpy as np

from refine_more.evaluation.metrics import score_maps

SCORED = ("T1F", "f", "kF")
TISSUES = {"WM": 1, "GM": 2}  # label values of the spec's reference/labels


def quadrant_rois(labels: np.ndarray) -> dict:
    """{name: boolean mask (Z, Y, X)}: each tissue in each quadrant of the (y, x) plane."""
    labels = np.asarray(labels)
    Y, X = labels.shape[1:]
    yy, xx = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    halves = {"ant": yy < Y // 2, "post": yy >= Y // 2}
    sides = {"left": xx < X // 2, "right": xx >= X // 2}
    out = {}
    for tissue, value in TISSUES.items():
        for h, hm in halves.items():
            for s, sm in sides.items():
                mask = (labels == value) & (hm & sm)[None]
                if mask.any():
                    out[f"{tissue}-{h}-{s}"] = mask
    return out


def roi_pairs(maps: dict, reference: dict, labels, params=SCORED) -> dict:
    """{param: (estimated ROI means, reference ROI means)} over `quadrant_rois`."""
    rois = list(quadrant_rois(labels).values())

    def means(a):
        a = np.asarray(a, np.float64)
        return np.array([float(a[m].mean()) for m in rois])

    return {p: (means(maps[p]), means(reference[p])) for p in params}


def bland_altman(estimate, reference) -> dict:
    """Mean difference (bias) and 95 % limits of agreement (bias ± 1.96 SD) of paired values."""
    est, ref = np.asarray(estimate, np.float64), np.asarray(reference, np.float64)
    if est.shape != ref.shape or est.size < 2:
        raise ValueError(f"bland_altman: need ≥ 2 paired values, got {est.shape} and {ref.shape}")
    diff = est - ref
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    return {"n": int(diff.size), "bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd}


def subject_scores(maps: dict, reference: dict, labels) -> dict:
    """nRMSE/SSIM inside WM + GM (as the quality benchmark) and the ROI pairs of one subject."""
    lab = np.asarray(labels)
    wm_gm = np.isin(lab, list(TISSUES.values()))
    return {"scores": score_maps(maps, reference, wm_gm), "roi": roi_pairs(maps, reference, lab)}


def cohort_table(per_subject: dict, params=("I0",) + SCORED) -> tuple:
    """per_subject: {method: [subject_scores(...), ...]} → (rows, markdown) with mean ± SD over subjects."""
    rows = {}
    for method, subjects in per_subject.items():
        rows[method] = {}
        for p in params:
            n = np.array([s["scores"][p]["nrmse"] for s in subjects if p in s["scores"]])
            q = np.array([s["scores"][p]["ssim"] for s in subjects if p in s["scores"]])
            if n.size:
                rows[method][p] = {"nrmse_mean": float(n.mean()), "nrmse_sd": float(n.std(ddof=1)) if n.size > 1 else 0.0,
                                   "ssim_mean": float(q.mean()), "ssim_sd": float(q.std(ddof=1)) if q.size > 1 else 0.0,
                                   "n": int(n.size)}
    head = "| method | " + " | ".join(f"{p} nRMSE % | {p} SSIM" for p in params) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(params))]
    for method, r in rows.items():
        cells = [f"{r[p]['nrmse_mean']:.2f} ± {r[p]['nrmse_sd']:.2f} | {r[p]['ssim_mean']:.3f} ± {r[p]['ssim_sd']:.3f}"
                 if p in r else "– | –" for p in params]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def cohort_agreement(per_subject: dict, params=SCORED) -> dict:
    """{method: {param: bland_altman over all subjects' ROI means, plus the points}}."""
    out = {}
    for method, subjects in per_subject.items():
        if not subjects:  # e.g. adapted with a single subject (the seed): nothing to compare
            continue
        out[method] = {}
        for p in params:
            est = np.concatenate([s["roi"][p][0] for s in subjects])
            ref = np.concatenate([s["roi"][p][1] for s in subjects])
            out[method][p] = {**bland_altman(est, ref), "mean": ((est + ref) / 2).tolist(), "diff": (est - ref).tolist()}
    return out


def bland_altman_png(path, agreement: dict, params=SCORED, title: str = ""):
    """One panel per (map, method): difference against mean of ROI means, bias and limits of agreement."""
    from refine_more.files.atomic import atomic_path
    from refine_more.evaluation.plots import _plt

    plt = _plt()
    methods = list(agreement)
    fig, axes = plt.subplots(len(params), len(methods), figsize=(3.2 * len(methods), 2.8 * len(params)), squeeze=False)
    units = {"T1F": "s", "f": "", "kF": "1/s", "I0": "a.u."}
    for i, p in enumerate(params):
        lim = max(max([abs(v) for v in agreement[m][p]["diff"]] + [abs(agreement[m][p]["loa_low"]),
                                                                      abs(agreement[m][p]["loa_high"])])
                  for m in methods) * 1.15 or 1.0
        for j, m in enumerate(methods):
            a, ax = agreement[m][p], axes[i, j]
            ax.scatter(a["mean"], a["diff"], s=10, alpha=0.7)
            ax.axhline(a["bias"], color="k", lw=1)
            for v in (a["loa_low"], a["loa_high"]):
                ax.axhline(v, color="k", lw=0.8, ls="--")
            ax.axhline(0, color="0.7", lw=0.5)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{m}: {p} (bias {a['bias']:.3g}, LoA ±{1.96 * a['sd']:.2g})", fontsize=7)
            ax.set_xlabel(f"mean of {p} and reference {units.get(p, '')}", fontsize=7)
            ax.set_ylabel("estimate − reference", fontsize=7)
            ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return str(path)
