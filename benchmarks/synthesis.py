"""Contrast synthesis, checked honestly (issue 14.4; the paper's Fig. 7C).

    python benchmarks/synthesis.py [--leave-out 3 7] [--matrix 6 32 32] [--seed 6000] [--preset small]

For each left-out image j (counted from 1): simulate one subject, drop image j's k-space, mask and
protocol entry, reconstruct from the rest with every other image at its original coordinate t, then
estimate image j four ways and score each against the simulator's noise-free image (magnitude,
nRMSE % in tissue):
- `inr-synthesis`: the INR of that reconstruction asked for image j's coordinate (what
  `refine-more synthesize` does);
- `neighbours-linear`: the mean of the reconstructed neighbouring images j − 1 and j + 1 (linear
  interpolation halfway between them);
- `signal-model`: the signal model with the reconstructed maps at image j's flip angle and
  saturation (physics-based synthesis: possible when the protocol of the missing image is known);
- `acquired` (reference point): image j of a reconstruction that did acquire it.
Writes benchmarks/results/synthesis.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import apply_overrides, preset
from refine_more.reconstruction.recon import finish, reconstruct, setup, train_inr, train_refinement
from refine_more.physics.signal_model import BTSModel
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.synthesis import synthesize

RESULTS = Path(__file__).parent / "results"


def without_image(subject, j: int):
    """The subject with image j (0-based) removed: k-space, mask, protocol entry, full reference k-space."""
    keep = [i for i in range(subject.n_images) if i != j]
    p = subject.protocol
    protocol = dataclasses.replace(p, flip_angles_deg=tuple(p.flip_angles_deg[i] for i in keep),
                                   saturation=tuple(p.saturation[i] for i in keep), TR_s=tuple(p.TR_s[i] for i in keep))
    reference = dict(subject.reference)
    if "kspace_full" in reference:
        reference["kspace_full"] = reference["kspace_full"][keep]
    return dataclasses.replace(subject, subject_id=f"{subject.subject_id}-no{j + 1}", kspace=subject.kspace[keep],
                               mask=subject.mask[keep], protocol=protocol, reference=reference), keep


def reconstruct_at(subject, config, coordinates):
    """`reconstruct`, with the images placed at the given INR coordinates."""
    run = setup(subject, config)
    run.inr.set_image_coordinates(coordinates)
    train_inr(run)
    return finish(run, train_refinement(run))


def true_images(subject) -> np.ndarray:
    """The simulator's noise-free magnitudes (T, Z, Y, X) in tissue, from the true maps and B1."""
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    ref = subject.reference
    mag = BTSModel(subject.protocol).magnitude(t64(ref["I0"]), t64(ref["T1F"]), t64(ref["f"]), t64(ref["kF"]),
                                               t64(subject.b1)).numpy()
    return mag * subject.tissue_mask[None]


def model_image(protocol, j: int, maps: dict, b1) -> np.ndarray:
    t64 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))
    return BTSModel(protocol).magnitude(*(t64(maps[k]) for k in ("I0", "T1F", "f", "kF")), t64(b1)).numpy()[j]


def nrmse(estimate, truth, tissue) -> float:
    return float(100 * np.linalg.norm((estimate - truth)[tissue]) / np.linalg.norm(truth[tissue]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leave-out", type=int, nargs="+", default=[3, 7], help="images to leave out, from 1 (interior)")
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--seed", type=int, default=6000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    config = apply_overrides(preset(args.preset), args.set + ["progress=false"])
    subject = simulate_subject("sub-syn", SimulationConfig(matrix=tuple(args.matrix), n_coils=4), seed=args.seed)
    T, tissue = subject.n_images, subject.tissue_mask.astype(bool)
    if not all(2 <= j <= T - 1 for j in args.leave_out):
        ap.error(f"--leave-out: interior images 2 … {T - 1} (each needs two neighbours)")
    truth = true_images(subject)
    t0 = time.perf_counter()
    full = reconstruct(subject, config)
    rows, panels = [], []
    for j1 in args.leave_out:
        j = j1 - 1
        reduced, keep = without_image(subject, j)
        coords = (np.asarray(keep, dtype=np.float64) + 0.5) / T
        result = reconstruct_at(reduced, config, coords)
        inr, scale = result.state["inr"], result.state["data_scale"]
        synth = np.abs(synthesize(inr, [(j + 0.5) / T], scale)[0]) * tissue
        recon = np.abs(result.images) * tissue[None]                   # the 7 acquired images, kept order
        neighbours = 0.5 * (recon[keep.index(j - 1)] + recon[keep.index(j + 1)])
        model = model_image(subject.protocol, j, result.maps, subject.b1) * tissue
        acquired = np.abs(full.images[j]) * tissue
        est = {"inr-synthesis": synth, "neighbours-linear": neighbours, "signal-model": model, "acquired": acquired}
        row = {"left_out": j1, "flip_angle_deg": subject.protocol.flip_angles_deg[j],
               "saturation": int(subject.protocol.saturation[j]),
               **{k: nrmse(v, truth[j], tissue) for k, v in est.items()}}
        rows.append(row)
        panels.append((j1, truth[j], est))
        print(json.dumps(row))
    out = {"matrix": args.matrix, "seed": args.seed, "preset": args.preset, "config_hash": config.hash(),
           "rows": rows, "wall_s": time.perf_counter() - t0}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "synthesis.json").write_text(json.dumps(out, indent=1))
    names = ["inr-synthesis", "neighbours-linear", "signal-model", "acquired"]
    lines = [f"{args.matrix} subject (seed {args.seed}), preset {args.preset}; image j left out, reconstructed from "
             "the rest, then estimated; nRMSE % of the magnitude in tissue against the simulator's noise-free image",
             "", "| left out | flip / sat | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['left_out']} | {r['flip_angle_deg']:g}° / {r['saturation']} | "
                     + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
    (RESULTS / "synthesis.md").write_text("\n".join(lines) + "\n")
    _figure(RESULTS / "synthesis.png", panels, names)
    print("\n".join(lines))


def _figure(path, panels, names):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1 + len(names), figsize=(2.3 * (1 + len(names)), 2.4 * len(panels)),
                             squeeze=False)
    for r, (j1, truth, est) in enumerate(panels):
        z, hi = truth.shape[0] // 2, float(np.percentile(truth, 99.5)) or 1.0
        for c, (label, img) in enumerate([("truth", truth)] + [(n, est[n]) for n in names]):
            axes[r, c].imshow(img[z], cmap="gray", vmin=0, vmax=hi, origin="lower")
            axes[r, c].set_title(f"image {j1}: {label}", fontsize=7)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
