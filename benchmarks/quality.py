"""Quality table on one simulated subject: fully sampled fit, zero-filled fit, LLR fit, INR-only, REFINE-MORE
with the paper's plain gradient steps (eq. 8) and with our Gauss–Newton steps.
Also the optional warm start (unroll.warm_start_steps), the warm start alone, and the refinement
without its map prior (unroll.map_smoothness = 0 and k in the 20–26 1/s band: `small` before the prior),
and with the L-BFGS warm start, the 128-step descent warm start it replaced (and that one's prior weights).

    python benchmarks/quality.py [--matrix 6 32 32] [--acc 4] [--preset small] [--snr 200]

nRMSE (paper eq. 16, %) and SSIM per map inside the WM+GM mask (CSF has f ≈ 0, where relative
errors of f and kF mean little), plus the wall time of each method. Writes
benchmarks/results/quality.json and quality_montage*.png (REFINE-MORE, zero-filled and LLR fits).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import preset
from refine_more.baselines.fitting import fit_images
from refine_more.baselines.llr import llr_reconstruct
from refine_more.evaluation.metrics import score_maps
from refine_more.physics.operators import zero_filled_images
from refine_more.evaluation.plots import montage_png
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject

RESULTS = Path(__file__).parent / "results"
PARAMS = ("I0", "T1F", "f", "kF")


def warm_start_maps(subject, result) -> dict:
    """Physical maps of the warm start alone: the result's INR maps after the warm start (M
    descent steps or 16 + M L-BFGS iterations, `unroll.warm_start_solver`)."""
    from refine_more.reconstruction.objective import RefinementObjective
    from refine_more.physics.scan import ScanPhysics
    config = result.state["config"]
    inr, unrolled = result.state["inr"], result.state["unrolled"]
    prob = ScanPhysics(subject, config, next(inr.parameters()).device)
    with torch.no_grad():
        images = inr.images()
        term = RefinementObjective(prob, config.unroll)
        q, _ = unrolled.warm_start(term.start(inr.map_channels()), term, prob.background_phase(images), prob.tissue)
    return prob.physical_maps(q)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--acc", type=float, default=4.0)
    ap.add_argument("--snr", type=float, default=200.0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warm-start-steps", type=int, default=32,
                    help="M of the warm-start ablation row when the preset has no warm start")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    args = ap.parse_args()

    subject = simulate_subject("sub-q01", SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, snr=args.snr), seed=args.seed)
    ref = {p: subject.reference[p] for p in PARAMS}
    labels = subject.reference["labels"]
    wm_gm = (labels == 1) | (labels == 2)
    coils = torch.from_numpy(subject.coil_sens)
    rows, maps_by_method = {}, {}
    for method, kspace in (("full-fit", subject.reference["kspace_full"]), ("zf-fit", subject.kspace)):
        t = time.perf_counter()
        images = zero_filled_images(torch.from_numpy(kspace), coils).numpy()
        maps = fit_images(images, subject.protocol, subject.b1, subject.tissue_mask, k_band=preset(args.preset).k_band)
        rows[method] = {"seconds": time.perf_counter() - t, **score_maps(maps, ref, wm_gm)}
        maps_by_method[method] = maps
    # the paper's classical baseline: locally low-rank images (refine_more/baselines/llr.py), then the same fit
    t = time.perf_counter()
    images = llr_reconstruct(subject.kspace, subject.coil_sens, subject.mask)[0].numpy()
    maps = fit_images(images, subject.protocol, subject.b1, subject.tissue_mask, k_band=preset(args.preset).k_band)
    rows["llr-fit"] = {"seconds": time.perf_counter() - t, **score_maps(maps, ref, wm_gm)}
    maps_by_method["llr-fit"] = maps
    config = preset(args.preset)
    config.progress = False
    result = reconstruct(subject, config)
    rows["inr-only"] = {"seconds": result.timings["stage1"], **score_maps(result.maps_init, ref, wm_gm)}
    rows["refine-more"] = {"seconds": result.timings["total"], **score_maps(result.maps, ref, wm_gm)}
    # ablation: the paper's eq. 8 (plain gradient, exact second-order unrolled backprop, the INR's phase unrefined, no warm start)
    plain = preset(args.preset)
    plain.progress = False
    plain.unroll.preconditioner, plain.unroll.refine_phase, plain.unroll.create_graph = "none", False, True
    plain.unroll.warm_start_steps = 0
    plain.unroll.map_smoothness = (0.0, 0.0, 0.0, 0.0)
    plain_result = reconstruct(subject, plain)
    rows["refine-more-plain-gradient"] = {"seconds": plain_result.timings["total"], **score_maps(plain_result.maps, ref, wm_gm)}
    # ablation of the warm start (unroll.warm_start_steps): the preset's setting against the other
    # one, and the warm start alone (the stage-1 INR's maps after M descent steps, nothing learned)
    toggled = preset(args.preset)
    toggled.progress = False
    toggled.unroll.warm_start_steps = 0 if config.unroll.warm_start_steps else args.warm_start_steps
    toggled_result = reconstruct(subject, toggled)
    label = "refine-more-no-warm-start" if config.unroll.warm_start_steps else f"refine-more-warm-start-{args.warm_start_steps}"
    rows[label] = {"seconds": toggled_result.timings["total"], **score_maps(toggled_result.maps, ref, wm_gm)}
    warm_result = result if config.unroll.warm_start_steps else toggled_result
    t = time.perf_counter()
    descent_maps = warm_start_maps(subject, warm_result)
    warm_config = warm_result.state["config"].unroll
    rows[f"inr+warm-start-{warm_config.warm_start_solver}-{warm_config.warm_start_steps}"] = {
        "seconds": warm_result.timings["stage1"] + time.perf_counter() - t, **score_maps(descent_maps, ref, wm_gm)}
    if any(config.unroll.map_smoothness):
        # ablation of the map prior: the data term alone, which over-fits when descended long, so
        # the warm start is the 32 steps that were best without it, and k in the wider band
        bare = preset(args.preset)
        bare.progress = False
        bare.unroll.map_smoothness, bare.k_band = (0.0, 0.0, 0.0, 0.0), (20.0, 26.0)
        bare.unroll.warm_start_steps, bare.unroll.warm_start_solver = min(bare.unroll.warm_start_steps, 32), "descent"
        bare_result = reconstruct(subject, bare)
        rows["refine-more-no-map-prior"] = {"seconds": bare_result.timings["total"], **score_maps(bare_result.maps, ref, wm_gm)}
    if config.unroll.warm_start_solver == "lbfgs":
        # ablation of the solver: `small` before L-BFGS, 128 descent steps with the prior weights
        # tuned for that early-stopped descent
        early = preset(args.preset)
        early.progress = False
        early.unroll.warm_start_solver, early.unroll.warm_start_steps = "descent", 128
        early.unroll.map_smoothness = (1e-3, 3e-4, 1e-2, 0.0)
        early_result = reconstruct(subject, early)
        rows["refine-more-descent-128-previous-prior"] = {"seconds": early_result.timings["total"],
                                                          **score_maps(early_result.maps, ref, wm_gm)}
    out = {"matrix": args.matrix, "acceleration": args.acc, "snr": args.snr, "preset": args.preset,
           "config_hash": config.hash(), "mask": "WM+GM", "methods": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    montage_png(Path(args.out).with_name("quality_montage.png"), result.maps, ref, title=f"REFINE-MORE ({args.preset}) vs truth")
    montage_png(Path(args.out).with_name("quality_montage_zf.png"), maps_by_method["zf-fit"], ref, title="zero-filled fit vs truth")
    montage_png(Path(args.out).with_name("quality_montage_llr.png"), maps_by_method["llr-fit"], ref, title="LLR fit vs truth")
    print(f"| method | " + " | ".join(f"{p} nRMSE % / SSIM" for p in PARAMS) + " | time (s) |")
    print("|---|" + "---|" * (len(PARAMS) + 1))
    for m, r in rows.items():
        print(f"| {m} | " + " | ".join(f"{r[p]['nrmse']:.2f} / {r[p]['ssim']:.3f}" for p in PARAMS) + f" | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
