"""Does the learned refinement earn its place? A fair ablation over simulated cohorts (issue 18).

    python benchmarks/refinement.py [--scenarios af4-2d af5-2d af4-1d af4-2d-drift] [--scored 4] [--tune 1]

Per scenario: `--tune` subjects on which every method's hyper-parameters are chosen (never
scored) and `--scored` subjects on which the rows are measured; all at 6×32×32, 4 coils, SNR 200,
preset `small`. Every row starts from the same stage-1 INR of its subject (trained once):

- `inr-only`: the INR's maps Q⁽⁰⁾;
- `classical-quadratic`: the classical solver of the refinement's objective (L-BFGS on the data
  term + the quadratic map prior), ρ scaled by the factor tuned on the tuning subjects;
- `classical-huber`: the same with the pseudo-Huber (edge-keeping, TV-like) prior, ρ and δ tuned;
- `learned`: the full method as shipped (`small`: the classical warm start, then the K learned
  iterations trained on loss 3);
- `learned-ssdu`: the learned iterations trained on held-out k-space instead (ssdu.py);
- `paper`: the paper's refinement (eq. 7: plain gradient steps, no warm start, no prior, the INR
  trained jointly in stage 2);
- drift scenario only, `learned-shared-phase`: the shipped method with one shared image phase
  (`unroll.image_phase_order = -1`), what it was before the per-image phase model.

nRMSE % (paper eq. 16) over WM+GM, cohort means; seconds include stage 1. `roi_bias_*`: the mean
|relative bias| (%) of ROI means in small regions (disks of radius 3 voxels, in-plane, fully in
tissue) against the fully sampled fit. Writes benchmarks/results/refinement.json (merged scenario
by scenario) and refinement.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import preset
from refine_more.baselines.fitting import fit_images
from refine_more.evaluation.metrics import score_maps
from refine_more.reconstruction.objective import RefinementObjective
from refine_more.physics.operators import zero_filled_images
from refine_more.reconstruction.classical import classical_minimum
from refine_more.reconstruction.recon import setup, train_inr, train_refinement
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.reconstruction.unrolled import UnrolledPGD

RESULTS = Path(__file__).parent / "results"
MAPS = ("T1F", "f", "kF")
SCENARIOS = {
    "af4-2d": dict(acceleration=4.0, mask_type="2d"),
    "af5-2d": dict(acceleration=5.0, mask_type="2d"),
    "af4-1d": dict(acceleration=4.0, mask_type="1d"),
    "af4-2d-drift": dict(acceleration=4.0, mask_type="2d", phase_drift=0.4),
}
QUADRATIC_GRID = [0.3, 1.0, 3.0]                      # × the preset's ρ
HUBER_GRID = [(s, d) for s in (1.0, 3.0, 10.0) for d in (0.05, 0.1, 0.2)]   # (× ρ, δ on T1F/f/I0 channels)


def small_roi_bias(maps: dict, reference: dict, tissue: np.ndarray, radius: int = 3, stride: int = 6) -> dict:
    """Mean |relative bias| (%) of ROI means against `reference` over in-plane disks of `radius`
    voxels lying wholly in `tissue`, centred on a grid of `stride` voxels."""
    Z, Y, X = tissue.shape
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = yy ** 2 + xx ** 2 <= radius ** 2
    rois = []
    for z in range(Z):
        for cy in range(radius, Y - radius, stride):
            for cx in range(radius, X - radius, stride):
                window = tissue[z, cy - radius:cy + radius + 1, cx - radius:cx + radius + 1]
                if window[disk].all():
                    rois.append((z, slice(cy - radius, cy + radius + 1), slice(cx - radius, cx + radius + 1)))
    out = {}
    for p in MAPS:
        biases = [abs(maps[p][r][disk].mean() / reference[p][r][disk].mean() - 1) * 100 for r in rois
                  if abs(reference[p][r][disk].mean()) > 0]
        out[p] = float(np.mean(biases)) if biases else float("nan")
    out["n_rois"] = len(rois)
    return out


def with_prior(config, scale: float, delta: float = 0.0):
    unroll = copy.deepcopy(config.unroll)
    unroll.map_smoothness = tuple(scale * r for r in config.unroll.map_smoothness)
    unroll.map_edge_scale = (delta, delta, delta, 0.0)
    return unroll


def classical(run, unroll_config):
    """Physical maps of the classical solver of the objective with `unroll_config`'s prior, and its seconds."""
    t = time.perf_counter()
    objective = RefinementObjective(run.physics, unroll_config)
    solver = copy.copy(run)
    solver.unrolled = UnrolledPGD(unroll_config)
    q, _ = classical_minimum(solver, objective)
    return run.physics.physical_maps(q), time.perf_counter() - t


def variant_run(run, config):
    """A copy of a stage-1 run whose stage 2 follows `config`: the same INR, a fresh refinement."""
    other = copy.copy(run)
    other.config = config
    other.unrolled = UnrolledPGD(config.unroll)
    other.objective = RefinementObjective(run.physics, config.unroll)
    other.params = {"stage1": [], "stage2": list(other.inr.parameters()) + list(other.unrolled.parameters())}
    other.history, other.timings, other.done = [], dict(run.timings), {}
    other.bar = type(run.bar)(disable=True)
    return other


def stage2_row(run, config):
    """Stage 2 of `config` on the run's stage-1 INR, which is restored afterwards (the paper's
    stage 2 trains it jointly)."""
    other = variant_run(run, config)
    saved = {k: v.detach().clone() for k, v in run.inr.state_dict().items()}
    t = time.perf_counter()
    final = train_refinement(other)
    seconds = time.perf_counter() - t
    run.inr.load_state_dict(saved)
    return other.physics.physical_maps(final), seconds


def paper_config(config):
    cfg = copy.deepcopy(config)
    u = cfg.unroll
    u.preconditioner, u.refine_phase, u.create_graph, u.warm_start_steps = "none", False, True, 0
    u.map_smoothness, u.map_edge_scale, u.image_phase_order, u.training = (0.0,) * 4, (0.0,) * 4, -1, "full"
    return cfg


def subject_rows(subject, config, choice=None) -> dict:
    """{method: (maps, seconds)} for one subject, all from one stage-1 INR. Without `choice` (a
    tuning subject): every grid point of the classical priors; with it: the tuned classical rows,
    the learned, self-supervised and paper rows."""
    run = setup(subject, config, progress_desc=subject.subject_id)
    train_inr(run)
    t1 = run.timings["stage1"]
    rows = {"inr-only": (run.physics.physical_maps(run.inr.map_channels().detach()), 0.0)}
    if choice is None:
        for s in QUADRATIC_GRID:
            rows[f"classical-quadratic@{s}"] = classical(run, with_prior(config, s))
        for s, d in HUBER_GRID:
            rows[f"classical-huber@{s},{d}"] = classical(run, with_prior(config, s, d))
        return {k: (v[0], t1 + v[1]) for k, v in rows.items()}
    rows["classical-quadratic"] = classical(run, with_prior(config, choice["quadratic_scale"]))
    rows["classical-huber"] = classical(run, with_prior(config, choice["huber_scale"], choice["huber_delta"]))
    rows["learned"] = stage2_row(run, config)
    ssdu = copy.deepcopy(config)
    ssdu.unroll.training = "self-supervised"
    rows["learned-ssdu"] = stage2_row(run, ssdu)
    rows["paper"] = stage2_row(run, paper_config(config))
    if subject.notes and "drift" in subject.notes[0]:
        shared = copy.deepcopy(config)
        shared.unroll.image_phase_order = -1
        rows["learned-shared-phase"] = stage2_row(variant_physics(run, shared), shared)
    return {k: (v[0], t1 + v[1]) for k, v in rows.items()}


def variant_physics(run, config):
    from refine_more.physics.scan import ScanPhysics
    other = copy.copy(run)
    other.physics = ScanPhysics(run.subject, config, run.physics.tissue.device)
    return other


def scores(maps, subject, full_fit, wm_gm) -> dict:
    s = score_maps(maps, subject.reference, wm_gm, params=MAPS, with_ssim=False)
    roi = small_roi_bias(maps, full_fit, wm_gm)
    return {**{p: s[p]["nrmse"] for p in MAPS}, **{f"roi_bias_{p}": roi[p] for p in MAPS}, "n_rois": roi["n_rois"]}


def fully_sampled_fit(subject, config):
    coils = torch.from_numpy(subject.coil_sens)
    images = zero_filled_images(torch.from_numpy(subject.reference["kspace_full"]), coils).numpy()
    return fit_images(images, subject.protocol, subject.b1, subject.tissue_mask, k_band=config.k_band)


def run_scenario(name, args, config) -> dict:
    sim = SimulationConfig(matrix=tuple(args.matrix), snr=args.snr, **SCENARIOS[name])
    base = args.first_seed
    subjects = [(f"sub-{i + 1:03d}", base + i) for i in range(args.tune + args.scored)]
    per_subject, tuning = [], {}
    choice = {}
    for i, (sid, seed) in enumerate(subjects):
        subject = simulate_subject(sid, sim, seed=seed)
        labels = subject.reference["labels"]
        wm_gm = (labels == 1) | (labels == 2)
        full_fit = fully_sampled_fit(subject, config)
        tune = i < args.tune
        if not tune and not choice:
            choice = choose(tuning)
            print(f"[{name}] tuned on {args.tune} subject(s): {choice}", flush=True)
        cfg = config
        rows = subject_rows(subject, cfg, None if tune else choice)
        for method, (maps, seconds) in rows.items():
            entry = {"subject": sid, "seed": seed, "method": method, "seconds": seconds,
                     **scores(maps, subject, full_fit, wm_gm)}
            (tuning.setdefault(method, []) if tune else per_subject).append(entry)
            if not tune:
                print(f"[{name}] {sid} {method}: " + " ".join(f"{p} {entry[p]:.2f}" for p in MAPS)
                      + f" ({seconds:.1f} s)", flush=True)
    summary = {}
    for method in dict.fromkeys(r["method"] for r in per_subject):
        rows = [r for r in per_subject if r["method"] == method]
        summary[method] = {k: float(np.mean([r[k] for r in rows])) for k in
                           (*MAPS, "seconds", *(f"roi_bias_{p}" for p in MAPS))}
    return {"summary": summary, "per_subject": per_subject, "tuning": {
        "subjects": [s for s, _ in subjects[:args.tune]], "chosen": choice,
        "grid": {m: {p: float(np.mean([r[p] for r in v])) for p in MAPS} for m, v in tuning.items()}}}


def choose(tuning: dict) -> dict:
    """The grid point of each classical prior with the lowest mean (T1F, f, kF) nRMSE."""
    def best(prefix):
        cands = {m: np.mean([np.mean([r[p] for p in MAPS]) for r in v]) for m, v in tuning.items() if m.startswith(prefix)}
        return min(cands, key=cands.get).split("@")[1]
    q = float(best("classical-quadratic@"))
    s, d = (float(x) for x in best("classical-huber@").split(","))
    return {"quadratic_scale": q, "huber_scale": s, "huber_delta": d}


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scen = list(result["summary"])
    fig, axes = plt.subplots(1, len(MAPS), figsize=(5 * len(MAPS), 4), squeeze=False)
    for ax, p in zip(axes[0], MAPS):
        methods = sorted({m for s in scen for m in result["summary"][s]})
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [result["summary"][s].get(m, {}).get(p, np.nan) for s in scen]
            ax.bar(np.arange(len(scen)) + j * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(scen)) + 0.4 - width / 2)
        ax.set_xticklabels(scen, rotation=20)
        ax.set_ylabel(f"{p} nRMSE (%)")
        ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--scored", type=int, default=4)
    ap.add_argument("--tune", type=int, default=1)
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--snr", type=float, default=200.0)
    ap.add_argument("--first-seed", type=int, default=5000)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--out", default=str(RESULTS / "refinement.json"))
    args = ap.parse_args()
    config = preset(args.preset)
    config.progress = False
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("summary", {})
    result.setdefault("scenarios", {})
    result["setup"] = {"matrix": args.matrix, "snr": args.snr, "preset": args.preset, "config_hash": config.hash(),
                       "first_seed": args.first_seed, "scored": args.scored, "tune": args.tune, "mask": "WM+GM"}
    for name in args.scenarios:
        t = time.perf_counter()
        scenario = run_scenario(name, args, config)
        result["summary"][name] = scenario["summary"]
        result["scenarios"][name] = {k: v for k, v in scenario.items() if k != "summary"}
        result["scenarios"][name]["wall_s"] = time.perf_counter() - t
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"| {name} | method | T1F % | f % | kF % | s | ROI bias T1F/f/kF % |")
        for m, r in scenario["summary"].items():
            print(f"| | {m} | {r['T1F']:.2f} | {r['f']:.2f} | {r['kF']:.2f} | {r['seconds']:.1f} | "
                  f"{r['roi_bias_T1F']:.2f}/{r['roi_bias_f']:.2f}/{r['roi_bias_kF']:.2f} |", flush=True)
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
