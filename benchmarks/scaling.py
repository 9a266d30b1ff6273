"""Cost curve: how time, memory and quality grow with the matrix (issue: real size on CPU).

For each size, two subjects are simulated (8 images, AF 4, 2-D mask; 20 coils where they fit), then,
each in its own child process so that every peak RSS is its own:
- `scratch`: `reconstruct` of the first subject with the CPU preset (what `refine-more recon` runs),
  its seed state saved;
- `adapted`: the second subject adapted from that seed state (what a cohort's adapted task runs);
- `llr`: the LLR fit of each subject (the classical anchor: `refine-more fit --method llr`).
and the FFT floor: one pass of A and Aᴴ over all images with the acquired coils.

    python benchmarks/scaling.py [--sizes 6x32x32 12x64x64 24x88x88 48x176x176] [--coils 20]
                                 [--preset small] [--set KEY=VALUE]... [--threads 2] [--no-adapted]
    python benchmarks/scaling.py --from-cohort DIR [DIR...] [--rss RSS.json] [--threads 2]

`--from-cohort` makes rows of a finished `refine-more cohort run` (the real product path: Ray,
MLflow, reports; its seed's scratch run and every adapted run), adding the LLR fit and the FFT
floor of the seed's subject; peak RSS from a sampler's JSON (`{"peak_per_process_GiB": {...}}`,
the largest Ray task process), since a Ray worker's RSS is not the driver's.

Writes benchmarks/results/scaling.{json,md,png}; each row is saved as soon as it is complete, and a
rerun skips the rows already there for the same preset and overrides (delete the file to redo).
Run it alone: two torch processes on two cores slow each other down by an order of magnitude.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
MAPS = ("I0", "T1F", "f", "kF")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------
# child steps (each in its own process: `python scaling.py _step NAME JSON_ARGS`)
# ---------------------------------------------------------------------------------------------

def step_simulate(a: dict) -> dict:
    from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
    from refine_more.files.subject import write_subject

    t0 = time.perf_counter()
    for i, path in enumerate(a["paths"]):
        cfg = SimulationConfig(matrix=tuple(a["matrix"]), n_coils=a["coils"], acceleration=4.0)
        write_subject(path, simulate_subject(f"sub-{i + 1:03d}", cfg, seed=a["seed"] + i))
    return {"simulate_s": time.perf_counter() - t0, "simulate_peak_rss_GiB": _peak_rss_gib()}


PROBE = ["iters_stage1=20", "iters_stage2=1", "unroll.warm_start_steps=8", "adapt.iters_stage1=20",
         "adapt.iters_stage2=1"]


def _config(a: dict):
    from refine_more.config import load_config
    return load_config(None, a["preset"], a["overrides"] + (PROBE if a.get("probe") else []) + ["progress=false"])


def extrapolated_wall(rec: dict, full) -> float:
    """A probe run's wall time at the preset's own schedule: set-up, then each stage's measured
    seconds per iteration times its iterations; the warm start by its iterations (the 16 descent
    steps of the L-BFGS solver counted like its iterations: an estimate)."""
    t, it = rec["timings_s"], rec["iterations"]
    n1, n2 = (full.adapt.iters_stage1, full.adapt.iters_stage2) if rec["adapted"] else (full.iters_stage1, full.iters_stage2)
    warm = t.get("warm_start", 0.0) * (16 + full.unroll.warm_start_steps) / (16 + 8) if full.unroll.warm_start_steps else 0.0
    learned = (t["stage2"] - t.get("warm_start", 0.0)) / max(it["stage2"], 1)
    return t["setup"] + t["stage1"] / max(it["stage1"], 1) * n1 + warm + learned * n2


def _scores(maps, subject, tissue) -> dict:
    from refine_more.evaluation.metrics import score_maps
    ref = {k: subject.reference[k] for k in MAPS}
    return {k: round(float(v["nrmse"]), 3) for k, v in score_maps(maps, ref, tissue, with_ssim=False).items()}


def step_recon(a: dict) -> dict:
    import torch

    from refine_more.files.subject import read_subject
    from refine_more.reconstruction.adaptation import SeedState
    from refine_more.reconstruction.recon import reconstruct

    torch.set_num_threads(a["threads"])
    config = _config(a)
    subject = read_subject(a["subject"], load_reference="maps")
    seed = SeedState.load(a["seed_state"]) if a.get("adapted") else None
    t0 = time.perf_counter()
    result = reconstruct(subject, config, seed, track_reference=False)
    wall = time.perf_counter() - t0
    if not a.get("adapted"):
        SeedState.from_result(result).save(a["seed_state"])
    it = result.iterations
    t = result.timings
    per_it = {"stage1": t["stage1"] / max(it["stage1"], 1)}
    if it["stage2"]:
        per_it["stage2"] = (t["stage2"] - t.get("warm_start", 0.0)) / it["stage2"]
    return {"wall_s": wall, "timings_s": t, "iterations": it, "s_per_iteration": per_it, "adapted": bool(a.get("adapted")),
            "peak_rss_GiB": _peak_rss_gib(), "nrmse": _scores(result.maps, subject, result.tissue_mask),
            "inr_nrmse": _scores(result.maps_init, subject, result.tissue_mask),
            "config_hash": result.config_hash}


def step_llr(a: dict) -> dict:
    import torch

    from refine_more.baselines.fitting import fit_images
    from refine_more.baselines.llr import llr_reconstruct
    from refine_more.files.subject import read_subject
    from refine_more.physics.b1 import b1_for
    from refine_more.physics.coils import coil_maps_for
    from refine_more.physics.tissue import derive_tissue_mask

    torch.set_num_threads(a["threads"])
    subject = read_subject(a["subject"], load_reference="maps")
    t0 = time.perf_counter()
    coils = coil_maps_for(subject)
    tissue = derive_tissue_mask(subject)
    b1, _ = b1_for(subject, coils, tissue)
    kspace = subject.kspace
    if a.get("coil_compression"):       # the baseline gets the method's virtual coils too
        from refine_more.physics.coil_compression import svd_compression
        cc = svd_compression(kspace, a["coil_compression"], mask=subject.mask)
        kspace, coils = cc.kspace(kspace), cc.coil_maps(coils)
    images = llr_reconstruct(kspace, coils, subject.mask)[0].numpy()
    maps = fit_images(images, subject.protocol, b1, tissue, k_band=tuple(a["k_band"]))
    return {"llr_s": time.perf_counter() - t0, "llr_peak_rss_GiB": _peak_rss_gib(),
            "llr_nrmse": _scores({k: maps[k] for k in MAPS}, subject, tissue)}


def step_fft_floor(a: dict) -> dict:
    import torch

    from refine_more.files.subject import read_subject
    from refine_more.physics.operators import MultiCoilCartesian

    torch.set_num_threads(a["threads"])
    subject = read_subject(a["subject"], load_reference=False)
    A = MultiCoilCartesian(torch.from_numpy(subject.coil_sens), torch.from_numpy(subject.mask))
    x = torch.randn(A.ishape, dtype=torch.complex64)
    A.adjoint(A(x))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        A.adjoint(A(x))
        times.append(time.perf_counter() - t0)
    return {"fft_floor_s": float(np.median(times))}


STEPS = {"simulate": step_simulate, "recon": step_recon, "llr": step_llr, "fft_floor": step_fft_floor}


def run_step(name: str, args: dict, log) -> dict:
    """One step in a child process; its JSON answer (the last line of its stdout)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.get("threads", 1)))
    log(f"  {name} …")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "_step", name, json.dumps(args)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"step {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"  {name} done in {time.perf_counter() - t0:.0f} s")
    return out


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def measure_size(matrix, coils, images, a, work: Path, log) -> list:
    from refine_more.config import load_config

    config = load_config(None, a.preset, a.set)
    paths = [str(work / f"sub-{i + 1:03d}.h5") for i in range(2 if a.adapted else 1)]
    base = {"threads": a.threads, "preset": a.preset, "overrides": a.set, "probe": a.probe}
    sim = run_step("simulate", {**base, "matrix": matrix, "coils": coils, "paths": paths, "seed": a.seed}, log)
    floor = run_step("fft_floor", {**base, "subject": paths[0]}, log)
    seed_state = str(work / "seed_state.safetensors")
    rows = []
    for mode, path in (("scratch", paths[0]),) + ((("adapted", paths[1]),) if a.adapted else ()):
        rec = run_step("recon", {**base, "subject": path, "seed_state": seed_state, "adapted": mode == "adapted"}, log)
        llr = run_step("llr", {**base, "subject": path, "k_band": list(config.k_band),
                               "coil_compression": config.coil_compression}, log)
        row = {"matrix": list(matrix), "coils": coils, "images": images, "mode": mode, "preset": a.preset,
               "overrides": a.set, "threads": a.threads, "voxels_images_coils": int(np.prod(matrix)) * images * coils,
               **{k: rec[k] for k in ("wall_s", "peak_rss_GiB", "s_per_iteration", "nrmse", "inr_nrmse",
                                      "timings_s", "iterations", "config_hash")},
               "schedule": "probe" if a.probe else "preset", "complete": not a.probe,
               "wall_s_at_preset_schedule": extrapolated_wall(rec, config) if a.probe else rec["wall_s"],
               "fft_floor_s": floor["fft_floor_s"],
               "over_fft_floor": {s: v / floor["fft_floor_s"] for s, v in rec["s_per_iteration"].items()},
               "llr_nrmse": llr["llr_nrmse"], "llr_s": llr["llr_s"],
               "ratio_to_llr": {m: rec["nrmse"][m] / llr["llr_nrmse"][m] for m in MAPS},
               "simulate_s": sim["simulate_s"], "simulate_peak_rss_GiB": sim["simulate_peak_rss_GiB"],
               "load_average": list(os.getloadavg())}
        rows.append(row)
        log(f"  {mode}: {row['wall_s']:.0f} s, {row['peak_rss_GiB']:.2f} GiB, T1F {row['nrmse']['T1F']:.2f} % "
            f"(LLR {row['llr_nrmse']['T1F']:.2f} %)")
    return rows


def write_outputs(doc: dict, out: Path) -> None:
    from refine_more.files.atomic import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(doc, indent=1, default=float))
    atomic_write_text(out.with_suffix(".md"), markdown(doc["rows"]))
    plot(doc["rows"], out.with_suffix(".png"))


def markdown(rows) -> str:
    lines = ["# Cost curve (benchmarks/scaling.py)", "",
             "Wall: measured end to end, or (schedule `probe`, in italics) the probe's per-iteration costs "
             "extrapolated to the preset's schedule; its nRMSE is the probe's, not the preset's.", "",
             "| matrix | coils | mode | preset | schedule | threads | wall (s) | peak RSS (GiB) | s/it stage 1 "
             "| warm start (s) | s/it stage 2 | FFT floor (s) | × floor (1 / 2) | T1F / f nRMSE % | LLR T1F / f % |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["s_per_iteration"]
        x = r["over_fft_floor"]
        wall = f"{r['wall_s']:.0f}" if r["complete"] else f"*{r['wall_s_at_preset_schedule']:.0f}*"
        lines.append(f"| {'×'.join(map(str, r['matrix']))} | {r['coils']} | {r['mode']} | {r['preset']} "
                     f"{' '.join(r['overrides'])} | {r['schedule']} | {r['threads']} | {wall} | {r['peak_rss_GiB']:.2f} "
                     f"| {s.get('stage1', 0):.3g} | {r['timings_s'].get('warm_start', 0):.0f} | {s.get('stage2', 0):.3g} "
                     f"| {r['fft_floor_s']:.3g} "
                     f"| {x.get('stage1', 0):.2g} / {x.get('stage2', 0):.2g} "
                     f"| {r['nrmse']['T1F']:.2f} / {r['nrmse']['f']:.2f} "
                     f"| {r['llr_nrmse']['T1F']:.2f} / {r['llr_nrmse']['f']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for mode, marker in (("scratch", "o"), ("adapted", "s")):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["voxels_images_coils"])
        if not rs:
            continue
        n = [r["voxels_images_coils"] for r in rs]
        axes[0].loglog(n, [r["wall_s_at_preset_schedule"] for r in rs], marker=marker, label=f"{mode} wall (preset schedule)")
        for stage in ("stage1", "stage2"):
            axes[1].loglog(n, [r["s_per_iteration"].get(stage, np.nan) for r in rs], marker=marker, label=f"{mode} {stage}")
        if mode == "scratch":
            axes[1].loglog(n, [r["fft_floor_s"] for r in rs], "k--", label="FFT floor (A + Aᴴ)")
        axes[2].loglog(n, [r["peak_rss_GiB"] for r in rs], marker=marker, label=mode)
        for m in ("T1F", "f"):
            axes[3].semilogx(n, [r["nrmse"][m] for r in rs], marker=marker, label=f"{mode} {m}")
            if mode == "scratch":
                axes[3].semilogx(n, [r["llr_nrmse"][m] for r in rs], ls=":", marker="x", label=f"LLR {m}")
    for ax, title in zip(axes, ("wall time (s)", "s per iteration", "peak RSS (GiB)", "nRMSE (%)")):
        ax.set_title(title)
        ax.set_xlabel("voxels × images × coils")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _row_peak(r, sampled) -> dict:
    """The task's own peak (results.parquet's peak_rss_GiB, cohort/memory.py) when the run measured it;
    else the sampler's largest Ray task process, which a reused worker shares between its tasks."""
    own = getattr(r, "peak_rss_GiB", None)
    if own is not None and np.isfinite(own):
        return {"peak_rss_GiB": float(own), "peak_rss_note": "the task's own peak (VmHWM reset at its start)"}
    return {"peak_rss_GiB": sampled, "peak_rss_note": "largest Ray task process over the whole run (sampled every 2 s)"}


def rows_from_cohort(cohorts: list, rss_json, threads: int, log) -> list:
    """Rows of finished cohort runs (a seed's run and, e.g., a `--seed-from` run adapting from it):
    one per ok (subject, mode), each with the LLR fit of its subject (a run's own LLR start when it
    recorded one, `llr_nrmse_*`: the same fit; else computed here with the run's virtual coils) and
    the FFT floor."""
    import h5py
    import pandas as pd

    from refine_more.config import ReconConfig

    frames = []
    for cohort in cohorts:
        one = pd.read_parquet(cohort / "results.parquet")
        one["cohort_dir"] = str(cohort)
        frames.append(one)
    df = pd.concat(frames, ignore_index=True)
    if "llr_nrmse_T1F" in df:      # rows that carry the LLR fit first: the others of the subject reuse it
        df = df.assign(_has=df["llr_nrmse_T1F"].notna()).sort_values("_has", ascending=False, kind="stable")
    cohort = cohorts[0]
    config = ReconConfig.from_dict(json.loads((cohort / "config.json").read_text())["config"])
    peak = None
    if rss_json:
        per = json.loads(Path(rss_json).read_text())["peak_per_process_GiB"]
        tasks = [v for k, v in per.items() if "ray::" in k]
        peak = max(tasks) if tasks else None
    llr, floor, rows = {}, {}, []
    for r in df[df.status == "ok"].itertuples():
        with h5py.File(r.subject_path, "r") as fh:
            T, C, *shape = fh["kspace"].shape           # the spec's (T, C, Z, Y, X)
        base = {"threads": threads, "subject": r.subject_path}
        from_run = {m: float(v) for m in MAPS if pd.notna(v := getattr(r, f"llr_nrmse_{m}", None))}
        if r.subject_path not in llr and len(from_run) >= 3:   # the run's own LLR start: the same fit
            llr[r.subject_path] = {"llr_nrmse": from_run, "llr_s": None, "source": "the run's LLR start"}
        if r.subject_path not in llr:
            llr[r.subject_path] = _cached(cohort / f"scaling-llr-{r.subject_id}.json", lambda: run_step(
                "llr", {**base, "k_band": list(config.k_band), "coil_compression": config.coil_compression}, log))
        if r.subject_path not in floor:
            floor[r.subject_path] = _cached(cohort / f"scaling-fft-floor-{r.subject_id}.json",
                                            lambda: run_step("fft_floor", base, log))
        per_it = {"stage1": r.stage1_s / max(r.iterations_stage1, 1), "stage2": r.stage2_s / max(r.iterations_stage2, 1)}
        nrmse = {m: round(float(getattr(r, f"nrmse_{m}")), 3) for m in MAPS}
        ll = llr[r.subject_path]["llr_nrmse"]
        fl = floor[r.subject_path]["fft_floor_s"]
        rows.append({
            "matrix": [int(n) for n in shape], "coils": int(C), "images": int(T), "mode": r.mode, "subject": r.subject_id,
            "is_seed": bool(r.is_seed), "preset": "large" if config.hash() == _preset_hash("large") else "custom",
            "overrides": [], "threads": threads, "voxels_images_coils": int(np.prod(shape)) * int(T) * int(C),
            "wall_s": float(r.total_s), "task_wall_s": float(r.wall_s), "qc_s": float(r.qc_s),
            **_row_peak(r, peak),
            "s_per_iteration": per_it, "s_per_iteration_note": "stage 2 includes the LLR images and the warm start",
            "timings_s": {"setup": r.setup_s, "stage1": r.stage1_s, "stage2": r.stage2_s, "total": r.total_s, "qc": r.qc_s},
            "iterations": {"stage1": int(r.iterations_stage1), "stage2": int(r.iterations_stage2)},
            "nrmse": nrmse, "llr_nrmse": ll, "llr_s": llr[r.subject_path]["llr_s"],
            "ratio_to_llr": {m: nrmse[m] / ll[m] for m in MAPS if m in ll}, "fft_floor_s": fl,
            "over_fft_floor": {k: v / fl for k, v in per_it.items()}, "config_hash": r.config_hash,
            "qc_status": r.qc_status, "warm_start_from": getattr(r, "warm_start_from", None),
            "schedule": "preset", "complete": True, "wall_s_at_preset_schedule": float(r.total_s),
            "source": f"refine-more cohort run ({r.cohort_dir})", "load_average": list(os.getloadavg())})
        log(f"  {r.subject_id}/{r.mode}: {r.total_s:.0f} s, T1F {nrmse['T1F']:.2f} % (LLR {ll['T1F']:.2f} %)")
    return rows


def _cached(path: Path, compute) -> dict:
    """A step's answer kept beside the cohort (`python scaling.py _step NAME ARGS > path` also fills it)."""
    if path.exists():
        return json.loads(path.read_text())
    out = compute()
    path.write_text(json.dumps(out, default=float))
    return out


def _preset_hash(name: str) -> str:
    from refine_more.config import preset
    return preset(name).hash()


def parse_size(text: str) -> tuple:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected ZxYxX")
    return parts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_size, nargs="+",
                   default=[(6, 32, 32), (12, 64, 64), (24, 88, 88), (48, 176, 176)])
    p.add_argument("--coils", type=int, default=20)
    p.add_argument("--images", type=int, default=8, help="the simulator's protocol has 8")
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=4000)
    p.add_argument("--no-adapted", dest="adapted", action="store_false")
    p.add_argument("--probe", action="store_true",
                   help="time a short schedule (PROBE) and extrapolate the wall time to the preset's schedule")
    p.add_argument("--out", default=str(RESULTS / "scaling"))
    p.add_argument("--work", default=None, help="folder for the simulated subjects (default: a temporary one)")
    p.add_argument("--from-cohort", nargs="+", default=None, metavar="DIR", help="rows from finished cohort runs' folders")
    p.add_argument("--rss", default=None, help="with --from-cohort: a process RSS sampler's JSON")
    a = p.parse_args(argv)
    out = Path(a.out)
    doc = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"rows": []}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    if a.from_cohort:
        rows = rows_from_cohort([Path(d) for d in a.from_cohort], a.rss, a.threads, log)
        keys = {(tuple(r["matrix"]), r["mode"], r["subject"], r["config_hash"]) for r in rows}
        doc["rows"] = [r for r in doc["rows"]
                       if (tuple(r["matrix"]), r["mode"], r.get("subject"), r["config_hash"]) not in keys] + rows
        doc["rows"].sort(key=lambda r: (r["preset"], " ".join(r["overrides"]), r["voxels_images_coils"], r["mode"]))
        write_outputs(doc, out)
        return 0

    for matrix in a.sizes:
        done = [r for r in doc["rows"] if r["matrix"] == list(matrix) and r["preset"] == a.preset
                and r["overrides"] == a.set and r["coils"] == a.coils and r["schedule"] == ("probe" if a.probe else "preset")]
        if done:
            log(f"{matrix}: already measured, skipped")
            continue
        log(f"{matrix}, {a.coils} coils, preset {a.preset} {' '.join(a.set)}")
        with tempfile.TemporaryDirectory(dir=a.work) as work:
            doc["rows"].extend(measure_size(matrix, a.coils, a.images, a, Path(work), log))
        doc["rows"].sort(key=lambda r: (r["preset"], " ".join(r["overrides"]), r["voxels_images_coils"], r["mode"]))
        write_outputs(doc, out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        print(json.dumps(STEPS[sys.argv[2]](json.loads(sys.argv[3])), default=float))
        sys.exit(0)
    sys.exit(main())
