"""Every subject right, or flagged (issue 24): the product at scale, per scenario, on the cohort driver.

Per scenario, N subjects are simulated with seeds fixed before the run (`--first-seed` + i: the
anatomy, coils, noise and mask vary with the seed; none is excluded), then reconstructed by the
cohort driver in mode `both` (each subject from scratch, then adapted from the first subject's
scratch run: the seed), on a local Ray over both cores; a rerun resumes (the driver skips what is
done, the baselines' scores are cached per subject). Rows:

- `zero-filled`: the voxel-wise fit of the zero-filled images;
- `llr`: the voxel-wise fit of the locally low-rank images (the classical anchor);
- `inr-only`: the stage-1 INR's own maps of the scratch run (the cohort's `inr_nrmse_*` columns);
- `refine-more`, `refine-more-adapted`: the product, scratch and adapted.

A failure is a T1F or f nRMSE above the subject's own LLR fit's, or above 2× the scenario's median
for that method. `flagged`: QC said so (`qc_status`); `failures_unflagged` is what matters.

    python benchmarks/robustness.py [--subjects 16] [--preset small] [--scenarios af4-2d ...]
                                    [--work DIR] [--num-cpus 2] [--set KEY=VALUE]...

Writes benchmarks/results/robustness.{json,md,png} (`--out`). Run it alone (two torch processes on
two cores slow each other down by an order of magnitude); `--subjects 2 --preset tiny` checks the
plumbing in minutes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MAPS = ("I0", "T1F", "f", "kF")
METHODS = ("zero-filled", "llr", "inr-only", "refine-more", "refine-more-adapted")
SCENARIOS = {   # SimulationConfig keys; "phantom": the six-vial phantom (evaluation/phantom.py)
    "af4-2d": dict(acceleration=4.0, mask_type="2d"),
    "af5-2d": dict(acceleration=5.0, mask_type="2d"),
    "af4-1d": dict(acceleration=4.0, mask_type="1d"),
    "af4-2d-drift": dict(acceleration=4.0, mask_type="2d", phase_drift=0.4),
    "af4-2d-snr50": dict(acceleration=4.0, mask_type="2d", snr=50.0),
    "phantom": dict(acceleration=4.0),
}


def simulate(scenario: str, n: int, first_seed: int, matrix, coils: int, data: Path) -> Path:
    """The scenario's subjects as HDF5 files plus a manifest (skipped when the manifest exists)."""
    import pandas as pd

    from refine_more.files.subject import write_subject
    manifest = data / "manifest.parquet"
    if manifest.exists():
        return manifest
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sid, seed = f"sub-{i + 1:03d}", first_seed + i
        if scenario == "phantom":
            from refine_more.evaluation.phantom import PhantomConfig, simulate_phantom
            subject = simulate_phantom(sid, PhantomConfig(matrix=tuple(matrix), n_coils=coils,
                                                          acceleration=SCENARIOS[scenario]["acceleration"]), seed=seed)
        else:
            from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
            subject = simulate_subject(sid, SimulationConfig(matrix=tuple(matrix), n_coils=coils, **SCENARIOS[scenario]),
                                       seed=seed)
        path = data / f"{sid}.h5"
        write_subject(path, subject)
        rows.append({"subject_id": sid, "path": str(path.resolve()), "seed": seed})
    pd.DataFrame(rows).to_parquet(manifest)
    return manifest


def baselines(path: Path, k_band, cache: Path) -> dict:
    """{method: {"nrmse": {map: %}, "seconds": s}} of the zero-filled and LLR fits (cached)."""
    if cache.exists():
        return json.loads(cache.read_text())
    import torch

    from refine_more.baselines.fitting import fit_images
    from refine_more.baselines.llr import llr_reconstruct
    from refine_more.evaluation.metrics import score_maps
    from refine_more.files.subject import read_subject
    from refine_more.physics.coils import coil_maps_for
    from refine_more.physics.operators import zero_filled_images
    from refine_more.physics.tissue import derive_tissue_mask

    subject = read_subject(path)
    coils = coil_maps_for(subject)
    tissue = derive_tissue_mask(subject)
    ref = {k: subject.reference[k] for k in MAPS if k in subject.reference}
    out = {}
    for method in ("zero-filled", "llr"):
        t = time.perf_counter()
        if method == "zero-filled":
            images = zero_filled_images(torch.from_numpy(subject.kspace), torch.from_numpy(coils)).numpy()
        else:
            images = llr_reconstruct(subject.kspace, coils, subject.mask)[0].numpy()
        maps = fit_images(images, subject.protocol, subject.b1, tissue, k_band=tuple(k_band))
        scores = score_maps({k: maps[k] for k in ref}, ref, tissue, with_ssim=False)
        out[method] = {"nrmse": {k: float(v["nrmse"]) for k, v in scores.items()}, "seconds": time.perf_counter() - t}
    cache.write_text(json.dumps(out))
    return out


def per_subject_table(scenario: str, manifest: Path, out: Path, k_band, qc) -> list:
    """One record per (subject, method): nRMSE per map, seconds, QC status judged again against `qc`
    (today's thresholds and checks, as the driver does on resuming)."""
    import pandas as pd

    from cohort.results import rejudge

    subjects = pd.read_parquet(manifest)
    results = pd.read_parquet(out / "results.parquet")
    records = []
    for s in subjects.itertuples():
        base = baselines(Path(s.path), k_band, out / f"baselines-{s.subject_id}.json")
        for method, b in base.items():
            records.append({"scenario": scenario, "subject": s.subject_id, "seed": int(s.seed), "method": method,
                            "nrmse": b["nrmse"], "seconds": b["seconds"], "qc_status": None})
        for mode, method in (("scratch", "refine-more"), ("adapted", "refine-more-adapted")):
            row = results[(results.subject_id == s.subject_id) & (results["mode"] == mode)]
            if row.empty or row.iloc[0].status != "ok":
                records.append({"scenario": scenario, "subject": s.subject_id, "seed": int(s.seed), "method": method,
                                "nrmse": None, "seconds": None, "qc_status": "failed"})
                continue
            r = pd.Series(rejudge(row.iloc[0].to_dict(), qc))
            records.append({"scenario": scenario, "subject": s.subject_id, "seed": int(s.seed), "method": method,
                            "nrmse": {m: float(r[f"nrmse_{m}"]) for m in MAPS if f"nrmse_{m}" in r},
                            "seconds": float(r.total_s), "qc_status": r.qc_status,
                            "qc_reasons": r.qc_reasons, "warm_start_from": r.get("warm_start_from"),
                            "prior_scale": r.get("prior_scale"), "config_hash": r.config_hash})
            if mode == "scratch" and "inr_nrmse_T1F" in r:
                records.append({"scenario": scenario, "subject": s.subject_id, "seed": int(s.seed), "method": "inr-only",
                                "nrmse": {m: float(r[f"inr_nrmse_{m}"]) for m in MAPS if f"inr_nrmse_{m}" in r},
                                "seconds": float(r.stage1_s), "qc_status": None})
    return records


def summarize(records: list) -> dict:
    """summary[scenario][method] = {n, median, p90, max, failures, flagged, failures_unflagged, mean_s}."""
    llr = {(r["scenario"], r["subject"]): r["nrmse"] for r in records if r["method"] == "llr"}
    summary = {}
    for scenario in dict.fromkeys(r["scenario"] for r in records):
        summary[scenario] = {}
        for method in METHODS:
            rs = [r for r in records if r["scenario"] == scenario and r["method"] == method]
            if not rs:
                continue
            ok = [r for r in rs if r["nrmse"]]
            stats = {q: {m: float(f(np.array([r["nrmse"][m] for r in ok]))) for m in MAPS if ok and m in ok[0]["nrmse"]}
                     for q, f in (("median", np.median), ("p90", lambda a: np.percentile(a, 90)), ("max", np.max))}
            med = stats["median"]
            failures, flagged, unflagged = [], 0, []
            for r in rs:
                bad = r["nrmse"] is None or any(
                    r["nrmse"][m] > llr[(scenario, r["subject"])][m] or r["nrmse"][m] > 2 * med[m] for m in ("T1F", "f"))
                is_flagged = r.get("qc_status") in ("flagged", "failed")
                flagged += is_flagged
                if bad:
                    failures.append(r["subject"])
                    if not is_flagged:
                        unflagged.append(r["subject"])
            summary[scenario][method] = {
                "n": len(rs), **stats, "failures": len(failures), "failed_subjects": failures,
                "flagged": flagged if method.startswith("refine-more") else None,
                "failures_unflagged": len(unflagged), "unflagged_subjects": unflagged,
                "mean_s": float(np.mean([r["seconds"] for r in ok])) if ok else None}
    return summary


def markdown(summary: dict, meta: dict) -> str:
    lines = ["# Robustness (benchmarks/robustness.py)", "",
             f"{meta['subjects']} subjects per scenario (seeds {meta['first_seed']}…), matrix "
             f"{'×'.join(map(str, meta['matrix']))}, {meta['coils']} coils, preset `{meta['preset']}` "
             f"{' '.join(meta['overrides'])}; nRMSE % in tissue. A failure: T1F or f above the subject's own "
             "LLR fit, or above 2× the scenario median.", "",
             "| scenario | method | n | median T1F / f | p90 T1F / f | max T1F / f | failures | flagged | unflagged failures | mean s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    hashes = meta.get("scenario_config_hashes", {})
    for sc, methods in summary.items():
        for m, s in methods.items():
            def pair(q, s=s):
                return f"{s[q].get('T1F', float('nan')):.2f} / {s[q].get('f', float('nan')):.2f}" if s[q] else "–"
            flagged = "–" if s["flagged"] is None else s["flagged"]
            mean_s = "–" if s["mean_s"] is None else f"{s['mean_s']:.1f}"
            lines.append(f"| {sc} | {m} | {s['n']} | {pair('median')} | {pair('p90')} | {pair('max')} | {s['failures']} "
                         f"| {flagged} | {s['failures_unflagged']} | {mean_s} |")
    if hashes:
        lines += ["", "Config hash of the product's runs per scenario: " + "; ".join(
            f"{sc} {', '.join(h) or '–'}" for sc, h in hashes.items()) + "."]
    return "\n".join(lines) + "\n"


def strip_plot(records: list, path: Path) -> None:
    """One dot per subject: T1F and f nRMSE per scenario and method; flagged results ringed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in records))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(scenarios)), 7), sharex=True)
    colors = dict(zip(METHODS, ("#999999", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")))
    rng = np.random.default_rng(0)
    for ax, m in zip(axes, ("T1F", "f")):
        for i, sc in enumerate(scenarios):
            for j, method in enumerate(METHODS):
                rs = [r for r in records if r["scenario"] == sc and r["method"] == method and r["nrmse"]]
                x = i + (j - 2) * 0.16 + rng.uniform(-0.04, 0.04, len(rs))
                y = [r["nrmse"][m] for r in rs]
                ax.scatter(x, y, s=14, color=colors[method], label=method if i == 0 else None, alpha=0.8)
                ringed = [(xx, yy) for xx, yy, r in zip(x, y, rs) if r.get("qc_status") == "flagged"]
                if ringed:
                    ax.scatter(*zip(*ringed), s=70, facecolors="none", edgecolors="k", linewidths=1.2,
                               label="QC flagged" if i == 0 and j == 3 else None)
        ax.set_yscale("log")
        ax.set_ylabel(f"{m} nRMSE (%)")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xticks(range(len(scenarios)), scenarios)
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--first-seed", type=int, default=5000, help="seed of sub-001; the others follow (5002 is sub-003)")
    ap.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    ap.add_argument("--matrix", type=int, nargs=3, default=[6, 32, 32])
    ap.add_argument("--phantom-matrix", type=int, nargs=3, default=[6, 48, 48])
    ap.add_argument("--coils", type=int, default=4)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--work", default="runs/robustness", help="subjects and cohort outputs (kept: reruns resume)")
    ap.add_argument("--out", default=str(RESULTS / "robustness"))
    ap.add_argument("--report-only", action="store_true",
                    help="tabulate the scenarios' existing outputs (each row keeps its own config hash), run nothing")
    a = ap.parse_args(argv)

    from cohort.driver import run_cohort
    from refine_more.config import load_config
    from refine_more.files.atomic import atomic_write_text

    config = load_config(None, a.preset, a.set + ["progress=false"])
    work, out = Path(a.work), Path(a.out)
    records, seconds = [], {}
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    for sc in a.scenarios:
        t0 = time.time()
        matrix = a.phantom_matrix if sc == "phantom" else a.matrix
        print(f"[{time.strftime('%H:%M:%S')}] {sc}: {a.subjects} subjects, {'×'.join(map(str, matrix))}", flush=True)
        manifest = simulate(sc, a.subjects, a.first_seed, matrix, a.coils, work / sc / "data")
        if not a.report_only:
            run_cohort(manifest, work / sc / "out", mode="both", config=config, num_cpus=a.num_cpus, progress=True,
                       tracking=False)
        records += per_subject_table(sc, manifest, work / sc / "out", config.k_band, config.qc)
        # a tabulation keeps the wall time of the run that made the outputs
        seconds[sc] = previous.get("scenario_wall_s", {}).get(sc) if a.report_only else time.time() - t0
        summary = summarize(records)
        meta = {"subjects": a.subjects, "first_seed": a.first_seed, "matrix": a.matrix, "phantom_matrix": a.phantom_matrix,
                "coils": a.coils, "preset": a.preset, "overrides": a.set, "config_hash": config.hash(),
                "scenario_config_hashes": {s: sorted({r["config_hash"] for r in records if r["scenario"] == s
                                                      and r.get("config_hash")}) for s in seconds},
                "scenario_wall_s": seconds}
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out.with_suffix(".json"), json.dumps({**meta, "summary": summary, "records": records},
                                                               indent=1, default=str))
        atomic_write_text(out.with_suffix(".md"), markdown(summary, meta))
        strip_plot(records, out.with_suffix(".png"))
        print("\n".join(x for x in markdown({sc: summary[sc]}, meta).splitlines() if x.startswith(f"| {sc} |")),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
