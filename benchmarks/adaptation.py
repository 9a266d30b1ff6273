"""Adapted vs from-scratch reconstruction on a small synthetic cohort (paper §4.3, Fig. 6, Table S1).

Reconstructs the seed from scratch, then every other subject both from scratch and adapted from
the seed, in one process. The speedup is the time the adapted run needs to reach the from-scratch
run's *final* nRMSE, against the from-scratch run's total time (per map: T1F, f, kF).

When both runs converge to the same maps, "reach" compares two equal numbers and its outcome is
run-to-run noise. So each subject is also reconstructed from scratch a second time with another
random seed (`--no-noise-floor` skips it): the two scratch runs' final nRMSE ratio is the noise
floor of the comparison, and the speedup is also reported for reaching the scratch final within
`--tolerance` (default 1 %, relative).

    python benchmarks/adaptation.py [--subjects 4] [--matrix 6 32 32] [--preset small] [--first-seed 1000]
                                    [--set KEY=VALUE ...] [--tolerance 0.01] [--no-noise-floor] [--out FILE]

Writes benchmarks/results/adaptation.json (per subject: times per stage, final nRMSE, speedups,
and the logged history of every run) and adaptation.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from refine_more.reconstruction.adaptation import SeedState
from refine_more.config import apply_overrides, preset
from refine_more.files.names import SCORED_MAPS as SCORED
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, load_templates, simulate_subject

RESULTS = Path(__file__).parent / "results"


def time_to_reach(history, key, target):
    """Seconds (within the run) of the first logged iteration whose `key` ≤ target; None if never."""
    for h in history:
        if key in h and h[key] <= target:
            return h["seconds"]
    return None


def compare(scratch, adapted, tolerance: float = 0.01, repeat=None) -> dict:
    """Per map: final nRMSE of both runs, the adapted run's time to reach the scratch final (strictly
    and within `tolerance`), the speedups, and with `repeat` (a second scratch run, another seed)
    the scratch-vs-scratch ratio, the comparison's noise floor."""
    row = {"scratch_total_s": scratch.timings["total"], "adapted_total_s": adapted.timings["total"],
           "scratch_timings": scratch.timings, "adapted_timings": adapted.timings,
           "scratch_iterations": scratch.iterations, "adapted_iterations": adapted.iterations}
    for p in SCORED:
        key = f"nrmse_{p}"
        final_scratch = scratch.history[-1][key]
        final_adapted = adapted.history[-1][key]
        reach = time_to_reach(adapted.history, key, final_scratch)
        reach_tol = time_to_reach(adapted.history, key, final_scratch * (1 + tolerance))
        # when scratch itself first comes within the tolerance of its own final: a schedule that
        # stopped there would have given the same maps (what a stop-on-plateau rule could save)
        scratch_settled = time_to_reach(scratch.history, key, final_scratch * (1 + tolerance))
        # the other direction: how long scratch needs to reach the adapted run's final quality
        reach_back = time_to_reach(scratch.history, key, final_adapted)
        row[p] = {"scratch_final_nrmse": final_scratch, "adapted_final_nrmse": final_adapted,
                  "quality_ratio": final_adapted / final_scratch,
                  "adapted_time_to_reach_s": reach,
                  "speedup": (scratch.timings["total"] / reach) if reach else None,
                  "adapted_time_to_reach_within_tolerance_s": reach_tol,
                  "speedup_within_tolerance": (scratch.timings["total"] / reach_tol) if reach_tol else None,
                  "scratch_time_to_own_final_within_tolerance_s": scratch_settled,
                  "speedup_against_settled_scratch": (scratch_settled / reach_tol) if reach_tol else None,
                  "scratch_time_to_reach_adapted_final_s": reach_back,
                  "speedup_at_adapted_quality": (reach_back / adapted.timings["total"]) if reach_back else None}
        if repeat is not None:
            row[p]["scratch_repeat_final_nrmse"] = repeat.history[-1][key]
            row[p]["scratch_repeat_ratio"] = repeat.history[-1][key] / final_scratch
    return row


def plot(path, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.2 * len(runs)), squeeze=False)
    for i, (sid, scratch, adapted) in enumerate(runs):
        for label, res, style in (("scratch", scratch, "-"), ("adapted", adapted, "--")):
            t = [h["seconds"] for h in res.history]
            axes[i, 0].semilogy(t, [h["loss"] for h in res.history], style, label=f"{label} total loss")
            for p in SCORED:
                axes[i, 1].plot(t, [h[f"nrmse_{p}"] for h in res.history], style, label=f"{label} {p}")
        axes[i, 0].set_title(f"{sid}: loss vs time", fontsize=9)
        axes[i, 1].set_title(f"{sid}: nRMSE (%) vs time", fontsize=9)
        axes[i, 1].set_ylim(0, 40)
        for ax in axes[i]:
            ax.set_xlabel("seconds")
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--subjects", type=int, default=4, help="seed + targets")
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--first-seed", type=int, default=1000,
                    help="subject i is simulated with seed first_seed + i (0: the cohort `refine-more demo` simulates)")
    ap.add_argument("--warm", action="store_true", help="warm-start the spatial hashes from the seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for seed, scratch and adapted runs, e.g. --set unroll.warm_start_steps=0 "
                         "--set k_band=[22,24] (repeatable)")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="relative tolerance of the second speedup: reach ≤ (1 + tol) × the scratch final")
    ap.add_argument("--no-noise-floor", action="store_true",
                    help="skip the second from-scratch run (another seed) per subject")
    ap.add_argument("--out", default=str(RESULTS / "adaptation.json"))
    args = ap.parse_args()

    config = preset(args.preset)
    config.progress = False
    config.log_every = 5
    config.adapt.warm_spatial_hashes = args.warm
    config = apply_overrides(config, args.set)
    sim = SimulationConfig(matrix=tuple(args.matrix), n_coils=4)
    templates = load_templates(2)
    subjects = [simulate_subject(f"sub-{i + 1:03d}", sim, seed=args.first_seed + i, templates=templates) for i in range(args.subjects)]

    t0 = time.perf_counter()
    seed_result = reconstruct(subjects[0], config)
    seed_state = SeedState.from_result(seed_result).to_numpy_dict()
    print(f"seed {subjects[0].subject_id}: {seed_result.timings['total']:.1f} s")
    rows, runs, histories = {}, [], {}
    for subject in subjects[1:]:
        scratch = reconstruct(subject, config)
        adapted = reconstruct(subject, config, seed_state=seed_state)
        repeat = None if args.no_noise_floor else reconstruct(subject, config.replace(seed=config.seed + 1))
        rows[subject.subject_id] = compare(scratch, adapted, args.tolerance, repeat)
        histories[subject.subject_id] = {"scratch": scratch.history, "adapted": adapted.history,
                                         **({"scratch_repeat": repeat.history} if repeat else {})}
        runs.append((subject.subject_id, scratch, adapted))
        r = rows[subject.subject_id]
        print(subject.subject_id, {p: (round(r[p]["speedup"] or 0, 2), round(r[p]["speedup_within_tolerance"] or 0, 2),
                                       round(r[p]["quality_ratio"], 4), round(r[p].get("scratch_repeat_ratio", 0), 4))
                                   for p in SCORED},
              f"scratch {r['scratch_total_s']:.1f} s, adapted {r['adapted_total_s']:.1f} s", flush=True)
    summary = {"tolerance": args.tolerance}
    for p in SCORED:
        speedups = [rows[s][p]["speedup"] for s in rows]
        within = [rows[s][p]["speedup_within_tolerance"] for s in rows]
        summary[p] = {"median_speedup": float(np.median([s or 0.0 for s in speedups])),
                      "all_reached": all(s is not None for s in speedups),
                      "min_speedup_within_tolerance": min(s or 0.0 for s in within),
                      "all_reached_within_tolerance": all(s is not None for s in within),
                      "min_speedup_against_settled_scratch": min(rows[s][p]["speedup_against_settled_scratch"] or 0.0 for s in rows),
                      "max_quality_ratio": max(rows[s][p]["quality_ratio"] for s in rows),
                      "median_speedup_at_adapted_quality": float(np.median(
                          [rows[s][p]["speedup_at_adapted_quality"] or 0.0 for s in rows]))}
        if not args.no_noise_floor:
            ratios = [rows[s][p]["scratch_repeat_ratio"] for s in rows]
            summary[p]["scratch_repeat_ratio_range"] = [min(ratios), max(ratios)]
    out = {"config": config.to_dict(), "config_hash": config.hash(), "matrix": args.matrix, "first_seed": args.first_seed,
           "seed_total_s": seed_result.timings["total"], "subjects": rows, "summary": summary,
           "wall_s": time.perf_counter() - t0, "histories": histories}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=float))
    plot(Path(args.out).with_suffix(".png"), runs)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
