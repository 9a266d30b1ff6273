"""The paper's phantom study (§3.4.2, Fig. 5) on the simulated vial phantom (refine_more/evaluation/phantom.py).

One phantom, the phantom protocol (5 flip angles incl. 60°, with and without saturation, TR 80 ms,
B1max 9.128 µT), a 1-D mask with AF 4 and the paper's 24 of 128 central lines scaled to the
matrix. Reconstructed by REFINE-MORE (and its INR's maps alone, `inr-only`), the zero-filled fit
and the LLR fit (as benchmarks/evaluation.py runs them); the fully sampled fit is the reference.
Per map (T1F, f, kF): vial means (vials eroded in-plane by one voxel; also by two, tables only) of
each method regressed on the reference's (slope, intercept, R²), and against the truth.

Each pass holds k as its config's `k_band` for every method, the reference fit included (the
comparison the paper makes); `--k-band LOW HIGH` adds a pass with k free in that band.

    python benchmarks/phantom.py [--matrix 4 48 48] [--coils 4] [--snr 200] [--seed 1]
                                 [--preset small] [--set KEY=VALUE ...] [--k-band LOW HIGH] [--out FILE]

Writes benchmarks/results/phantom.json, phantom.md and phantom.png (Fig. 5B: one panel per map,
identity line, one marker per method; a second row per extra pass), and phantom_maps.png (Fig. 5A).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.files.atomic import atomic_path, atomic_write_text
from refine_more.config import apply_overrides, preset
from refine_more.baselines.fitting import fit_images
from refine_more.baselines.llr import llr_reconstruct
from refine_more.physics.operators import zero_filled_images
from refine_more.evaluation.phantom import PhantomConfig, regression, simulate_phantom, vial_masks, vial_means
from refine_more.reconstruction.recon import reconstruct

RESULTS = Path(__file__).parent / "results"
MAPS = ("T1F", "f", "kF")
METHODS = ("refine-more", "zf-fit", "llr-fit")
MARKERS = {"refine-more": ("o", "tab:red"), "zf-fit": ("s", "tab:blue"), "llr-fit": ("^", "tab:green"),
           "full-fit": ("x", "k")}


def log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def analyse(maps: dict, truth: dict, masks: dict) -> dict:
    """Vial means of every method's maps and their regressions on the fully sampled fit's and the truth's."""
    means = {m: vial_means(v, masks) for m, v in maps.items()}
    true_means = vial_means(truth, masks)
    vials = list(masks)

    def table(ref):
        return {m: {p: regression([ref[p][v] for v in vials], [means[m][p][v] for v in vials]) for p in MAPS}
                for m in means if means[m] is not ref}

    return {"vial_means": {**means, "truth": true_means}, "vs_full_fit": table(means["full-fit"]),
            "vs_truth": table(true_means)}


def run_pass(subject, config, images: dict, masks: dict, t0: float) -> dict:
    """Fits of the given images, REFINE-MORE (and its INR's maps) at `config.k_band`; per erosion
    (masks: {voxels eroded: vial masks}) vial means and regressions; seconds."""
    k_band = tuple(config.k_band)
    seconds, maps = {}, {}
    for name, (imgs, t_images) in images.items():
        t = time.perf_counter()
        maps[name] = fit_images(imgs, subject.protocol, subject.b1, subject.tissue_mask, k_band=k_band)
        seconds[name] = t_images + time.perf_counter() - t
        log(f"k_band {k_band}: {name} in {seconds[name]:.1f} s", t0)
    result = reconstruct(subject, config)
    maps["refine-more"], maps["inr-only"] = result.maps, result.maps_init
    seconds["refine-more"], seconds["inr-only"] = result.timings["total"], result.timings["stage1"]
    log(f"k_band {k_band}: refine-more in {seconds['refine-more']:.1f} s", t0)
    first, *others = masks
    out = {"k_band": list(k_band), "seconds": seconds, **analyse(maps, subject.reference, masks[first])}
    out["other_erosions"] = {str(e): analyse(maps, subject.reference, masks[e]) for e in others}
    return {**out, "maps": maps}


def markdown(out: dict) -> str:
    lines = [f"Simulated vial phantom ({len(out['vials'])} vials in a MnCl2 bath), matrix {tuple(out['matrix'])}, "
             f"{out['coils']} coils, SNR {out['snr']:g}, 1-D mask AF {out['acceleration']:g} with {out['calib_lines']} "
             f"central lines, phantom protocol; preset {out['preset']}. Vial means (eroded by 1 voxel) regressed on "
             "the fully sampled fit's (estimate = slope·reference + intercept).", "", f"`{out['command']}`", ""]
    for ps in out["passes"]:
        lo, hi = ps["k_band"]
        lines += [f"### k {'held at ' + format(lo, 'g') if lo == hi else f'in [{lo:g}, {hi:g}]'} 1/s (every method and the reference)",
                  "", "| method | " + " | ".join(f"{p} slope / intercept / R²" for p in MAPS) + " | time (s) |",
                  "|---|---|---|---|---|"]
        for key, label in (("vs_full_fit", ""), ("vs_truth", " vs truth")):
            for m, per in ps[key].items():
                cells = [f"{per[p]['slope']:.3f} / {per[p]['intercept']:.3g} / {per[p]['r2']:.4f}" for p in MAPS]
                sec = ps["seconds"].get(m)
                lines.append(f"| {m}{label} | " + " | ".join(cells) + f" | {'' if sec is None else f'{sec:.1f}'} |")
        for e, other in ps.get("other_erosions", {}).items():
            for m, per in other["vs_full_fit"].items():
                lines.append(f"| {m}, vials eroded by {e} | " + " | ".join(
                    f"{per[p]['slope']:.3f} / {per[p]['intercept']:.3g} / {per[p]['r2']:.4f}" for p in MAPS) + " | |")
        lines.append("")
        lines += ["| vial | " + " | ".join(f"{p} truth / full / REFINE-MORE / zf / LLR" for p in MAPS) + " |",
                  "|---|---|---|---|"]
        vm = ps["vial_means"]
        for v in out["vials"]:
            lines.append(f"| {v} | " + " | ".join(" / ".join(f"{vm[m][p][v]:.3g}" for m in ("truth", "full-fit", *METHODS))
                                                  for p in MAPS) + " |")
        lines.append("")
    return "\n".join(lines)


def scatter_png(path, passes: list) -> None:
    """Fig. 5B: per pass a row, per map a panel; vial means against the fully sampled fit's."""
    from refine_more.evaluation.plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(len(passes), len(MAPS), figsize=(3.6 * len(MAPS), 3.4 * len(passes)), squeeze=False)
    units = {"T1F": " (s)", "f": "", "kF": " (1/s)"}
    for r, ps in enumerate(passes):
        ref = ps["vial_means"]["full-fit"]
        for c, p in enumerate(MAPS):
            ax = axes[r, c]
            x = np.array(list(ref[p].values()))
            lo, hi = x.min(), x.max()
            for m in METHODS:
                y = np.array([ps["vial_means"][m][p][v] for v in ref[p]])
                g = ps["vs_full_fit"][m][p]
                marker, colour = MARKERS[m]
                ax.scatter(x, y, marker=marker, color=colour, s=28, alpha=0.8,
                           label=f"{m}: {g['slope']:.2f}x{g['intercept']:+.2g}, R² {g['r2']:.3f}")
                xx = np.array([x.min(), x.max()])
                ax.plot(xx, g["slope"] * xx + g["intercept"], color=colour, lw=0.8)
                lo, hi = min(lo, y.min()), max(hi, y.max())
            pad = 0.08 * (hi - lo)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            band = ps["k_band"]
            ax.set_title(f"{p}, k {'= ' + format(band[0], 'g') if band[0] == band[1] else f'in [{band[0]:g}, {band[1]:g}]'}",
                         fontsize=9)
            ax.set_xlabel(f"fully sampled fit{units[p]}", fontsize=8)
            ax.set_ylabel(f"undersampled{units[p]}", fontsize=8)
            ax.legend(fontsize=6, loc="upper left")
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def maps_png(path, ps: dict, truth: dict, mask) -> None:
    """Fig. 5A: the central slice of each method's maps, the fully sampled fit's and the truth."""
    from refine_more.evaluation.plots import DISPLAY, _plt

    plt = _plt()
    rows = [("truth", truth), ("full-fit", ps["maps"]["full-fit"])] + [(m, ps["maps"][m]) for m in METHODS]
    names = ("I0",) + MAPS
    z = mask.shape[0] // 2
    fig, axes = plt.subplots(len(rows), len(names), figsize=(2.4 * len(names), 2.3 * len(rows)), squeeze=False)
    i0_max = float(np.percentile(truth["I0"][mask], 99))
    for r, (label, maps) in enumerate(rows):
        for c, n in enumerate(names):
            cmap, rng, unit = DISPLAY[n]
            vmin, vmax = (0.0, 1.2 * i0_max) if n == "I0" else rng
            im = axes[r, c].imshow(np.where(mask[z], maps[n][z], 0), cmap=cmap, vmin=vmin, vmax=vmax)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            axes[r, c].set_title(f"{label}: {n}", fontsize=7)
            fig.colorbar(im, ax=axes[r, c], fraction=0.046)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=int, nargs=3, default=[4, 48, 48])
    ap.add_argument("--coils", type=int, default=4)
    ap.add_argument("--snr", type=float, default=200.0)
    ap.add_argument("--acc", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--k-band", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                    help="add a pass with k free in this band (every method and the reference)")
    ap.add_argument("--out", default=str(RESULTS / "phantom.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    config = apply_overrides(preset(args.preset), args.set)
    config.progress = False
    pc = PhantomConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=args.coils, snr=args.snr)
    subject = simulate_phantom("phantom-001", pc, seed=args.seed)
    masks = {e: vial_masks(subject.reference["labels"], subject.label_names, erode=e) for e in (1, 2)}
    log(f"simulated {tuple(args.matrix)}; eroded vial sizes {[int(m.sum()) for m in masks[1].values()]}", t0)
    coils = torch.from_numpy(subject.coil_sens)
    images = {"full-fit": (zero_filled_images(torch.from_numpy(subject.reference["kspace_full"]), coils).numpy(), 0.0)}
    t = time.perf_counter()
    images["zf-fit"] = (zero_filled_images(torch.from_numpy(subject.kspace), coils).numpy(), time.perf_counter() - t)
    t = time.perf_counter()
    images["llr-fit"] = (llr_reconstruct(subject.kspace, subject.coil_sens, subject.mask)[0].numpy(), time.perf_counter() - t)
    log(f"LLR images in {images['llr-fit'][1]:.1f} s", t0)
    configs = [config] + ([config.replace(k_band=tuple(args.k_band))] if args.k_band else [])
    passes = [run_pass(subject, c, images, masks, t0) for c in configs]
    out = {"command": " ".join(["python benchmarks/phantom.py", *sys.argv[1:]]), "matrix": list(args.matrix),
           "coils": args.coils, "snr": args.snr, "acceleration": args.acc,
           "calib_lines": pc.calib_lines, "seed": args.seed, "preset": args.preset, "overrides": args.set,
           "config_hash": config.hash(), "vials": list(masks[1]),
           "vial_voxels": {e: {v: int(m.sum()) for v, m in per.items()} for e, per in masks.items()},
           "protocol": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in subject.protocol.to_attrs().items()},
           "wall_s": time.perf_counter() - t0, "passes": [{k: v for k, v in ps.items() if k != "maps"} for ps in passes]}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_path, json.dumps(out, indent=1))
    text = markdown(out)
    atomic_write_text(out_path.with_suffix(".md"), text + "\n")
    scatter_png(out_path.with_suffix(".png"), out["passes"])
    maps_png(out_path.with_name(f"{out_path.stem}_maps.png"), passes[0], subject.reference, subject.tissue_mask)
    print(text)


if __name__ == "__main__":
    main()
