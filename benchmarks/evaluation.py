"""Cohort evaluation like the paper's Table 1 and Fig. 4, on a simulated cohort.

Every subject is reconstructed by the zero-filled fit, the LLR fit, REFINE-MORE from scratch (and
its INR-only maps Q⁽⁰⁾), and, for all but the seed (sub-001), REFINE-MORE adapted from the seed.
Scores: nRMSE and SSIM in WM + GM, mean ± SD over subjects; agreement: Bland–Altman of eight ROI
means per subject (WM and GM in the four quadrants of the axial plane) against the truth.

    python benchmarks/evaluation.py [--subjects 4] [--matrix 6 32 32] [--preset small] [--first-seed 1000]
                                    [--acc 4] [--no-adapted] [--zero-filled-start] [--tag TAG]
                                    [--scratch-subjects N] [--save-seed-state FILE] [--seed-state FILE]
                                    [--set KEY=VALUE ...] [--out FILE]

`--zero-filled-start` adds the refinement started from the zero-filled fit instead of the INR (the
paper's Fig. S4 ablation; refine_more/reconstruction/zero_filled_start.py).

Writes benchmarks/results/evaluation.json, evaluation_table.md and evaluation_bland_altman.png (for
--out X.json: X_table.md and X_bland_altman.png beside it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from refine_more.reconstruction.adaptation import SeedState
from refine_more.config import apply_overrides, preset
from refine_more.evaluation.cohort_tables import bland_altman_png, cohort_agreement, cohort_table, subject_scores
from refine_more.baselines.fitting import fit_images
from refine_more.baselines.llr import llr_reconstruct
from refine_more.physics.operators import zero_filled_images
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, load_templates, simulate_subject
from refine_more.reconstruction.zero_filled_start import refine_from_zero_filled

RESULTS = Path(__file__).parent / "results"
PARAMS = ("I0", "T1F", "f", "kF")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--acc", type=float, default=4.0)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--first-seed", type=int, default=1000)
    ap.add_argument("--no-adapted", action="store_true")
    ap.add_argument("--scratch-subjects", type=int, default=None,
                    help="REFINE-MORE from scratch on the first N subjects only (default: all; the seed always), "
                         "for schedules too long to run twice per subject on a small machine")
    ap.add_argument("--zero-filled-start", action="store_true",
                    help="also the refinement started from the zero-filled fit instead of the INR (Fig. S4)")
    ap.add_argument("--save-seed-state", metavar="FILE", help="keep the seed's state (safetensors) for later runs")
    ap.add_argument("--seed-state", metavar="FILE",
                    help="adapt from this saved seed state instead of reconstructing sub-001 as the seed "
                         "(e.g. adaptation settings at the paper's schedule without its hour-long seed); every subject is then adapted")
    ap.add_argument("--tag", default="", help="suffix of the REFINE-MORE rows' names, e.g. 'paper'")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(RESULTS / "evaluation.json"))
    args = ap.parse_args()

    config = apply_overrides(preset(args.preset), args.set)
    config.progress = False
    sim = SimulationConfig(matrix=tuple(args.matrix), acceleration=args.acc, n_coils=4)
    templates = load_templates(2)
    methods = (["zf-fit", "llr-fit", "inr-only", "refine-more"] + ([] if args.no_adapted else ["refine-more-adapted"])
               + (["zero-filled-start"] if args.zero_filled_start else []))
    per_subject = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    stage_seconds = {"refine-more": [], "refine-more-adapted": []}     # per subject: stage timings, iterations
    seed_state = SeedState.load(args.seed_state).to_numpy_dict() if args.seed_state else None

    def stages(result):  # seconds per stage and iterations run, as the JSON keeps them
        return {**result.timings, **{f"iterations_{k}": v for k, v in result.iterations.items()}}

    t_run = time.perf_counter()
    for i in tqdm(range(args.subjects), desc="subjects"):
        subject = simulate_subject(f"sub-{i + 1:03d}", sim, seed=args.first_seed + i, templates=templates)
        ref = {p: subject.reference[p] for p in PARAMS}
        labels = subject.reference["labels"]
        k_band = config.k_band

        def record(method, maps, t):
            per_subject[method].append(subject_scores(maps, ref, labels))
            seconds[method].append(t)
            tqdm.write(f"{subject.subject_id} {method}: {t:.1f} s")   # long runs show where they are

        t = time.perf_counter()
        zf = zero_filled_images(torch.from_numpy(subject.kspace), torch.from_numpy(subject.coil_sens)).numpy()
        record("zf-fit", fit_images(zf, subject.protocol, subject.b1, subject.tissue_mask, k_band=k_band), time.perf_counter() - t)
        t = time.perf_counter()
        llr = llr_reconstruct(subject.kspace, subject.coil_sens, subject.mask)[0].numpy()
        record("llr-fit", fit_images(llr, subject.protocol, subject.b1, subject.tissue_mask, k_band=k_band), time.perf_counter() - t)
        if args.zero_filled_start:
            zf_start = refine_from_zero_filled(subject, config)
            record("zero-filled-start", zf_start.maps, zf_start.timings["total"])
        if args.scratch_subjects is None or i < args.scratch_subjects or (i == 0 and not args.seed_state):
            scratch = reconstruct(subject, config)
            record("inr-only", scratch.maps_init, scratch.timings["stage1"])
            record("refine-more", scratch.maps, scratch.timings["total"])
            stage_seconds["refine-more"].append(stages(scratch))
        if args.no_adapted:
            continue
        if seed_state is None:
            seed = SeedState.from_result(scratch)                       # sub-001 is the seed
            if args.save_seed_state:
                seed.save(args.save_seed_state)
            seed_state = seed.to_numpy_dict()
        else:
            adapted = reconstruct(subject, config, seed_state=seed_state)
            record("refine-more-adapted", adapted.maps, adapted.timings["total"])
            stage_seconds["refine-more-adapted"].append(stages(adapted))

    per_subject = {m: v for m, v in per_subject.items() if v}
    if args.tag:  # e.g. "refine-more (paper)", "refine-more-adapted (paper)"
        rename = lambda m: f"{m} ({args.tag})" if m not in ("zf-fit", "llr-fit") else m
        per_subject = {rename(m): v for m, v in per_subject.items()}
        seconds = {rename(m): v for m, v in seconds.items()}
        stage_seconds = {rename(m): v for m, v in stage_seconds.items()}
    rows, table = cohort_table(per_subject)
    agreement = cohort_agreement(per_subject)
    out = {"config": config.to_dict(), "config_hash": config.hash(), "matrix": args.matrix, "acceleration": args.acc,
           "subjects": args.subjects, "first_seed": args.first_seed, "wall_s": time.perf_counter() - t_run,
           "scratch_subjects": args.scratch_subjects or args.subjects, "threads": torch.get_num_threads(),
           "seconds_mean": {m: sum(v) / len(v) for m, v in seconds.items() if v},
           "stage_seconds": stage_seconds,
           "table": rows, "bland_altman": {m: {p: {k: v for k, v in a.items() if k not in ("mean", "diff")}
                                                for p, a in per.items()} for m, per in agreement.items()},
           "roi_points": {m: {p: {"mean": a["mean"], "diff": a["diff"]} for p, a in per.items()} for m, per in agreement.items()}}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    ba_lines = ["| method | " + " | ".join(f"{p} bias [95 % LoA]" for p in ("T1F", "f", "kF")) + " |", "|---|---|---|---|"]
    for m, per in agreement.items():
        ba_lines.append(f"| {m} | " + " | ".join(f"{per[p]['bias']:.3g} [{per[p]['loa_low']:.3g}, {per[p]['loa_high']:.3g}]"
                                                 for p in ("T1F", "f", "kF")) + " |")
    text = (f"{args.subjects} subjects, {tuple(args.matrix)}, AF {args.acc:g}, preset {args.preset}; nRMSE/SSIM in WM+GM, "
            f"mean ± SD over subjects (from scratch: {min(args.scratch_subjects or args.subjects, args.subjects)}, "
            f"adapted: {args.subjects - 1} targets)\n\n{table}\n\nBland–Altman of ROI means "
            f"(up to 8 per subject) against the truth\n\n" + "\n".join(ba_lines) + "\n\nmean seconds per subject: "
            + ", ".join(f"{m} {s:.1f}" for m, s in out["seconds_mean"].items()) + "\n")
    out_path.with_name(f"{out_path.stem}_table.md").write_text(text)
    bland_altman_png(out_path.with_name(f"{out_path.stem}_bland_altman.png"), agreement,
                     title=f"Bland–Altman of ROI means, {args.subjects} simulated subjects, AF {args.acc:g}")
    print(text)


if __name__ == "__main__":
    main()
