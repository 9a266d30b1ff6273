"""Why the product gains less over the LLR fit as the matrix grows (T1F / f: 0.52 / 0.66 × LLR at
12×64×64, 0.58 / 0.78 at 24×88×88, 0.73 / 0.88 at 48×176×176; issue "real size on CPU"): is the
prior's weight, set at 6×32×32, too weak for smaller voxels, or does the L-BFGS solve stop short?

`large`'s classical solve (the product's stage 2 at real size, from the LLR fit alone) on one
simulated subject (a seed outside every scored set), with the prior's weights × each factor and
the solve continued past its 32 iterations (each segment is a fresh `quasi_newton` call from where
the last ended: its first descent steps again, a new L-BFGS memory). The product's own factor at
this noise (decision 022, `prior_scale`) is recorded; the factors here multiply the tuned weights.
The LLR images are computed once and shared. The truth
only scores; nothing chooses by it here: the result is a measurement for a decision, not a tuner.
`--from-truth` also solves from the true maps (the LLR fit's values outside tissue and its phase):
where both starts end at the same maps, the objective's minimum, not the solve, sets the error.

    python benchmarks/prior_at_size.py [--matrix 24 88 88] [--coils 20] [--seed 7000]
                                       [--factors 1 2 4] [--steps 32 32] [--set KEY=VALUE]... [--from-truth] [--out FILE]

Writes benchmarks/results/prior_at_size.{json,md}; each point is written as soon as it is measured.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from refine_more.config import apply_overrides, preset
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.files.atomic import atomic_write_text
from refine_more.reconstruction.classical import noise_level, prior_scale
from refine_more.reconstruction.recon import setup
from refine_more.reconstruction.unrolled import quasi_newton

RESULTS = Path(__file__).parent / "results"


def markdown(doc: dict) -> str:
    llr = doc["llr_nrmse"]
    lines = [f"# Prior weight and solve length at {'×'.join(map(str, doc['matrix']))}, {doc['coils']} coils "
             f"(benchmarks/prior_at_size.py)", "",
             f"Seed {doc['seed']}, preset `large`{''.join(' --set ' + o for o in doc.get('overrides', []))}, ν/s = {doc['nu_over_s']:.3g}; LLR fit T1F / f / kF "
             f"{llr['T1F']:.2f} / {llr['f']:.2f} / {llr['kF']:.2f} % ({doc['llr_s']:.0f} s).", "",
             "| start | prior × | L-BFGS iterations | objective | T1F % | f % | kF % | T1F / f × LLR | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in doc["points"]:
        lines.append(f"| {p.get('start', 'llr')} | {p['factor']:g} | {p['lbfgs']} | {p['objective']:.6g} | {p['T1F']:.2f} | {p['f']:.2f} | "
                     f"{p['kF']:.2f} | {p['T1F'] / llr['T1F']:.2f} / {p['f'] / llr['f']:.2f} | {p['s']:.0f} |")
    return "\n".join(lines) + "\n"


def truth_channels(run, outside: torch.Tensor) -> torch.Tensor:
    """The simulated true maps as the refinement's channels inside tissue (`outside`'s elsewhere)."""
    ref = {name: torch.as_tensor(run.reference[name], dtype=outside.dtype) for name in ("I0", "T1F", "f", "kF")}
    ref["I0"] = ref["I0"] / run.physics.data_scale
    ref["k"] = ref["kF"] / ref["f"].clamp_min(1e-6)
    channels = run.physics.scaling.to_channels(ref)
    return torch.where(run.physics.tissue.bool()[None], channels, outside)


def save(doc: dict, out: Path) -> None:
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1))
    atomic_write_text(out.with_suffix(".md"), markdown(doc))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--matrix", type=int, nargs=3, default=[24, 88, 88])
    p.add_argument("--coils", type=int, default=20)
    p.add_argument("--seed", type=int, default=7000, help="outside the scored seeds (4000s, 5000s, 6000s)")
    p.add_argument("--factors", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--steps", type=int, nargs="+", default=[32, 32], help="L-BFGS iterations per segment")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of `large` (e.g. unroll.map_edge_scale=[0,0.34,0.34,0])")
    p.add_argument("--from-truth", action="store_true", help="also solve from the true maps (a diagnostic)")
    p.add_argument("--out", default=str(RESULTS / "prior_at_size"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.perf_counter()
    subject = simulate_subject(f"sub-{a.seed}", SimulationConfig(matrix=tuple(a.matrix), n_coils=a.coils,
                                                                 acceleration=4.0, mask_type="2d"), seed=a.seed)
    subject.reference.pop("kspace_full", None)      # as large as the data; only the maps score
    run = setup(subject, apply_overrides(preset("large"), ["progress=false", *a.set]), release_kspace=True)
    images, channels = run.llr()
    weight_factor, edge_factor = prior_scale(run)
    doc = {"matrix": a.matrix, "coils": a.coils, "seed": a.seed, "preset": "large", "overrides": a.set,
           "threads": a.threads, "llr_s": run.timings["llr"], "llr_nrmse": run._score(channels, ""),
           "nu_over_s": noise_level(run.physics, images), "product_prior_scale": weight_factor,
           "edge_scale_factor": edge_factor, "points": []}
    print(json.dumps({k: v for k, v in doc.items() if k != "points"}), flush=True)
    z0, tissue = run.physics.background_phase(images), run.physics.tissue
    starts = {"llr": run.objective.start(channels)}
    if a.from_truth:
        starts["truth"] = truth_channels(run, starts["llr"])
        doc["truth_nrmse"] = run._score(starts["truth"], "")
    for start, factor in ((s, f) for s in starts for f in a.factors):
        run.objective.set_prior_scale(factor, edge_factor)   # δ as the product sets it (no δ: no effect)
        q, z, done = starts[start], z0, 0
        for steps in a.steps:
            t = time.perf_counter()
            with torch.no_grad():
                q, z = quasi_newton(run.objective, q, z, tissue.to(q.dtype), steps)
            done += steps
            point = {"start": start, "factor": factor, "lbfgs": done, "s": time.perf_counter() - t,
                     "objective": float(run.objective.value(q, z)), **run._score(q, "")}
            doc["points"].append(point)
            print(json.dumps(point), flush=True)
            save(doc, out)
    doc["wall_s"] = time.perf_counter() - t0
    save(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
