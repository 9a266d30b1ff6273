"""The evidence for the QC thresholds (docs/decisions/017): the QC metrics of clean simulated
subjects (from scratch, adapted from the first one, and at lower SNR) against those of deliberately
broken ones (refine_more/evaluation/broken_inputs.py), each reconstructed by `reconstruct` exactly
as the product does.

    python benchmarks/qc_thresholds.py [--preset small] [--matrix 6 24 24] [--clean 6] [--broken 2]
                                       [--low-snr 20 10] [--seed 7000] [--snr 200] [--acc 4] [--phase-drift 0]
                                       [--out benchmarks/results/qc_thresholds_small.json]

Clean subjects: `--clean` seeds from `--seed` (SNR `--snr`, AF `--acc`, per-image phase drift
`--phase-drift` rad, 4 coils), each from scratch and adapted from the first one's seed state; one
more per `--low-snr` value.
Broken: each breakage on the first `--broken` clean subjects (coil maps from the next clean
subject). Writes the rows (status, reasons, scalar metrics, seconds) to JSON and a table to .md.
Correctness evidence, not a timing benchmark: times are recorded, not compared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from refine_more.config import preset
from refine_more.config.qc import judge
from refine_more.evaluation.broken_inputs import BREAKAGES, broken
from refine_more.evaluation.simulate import SimulationConfig, load_templates, simulate_subject
from refine_more.reconstruction.adaptation import SeedState
from refine_more.reconstruction.qc import SCALAR_METRICS
from refine_more.reconstruction.recon import reconstruct

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("objective_ratio", "model_excess", "objective_llr_images", "image_residual_ratio", "worst_image",
           "fraction_T1F_at_bounds", "fraction_f_at_one", "fraction_f_at_zero", "fraction_k_at_band_edges")


def _row(case: str, subject, result) -> dict:
    qc = result.qc
    row = {"case": case, "subject": subject.subject_id, "status": qc.status, "reasons": qc.reasons,
           "recon_s": result.timings["total"], "qc_s": result.timings["qc"],
           **{k: qc.metrics[k] for k in SCALAR_METRICS},
           "image_residuals": qc.metrics["image_residuals"], "image_residual_ratios": qc.metrics["image_residual_ratios"]}
    print(json.dumps({k: v for k, v in row.items() if k not in ("image_residuals", "image_residual_ratios")},
                     default=str), flush=True)
    return row


def _table(rows: list) -> str:
    def cell(v):
        return "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
    head = ["case", "subject", "status", *COLUMNS, "recon s", "QC s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([r["case"], r["subject"], r["status"], *(cell(r[c]) for c in COLUMNS),
                                        cell(r["recon_s"]), cell(r["qc_s"])]) + " |")
    return "\n".join(lines) + "\n"


def _reconstruct_all(args, config) -> tuple:
    """The rows of every case (see the module docstring) and the simulation settings."""
    templates = load_templates(2)
    sim = SimulationConfig(matrix=tuple(args.matrix), n_coils=4, snr=args.snr, acceleration=args.acc,
                           phase_drift=args.phase_drift)
    subjects = [simulate_subject(f"sub-{i + 1:03d}", sim, seed=args.seed + i, templates=templates)
                for i in range(max(args.clean, args.broken + 1))]
    rows, seed_state = [], None
    for i, subject in enumerate(subjects[:args.clean]):
        result = reconstruct(subject, config)
        rows.append(_row("clean", subject, result))
        if i == 0 and not args.no_adapted:
            seed_state = SeedState.from_result(result)
    for subject in subjects[:args.clean] if seed_state is not None else []:
        rows.append(_row("clean adapted", subject, reconstruct(subject, config, seed_state)))
    for snr in args.low_snr:
        subject = simulate_subject(f"sub-snr{int(snr)}", dataclasses.replace(sim, snr=snr), seed=args.seed + 500,
                                   templates=templates)
        rows.append(_row(f"clean SNR {snr:g}", subject, reconstruct(subject, config)))
    for i, subject in enumerate(subjects[:args.broken]):
        for breakage in BREAKAGES:
            bad = broken(subject, breakage, other=subjects[i + 1])
            rows.append(_row(breakage, subject, reconstruct(bad, config)))
    return rows, dataclasses.asdict(sim)


def _write(out: Path, rows: list, meta: dict, thresholds) -> None:
    """Every row judged against `thresholds` (the metrics do not depend on them), JSON and table."""
    for r in rows:
        r["status"], r["reasons"] = judge({k: r[k] for k in SCALAR_METRICS}, thresholds)
    clean = [r for r in rows if r["case"].startswith("clean")]
    summary = {c: {"clean_max": max((r[c] for r in clean if r[c] is not None), default=None),
                   **{b: [r[c] for r in rows if r["case"] == b] for b in BREAKAGES}}
               for c in COLUMNS if c != "worst_image"}
    out.write_text(json.dumps({**meta, "thresholds": vars(thresholds), "summary": summary, "rows": rows},
                              indent=1, default=float))
    out.with_suffix(".md").write_text(_table(rows))
    print(_table(rows))
    print(f"flagged: clean {sum(r['status'] == 'flagged' for r in clean)}/{len(clean)}, "
          f"broken {sum(r['status'] == 'flagged' for r in rows if r not in clean)}/{len(rows) - len(clean)}")
    print(json.dumps(summary, indent=1, default=lambda v: float(np.round(v, 4))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 24, 24])
    ap.add_argument("--clean", type=int, default=6)
    ap.add_argument("--broken", type=int, default=2)
    ap.add_argument("--low-snr", type=float, nargs="*", default=[20.0, 10.0])
    ap.add_argument("--seed", type=int, default=7000)
    ap.add_argument("--snr", type=float, default=200.0)
    ap.add_argument("--acc", type=float, default=4.0)
    ap.add_argument("--phase-drift", type=float, default=0.0)
    ap.add_argument("--no-adapted", action="store_true")
    ap.add_argument("--rejudge", action="store_true",
                    help="no reconstruction: judge the rows of --out again with the preset's thresholds now")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    config = preset(args.preset).replace(progress=False, device="cpu")
    out = Path(args.out or RESULTS / f"qc_thresholds_{args.preset}.json")
    if args.rejudge:
        stored = json.loads(out.read_text())
        rows, meta = stored.pop("rows"), {k: v for k, v in stored.items() if k not in ("thresholds", "summary")}
        for r in rows:   # results from before session 15: f near 0 or 1 (an upper bound of f at 1); f at 0 unknown
            if "fraction_f_at_one" not in r:
                r["fraction_f_at_one"], r["fraction_f_at_zero"] = r.pop("fraction_f_at_bounds", None), None
    else:
        t0 = time.time()
        rows, simulation = _reconstruct_all(args, config)
        meta = {"preset": args.preset, "simulation": simulation, "seed": args.seed, "wall_s": time.time() - t0}
    _write(out, rows, meta, config.qc)


if __name__ == "__main__":
    main()
