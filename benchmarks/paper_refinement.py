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
        [--base KEY=VALUE ...] [--save-seed FILE] [--out benchmarks/results/paper_refinement.json]
    python benchmarks/paper_refinement.py --adapt-from FILE --adapt-variants paper lr-1e-2 ... [--scratch]

`--save-seed`: the first variant's result as a seed state. `--adapt-from`: subject 2 (seed --first-seed
+ 1) adapted from that seed once per adaptation variant (ADAPT_VARIANTS), each a full timed
`reconstruct` (with --scratch, beside subject 2's scratch reconstruction and its stage-1 Q⁽⁰⁾ curve). Results are merged into --out as they come.
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
from refine_more.evaluation.cohort_tables import subject_scores  # noqa: E402
from refine_more.evaluation.metrics import score_maps  # noqa: E402
from refine_more.evaluation.simulate import SimulationConfig, load_templates, simulate_subject  # noqa: E402
from refine_more.reconstruction.adaptation import SeedState  # noqa: E402
from refine_more.reconstruction.optimizer import adam  # noqa: E402
from refine_more.reconstruction.recon import finish, reconstruct, setup, train_inr, train_refinement  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MAPS = ("T1F", "f", "kF")
PUBLISHED = ["unroll.training=full"]          # the published 1500 stage-2 iterations (`paper` before decision 024)
VARIANTS = {   # as measured: the watch and the 500-iteration sweep on the published schedule, Fig. 8 with --base held-out
    "paper": PUBLISHED,
    "inert-step": PUBLISHED + ["unroll.fixed_step=1e-3"],                 # the public code's α, never trained
    "hash3-frozen": PUBLISHED + ["unroll.freeze_map_hash=true"],          # the code: hash 3 frozen, one Adam
    "tissue-masked": PUBLISHED + ["unroll.mask_outside_tissue=true"],     # the code masks the maps to tissue
    "held-out-stop": ["unroll.training=held-out-stop", "unroll.ssdu_validate_every=10", "unroll.ssdu_patience=10"],
    "unet-sized": PUBLISHED + ["unroll.unet_width=8", "unroll.unet_levels=2"],   # `small`'s U-Net: 6×32×32 slices
    **{f"K{k}": [f"unroll.iterations={k}"] for k in (0, 1, 2, 4, 6)},
}
PAPER_ADAPT = ["adapt.lr=0.001", "adapt.train_image_mlp=false"]      # the paper's adaptation settings
ADAPT_VARIANTS = {   # the suspects of issue 26 for adaptation at the paper's settings (500 + 200)
    "paper": PAPER_ADAPT,
    "lr-1e-2": ["adapt.lr=0.01", "adapt.train_image_mlp=false"],      # stage 1's rate on the fresh spatial hashes
    "mlp1-trained": ["adapt.lr=0.001", "adapt.train_image_mlp=true"], # MLP1 adapted with the hashes
    "warm-hashes": PAPER_ADAPT + ["adapt.warm_spatial_hashes=true"],  # hashes 2/3 start from the seed's tables
    "lr-1e-2-mlp1": ["adapt.lr=0.01", "adapt.train_image_mlp=true"],  # today's `paper` (decision 024)
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
    """`paper`'s stage 1 on `subject`, cached: the INR's and Adam's state, its seconds and history (keyed by
    the subject's simulation, the stage-1 schedule and what stage 1 sees; the notes carry seed, SNR and AF)."""
    held_out = "_held_out" if config.unroll.training == "held-out-stop" else ""     # Γ out of stage 1 too
    made = "".join(ch if ch.isalnum() else "-" for ch in subject.notes[0])[:80] if subject.notes else ""
    path = work / f"stage1_{subject.subject_id}_{'x'.join(map(str, subject.shape))}_{made}_{config.iters_stage1}{held_out}.pt"
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
    """nRMSE % of the final maps and of Q⁽⁰⁾ in WM + GM (docs/results.md's region) and in all tissue
    (the region of the stage-2 watch, `ReconRun.log`)."""
    ref, labels = {p: subject.reference[p] for p in MAPS}, subject.reference["labels"]
    out = {}
    for key, maps in (("final", result.maps), ("q0", result.maps_init)):
        wm_gm = subject_scores(maps, ref, labels)["scores"]
        tissue = score_maps(maps, ref, result.tissue_mask, params=MAPS, with_ssim=False)
        out[key] = {p: wm_gm[p]["nrmse"] for p in MAPS}
        out[f"{key}_tissue"] = {p: tissue[p]["nrmse"] for p in MAPS}
    return out


def watch(result) -> list:
    keep = ("iteration", "loss1", "loss2", "loss3", "loss3_last", "loss_held_out") + tuple(f"nrmse_{p}" for p in MAPS) + tuple(
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


def plot_ablation(out: dict, path: Path) -> None:
    """The paper's Fig. 8: final nRMSE (WM + GM) against the number of learned phases K."""
    ablation = out.get("ablation") or {}
    if len(ablation) < 2:
        return
    ks = sorted(ablation, key=int)
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for p in MAPS:
        ax.plot([int(k) for k in ks], [ablation[k][p] for k in ks], "o-", label=p)
    ax.set_xlabel("learned phases K (0: the INR's maps)")
    ax.set_ylabel("nRMSE % in WM + GM")
    ax.set_xticks([int(k) for k in ks])
    ax.set_title(f"{', '.join(out.get('subjects', [])[:1])}: stage 2 stopped on held-out k-space", fontsize=8)
    ax.legend(fontsize=7)
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
    ap.add_argument("--save-seed", metavar="FILE", help="save the first variant's result as a seed state")
    ap.add_argument("--adapt-from", metavar="FILE", help="a saved seed state: adapt subject 2 from it (no variants)")
    ap.add_argument("--adapt-variants", nargs="+", default=["paper"], choices=sorted(ADAPT_VARIANTS))
    ap.add_argument("--scratch", action="store_true",
                    help="with --adapt-from: also subject 2's scratch reconstruction (stage 1 cached, its Q⁽⁰⁾ curve kept)")
    ap.add_argument("--paper-variant", default="K4", help="the variant whose row is `paper` in the summary keys")
    ap.add_argument("--paper-adapted-variant", default="lr-1e-2-mlp1", choices=sorted(ADAPT_VARIANTS),
                    help="the adaptation row that is `paper_adapted` (today's `paper` adapts as lr-1e-2-mlp1)")
    ap.add_argument("--summarise", action="store_true", help="only recompute the summary keys of --out")
    ap.add_argument("--work", default="runs/paper_refinement")
    ap.add_argument("--out", default=str(RESULTS / "paper_refinement.json"))
    args = ap.parse_args()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(out_path.read_text()) if out_path.exists() else {}
    extra = [f"iters_stage2={args.iters2}"] if args.iters2 is not None else []
    base = apply_overrides(preset("paper"), args.base + extra)
    if args.summarise or args.adapt_from:
        if args.adapt_from:
            out["adaptation"] = {**out.get("adaptation", {}), **adaptation(base, args)}
        summarise(out, args.paper_variant, args.paper_adapted_variant)
        out_path.write_text(json.dumps(out, indent=1))
        plot_ablation(out, out_path.with_name(f"{out_path.stem}_ablation.png"))
        return
    subject, floor = simulate(0, args)
    out.update({"subjects": [subject.subject_id], "matrix": args.matrix, "acceleration": args.acc,
                "first_seed": args.first_seed, "noise_floor": floor, "threads": torch.get_num_threads()})
    out.setdefault("variants", {})
    for i, name in enumerate(args.variants):
        config = apply_overrides(base, VARIANTS[name])
        cached = stage1(subject, config, Path(args.work))
        t = time.perf_counter()
        result = run_variant(subject, config, cached)
        if i == 0 and args.save_seed:
            SeedState.from_result(result).save(args.save_seed)
        row = {"overrides": args.base + extra + VARIANTS[name], "config_hash": config.hash(), **scores(result, subject),
               "seconds": result.timings["total"], "stage2_s": result.timings["stage2"],
               "stage2_iterations": result.iterations["stage2"], "qc": result.qc.status if result.qc else None,
               "watch": watch(result)}
        out["variants"][name] = row
        print(f"{name}: final {row['final']} q0 {row['q0']} stage 2 {time.perf_counter() - t:.0f} s "
              f"({row['stage2_iterations']} it)", flush=True)
        summarise(out, args.paper_variant, args.paper_adapted_variant)
        out_path.write_text(json.dumps(out, indent=1))
    plot(out, out_path.with_suffix(".png"))
    plot_ablation(out, out_path.with_name(f"{out_path.stem}_ablation.png"))


def summarise(out: dict, paper_variant: str, adapted_variant: str) -> None:
    """The keys issue 26 names, from the rows run: `paper` is `paper_variant`'s final maps, `q0` its
    INR's, `ablation` the final maps of each K run (K = 0: the INR's maps), `paper_adapted` the
    adaptation row `adapted_variant` (WM + GM nRMSE %; one subject each here)."""
    variants, adapted = out.get("variants", {}), out.get("adaptation", {})
    if paper_variant in variants:      # scratch rows: sub-001's variant and, when run, the adapted subject's own
        rows = {out["subjects"][0]: variants[paper_variant]}
        if "scratch" in adapted:
            rows[adapted["subject"]] = adapted["scratch"]
        mean = lambda key: {p: float(np.mean([r[key][p] for r in rows.values()])) for p in MAPS}
        out.update({"paper": mean("final"), "q0": mean("q0"), "paper_s": float(np.mean([r["seconds"] for r in rows.values()])),
                    "paper_variant": paper_variant, "paper_by_subject": {k: {"final": r["final"], "q0": r["q0"],
                                                                                "seconds": r["seconds"]} for k, r in rows.items()}})
    out["ablation"] = {name[1:]: variants[name]["final"] for name in sorted(variants, key=lambda n: int(n[1:]) if n[1:].isdigit() else 99)
                       if name.startswith("K") and name[1:].isdigit()}
    if adapted_variant in adapted:
        row = adapted[adapted_variant]
        out.update({"paper_adapted": row["final"], "paper_adapted_s": row["seconds"], "paper_adapted_variant": adapted_variant,
                    "subjects": sorted(set(out.get("subjects", [])) | {adapted["subject"]})})


def adaptation(base, args) -> dict:
    """Subject 2 adapted from the seed in --adapt-from, once per --adapt-variants, each a full timed
    `reconstruct`; with --scratch, beside subject 2's scratch reconstruction (stage 1 cached; its Q⁽⁰⁾
    curve is the yardstick of the adapted stage 1)."""
    seed = SeedState.load(args.adapt_from).to_numpy_dict()
    subject, _ = simulate(1, args)
    out = {}
    if args.scratch:
        cached = stage1(subject, base, Path(args.work))
        out["scratch_stage1"] = {"seconds": float(cached["seconds"]), "watch": [
            {k: e[k] for k in e if k == "iteration" or k.startswith("nrmse_")} for e in json.loads(cached["history"])]}
        scratch = run_variant(subject, base, cached)
        out["scratch"] = {**scores(scratch, subject), "seconds": scratch.timings["total"], "iterations": scratch.iterations}
        print(f"scratch {out['scratch']['final']} {out['scratch']['seconds']:.0f} s", flush=True)
    for name in args.adapt_variants:
        config = apply_overrides(base, ADAPT_VARIANTS[name])
        adapted = reconstruct(subject, config, seed_state=seed)
        out[name] = {"overrides": ADAPT_VARIANTS[name], **scores(adapted, subject), "seconds": adapted.timings["total"],
                     "stage_seconds": {k: adapted.timings[k] for k in ("stage1", "stage2")},
                     "iterations": adapted.iterations, "watch": [
                         {k: e[k] for k in e if k in ("stage", "iteration") or k.startswith("nrmse_")} for e in adapted.history]}
        print(f"adapted ({name}): {out[name]['final']} q0 {out[name]['q0']} {out[name]['seconds']:.0f} s", flush=True)
    return {"subject": subject.subject_id, "seed": args.adapt_from, **out}


if __name__ == "__main__":
    main()
