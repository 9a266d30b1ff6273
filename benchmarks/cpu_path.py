"""Does the CPU path keep the maps? `small` with each of its keys (docs/decisions/019), one row a
variant, on subjects that are not the scaling benchmark's, each reconstructed in this process.

    python benchmarks/cpu_path.py [--subjects 2] [--matrix 6 32 32] [--coils 12] [--first-seed 6100]
                                  [--variant NAME=KEY=VALUE,KEY=VALUE]...

Writes benchmarks/results/cpu_path.{json,md}: per variant, mean nRMSE per map over the subjects, the
mean seconds per stage and in all, and the ratio to the `small` row of the same run. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import load_config
from refine_more.evaluation.metrics import score_maps
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.files.atomic import atomic_write_text
from refine_more.reconstruction.recon import reconstruct

RESULTS = Path(__file__).parent / "results"
MAPS = ("I0", "T1F", "f", "kF")
VARIANTS = {   # the most telling first: the run saves after each
    "small": [],
    "both (1 image, 0.99)": ["coil_compression=0.99", "stage1_images=1"],
    "cpu path (1 image, 0.99, 5 learned)": ["coil_compression=0.99", "stage1_images=1", "iters_stage2=5"],
    "iters_stage2=5": ["iters_stage2=5"],
    "stage1_images=1": ["stage1_images=1"],
    "coil_compression=0.99": ["coil_compression=0.99"],
    "stage1_images=2": ["stage1_images=2"],
}


def run_variant(subjects, overrides, threads) -> dict:
    torch.set_num_threads(threads)
    config = load_config(None, "small", overrides + ["progress=false"])
    scores, times = [], []
    for subject in subjects:
        t0 = time.perf_counter()
        result = reconstruct(subject, config, track_reference=False)
        wall = time.perf_counter() - t0
        ref = {k: subject.reference[k] for k in MAPS}
        scores.append({k: v["nrmse"] for k, v in score_maps(result.maps, ref, result.tissue_mask, with_ssim=False).items()})
        times.append({"wall": wall, **{k: result.timings.get(k, 0.0) for k in ("setup", "stage1", "warm_start", "stage2")}})
    return {"overrides": overrides, "per_subject": scores,
            "nrmse": {m: float(np.mean([s[m] for s in scores])) for m in MAPS},
            "seconds": {k: float(np.mean([t[k] for t in times])) for k in times[0]}}


def markdown(doc) -> str:
    base = doc["variants"]["small"]
    lines = [f"# CPU path: `small` with each key ({doc['subjects']} subjects, {'×'.join(map(str, doc['matrix']))}, "
             f"{doc['coils']} coils, AF 4, seeds from {doc['first_seed']}; benchmarks/cpu_path.py)", "",
             "| variant | I0 | T1F | f | kF (nRMSE %) | stage 1 (s) | warm start (s) | stage 2 (s) | wall (s) | wall / small |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in doc["variants"].items():
        n, s = v["nrmse"], v["seconds"]
        lines.append(f"| {name} | {n['I0']:.2f} | {n['T1F']:.2f} | {n['f']:.2f} | {n['kF']:.2f} | {s['stage1']:.1f} "
                     f"| {s['warm_start']:.1f} | {s['stage2']:.1f} | {s['wall']:.1f} | {s['wall'] / base['seconds']['wall']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    p.add_argument("--coils", type=int, default=12)
    p.add_argument("--first-seed", type=int, default=6100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    p.add_argument("--out", default=str(RESULTS / "cpu_path"))
    p.add_argument("--merge", action="store_true", help="keep the variants already in --out (same subjects) and run the rest")
    a = p.parse_args(argv)
    cfg = SimulationConfig(matrix=tuple(a.matrix), n_coils=a.coils)
    subjects = [simulate_subject(f"sub-{i + 1:03d}", cfg, seed=a.first_seed + i) for i in range(a.subjects)]
    doc = {"subjects": a.subjects, "matrix": a.matrix, "coils": a.coils, "first_seed": a.first_seed,
           "threads": a.threads, "variants": {}}
    previous = json.loads(Path(a.out).with_suffix(".json").read_text()) if a.merge and Path(a.out).with_suffix(".json").exists() else None
    if previous:
        doc["variants"].update(previous["variants"])
    for name, overrides in VARIANTS.items():
        if (a.only and name not in a.only and name != "small") or name in doc["variants"]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        doc["variants"][name] = run_variant(subjects, overrides, a.threads)
        print(json.dumps(doc["variants"][name]["nrmse"]), json.dumps(doc["variants"][name]["seconds"]), flush=True)
        out = Path(a.out)
        atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1))
        atomic_write_text(out.with_suffix(".md"), markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
