"""Does `paper`'s stage 2 refine? The watch, the variants and the Fig. 8 ablation of issue 26.

One evaluation subject (the cohort of benchmarks/evaluation.py: seed --first-seed, 4 coils, AF 4) is
trained through `paper`'s stage 1 once (cached in --work); every variant then runs stage 2 from that
same INR and Adam state, as a full `refine-more recon` with that config would (the same seed, the same
initial U-Net). Each variant is a list of config overrides (VARIANTS, plus --base for all).

Recorded per variant, every `log_every` stage-2 iterations: loss 3 of the last phase (normalised:
‖Ax − d‖² / ‖d‖²) and the nRMSE in tissue of Q⁽⁰⁾ and of the last phase, beside the noise floor
‖M n‖² / ‖d‖² (the acquired noise's share of the data, exact: the same subject simulated without noise).
A loss 3 below the floor fits noise.

    python benchmarks/paper_refinement.py --variants paper inert-step K0 K1 ... [--iters2 500]
        [--base KEY=VALUE ...] [--adapt] [--out benchmarks/results/paper_refinement.json]

`--adapt`: the first variant's result is the seed; subject 2 (seed --first-seed + 1) is adapted from it
at `paper`'s adaptation schedule and reconstructed from scratch at the first variant's schedule
(full `reconstruct`, timed) for the comparison. Results are merged into --out as they come.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refine_more.config import apply_overrides, preset  # noqa: E402
from refine_more.evaluation.metrics import score_maps  # noqa: E402
from refine_more.evaluation.simulate import SimulationConfig, load_templates, simulate_subject  # noqa: E402
from refine_more.reconstruction.adaptation import SeedState  # noqa: E402
from refine_more.reconstruction.optimizer import adam  # noqa: E402
from refine_more.reconstruction.recon import finish, reconstruct, setup, train_inr, train_refinement  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAPS = ("T1F", "f", "kF")
VARIANTS = {
    "paper": [],
    "inert-step": ["unroll.fixed_step=1e-3"],                 # the public code's α, never trained
    "hash3-frozen": ["unroll.freeze_map_hash=true"],          # the code: hash 3 frozen, one Adam
    "tissue-masked": ["unroll.mask_outside_tissue=true"],     # the code masks the maps to tissue
    "held-out-stop": ["unroll.training=held-out-stop", "unroll.ssdu_validate_every=10", "unroll.ssdu_patience=10"],
    "unet-sized": ["unroll.unet_width=8", "unroll.unet_levels=2"],   # `small`'s U-Net: 6×32×32 slices
    **{f"K{k}": [f"unroll.iterations={k}"] for k in (0, 1, 2, 4, 6)},
}


def simulate(index: int, args):
    sim = SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=4)
    templates = load_templates(2)
    subject = simulate_subject(f"sub-{index + 1:03d}", sim, seed=args.first_seed + index, templates=templates)
    clean = simulate_subject("clean", SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=4,
                                                       snr=1e12), seed=args.first_seed + index, templates=templates)
    assert np.array_equal(clean.mask, subject.mask)    # the same draws: only the noise's scale differs
    d = subject.kspace.astype(np.complex128)
    floor = float(np.sum(np.abs(d - clean.kspace) ** 2) / np.sum(np.abs(d) ** 2))
    return subject, floor


def stage1(subject, config, work: Path) -> dict:
    """`paper`'s stage 1 on `subject`, cached: the INR's and Adam's state, its seconds and history."""
    path = work / f"stage1_{subject.subject_id}_{config.iters_stage1}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)       # our own file; never unpickles code
    run = setup(subject, config)
    train_inr(run)
    state = {"inr": run.inr.state_dict(), "adam": run.stage1_optimizer.state_dict(),
             "seconds": torch.tensor(run.timings["stage1"]), "iterations": torch.tensor(run.done["stage1"]),
             "history": json.dumps(run.history)}
    work.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def run_variant(subject, config, cached: dict):
    """Stage 2 of `config` from the cached stage 1: the Result, as `reconstruct` would give it."""
    run = setup(subject, config)
    run.inr.load_state_dict(cached["inr"])
    run.stage1_optimizer = adam(run.params["stage1"], run.schedule["lr1"])
    run.stage1_optimizer.load_state_dict(cached["adam"])
    run.done["stage1"], run.timings["stage1"] = int(cached["iterations"]), float(cached["seconds"])
    run.history = json.loads(cached["history"])
    t = time.perf_counter()
    final = train_refinement(run)
    result = finish(run, final)
    result.timings["total"] = float(cached["seconds"]) + time.perf_counter() - t + run.timings["setup"]
    return result


def scores(result, subject) -> dict:
    ref = {p: subject.reference[p] for p in MAPS}
    final = score_maps(result.maps, ref, result.tissue_mask, params=MAPS, with_ssim=False)
    init = score_maps(result.maps_init, ref, result.tissue_mask, params=MAPS, with_ssim=False)
    return {"final": {p: final[p]["nrmse"] for p in MAPS}, "q0": {p: init[p]["nrmse"] for p in MAPS}}


def watch(result) -> list:
    keep = ("iteration", "loss3", "loss3_last", "loss_held_out") + tuple(f"nrmse_{p}" for p in MAPS) + tuple(
        f"nrmse_init_{p}" for p in MAPS)
    return [{k: e[k] for k in keep if k in e} for e in result.history if e["stage"] == 2]


def plot(out: dict, path: Path) -> None:
    names = list(out["variants"])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 6), squeeze=False, sharex="col")
    for j, name in enumerate(names):
        v = out["variants"][name]
        it = [e["iteration"] for e in v["watch"]]
        for p, colour in zip(MAPS, ("C0", "C1", "C2")):
            axes[0, j].plot(it, [e.get(f"nrmse_{p}") for e in v["watch"]], colour, label=f"{p} last phase")
            axes[0, j].plot(it, [e.get(f"nrmse_init_{p}") for e in v["watch"]], colour + "--", label=f"{p} Q⁽⁰⁾")
        axes[0, j].set_title(name, fontsize=9)
        if "loss3_last" in (v["watch"][0] if v["watch"] else {}):
            axes[1, j].semilogy(it, [e["loss3_last"] for e in v["watch"]], "k", label="loss 3, last phase")
        axes[1, j].axhline(out["noise_floor"], color="r", ls=":", label="noise floor")
        axes[1, j].set_xlabel("stage-2 iteration")
    axes[0, 0].set_ylabel("nRMSE % in tissue")
    axes[1, 0].set_ylabel("‖Ax − d‖² / ‖d‖²")
    axes[0, 0].legend(fontsize=6)
    axes[1, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["paper"], choices=sorted(VARIANTS))
    ap.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    ap.add_argument("--iters2", type=int, default=None, help="stage-2 iterations (default: the preset's)")
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--acc", type=float, default=4.0)
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--adapt", action="store_true")
    ap.add_argument("--work", default="runs/paper_refinement")
    ap.add_argument("--out", default=str(RESULTS / "paper_refinement.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    subject, floor = simulate(0, args)
    out.update({"subjects": [subject.subject_id], "matrix": args.matrix, "acceleration": args.acc,
                "first_seed": args.first_seed, "noise_floor": floor, "threads": torch.get_num_threads()})
    out.setdefault("variants", {})
    extra = [f"iters_stage2={args.iters2}"] if args.iters2 is not None else []
    base = apply_overrides(preset("paper"), args.base + extra)
    base.progress = False
    cached = stage1(subject, base, Path(args.work))
    first = None
    for name in args.variants:
        config = apply_overrides(base, VARIANTS[name])
        t = time.perf_counter()
        result = run_variant(subject, config, cached)
        first = first or (name, config, result)
        row = {"overrides": args.base + extra + VARIANTS[name], "config_hash": config.hash(), **scores(result, subject),
               "seconds": result.timings["total"], "stage2_s": result.timings["stage2"],
               "stage2_iterations": result.iterations["stage2"], "qc": result.qc.status if result.qc else None,
               "watch": watch(result)}
        out["variants"][name] = row
        print(f"{name}: final {row['final']} q0 {row['q0']} stage 2 {time.perf_counter() - t:.0f} s "
              f"({row['stage2_iterations']} it)", flush=True)
        out_path.write_text(json.dumps(out, indent=1))
    if args.adapt:
        out["adaptation"] = adaptation(first, args)
        out_path.write_text(json.dumps(out, indent=1))
    plot(out, out_path.with_suffix(".png"))


def adaptation(first, args) -> dict:
    """Subject 2 adapted from the first variant's result, and from scratch at its config, both timed."""
    name, config, seed_result = first
    seed = SeedState.from_result(seed_result).to_numpy_dict()
    subject, _ = simulate(1, args)
    adapted = reconstruct(subject, config, seed_state=seed)
    scratch = reconstruct(subject, config)
    row = {"seed_variant": name, "subject": subject.subject_id,
           "adapted": {**scores(adapted, subject), "seconds": adapted.timings["total"], "iterations": adapted.iterations},
           "scratch": {**scores(scratch, subject), "seconds": scratch.timings["total"], "iterations": scratch.iterations}}
    print(f"adapted {row['adapted']['final']} {row['adapted']['seconds']:.0f} s; scratch {row['scratch']['final']} "
          f"{row['scratch']['seconds']:.0f} s", flush=True)
    return row


if __name__ == "__main__":
    main()
