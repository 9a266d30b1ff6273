"""Fan-out efficiency of the cohort driver (issue 16.3), and what 100 GPUs would ask of it.

The same tiny cohort (``--subjects`` simulated subjects, default 16, 6 × 24 × 24, 4 coils, preset
``tiny``, mode ``scratch``: every task independent, no serial seed) runs through
:func:`cohort.driver.run_cohort` in THIS process (the driver) on a local Ray of 1 and then 2 CPUs,
one CPU per task, MLflow on (one sqlite store for all runs, made by a warm-up run: the driver's
logging is part of its load). Ray is started before each run and its start timed apart (a
cluster is up before its jobs). Order 1, 2 repeated ``--repeats`` times; the fastest of each is kept.

- efficiency = t1 / (2 · t2) on the run's wall time (manifest read to summary written), the
  issue's definition, target >= 0.9; also on the task span alone (first task start to last end);
- the machine's ceiling: the same tasks (``subject_run.run_subject``) in a plain warm process pool
  of 1 and 2 processes, no Ray, driver or MLflow (``--no-ceiling`` skips it), and the Ray
  efficiency as a fraction of it;
- the driver's CPU share: ``getrusage(RUSAGE_SELF)`` user + system of this process over the wall
  (Ray's own daemons are children, not counted);
- per subject, measured: MLflow writes of a child run (params, metric values, tags, artifacts and
  their bytes), bytes the task reads (the subject file, twice: its sha256 for resume and the read)
  and writes, bytes the driver reads; the seed state's bytes through the object store (one
  adapted run, ``--no-adapted`` skips it) and, from parameter counts, at the paper's preset.

Extrapolated to ``--gpus`` GPUs (``--gpus-per-node``) at ``--gpu-adapted-s`` seconds per adapted
subject at the paper's size (default 400 s: the 33 min scratch estimate on the H200 in
CHANGELOG.md over the ~5× adaptation speedup): subjects per second, the driver's share of a core,
MLflow writes per second, shared-storage reads per second and the seed state's object-store
traffic. Run it ALONE on the machine (two torch processes on two cores slow each other down):

    python benchmarks/fanout.py [--subjects 16] [--repeats 2] [--out benchmarks/results/fanout.json]

Writes ``fanout.json`` and ``fanout.md`` beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "fanout.json"
MATRIX, COILS = (6, 24, 24), 4
PAPER = {"T": 8, "C": 20, "Z": 48, "Y": 176, "X": 176}


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar")).split()[1])


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def one_run(manifest: Path, out: Path, workers: int, tracking_uri: str, mode: str = "scratch") -> dict:
    """One cohort run on a local Ray of ``workers`` CPUs started first (a cluster is up before its
    jobs; its start is timed apart); times, the driver's CPU and reads."""
    import ray

    from cohort.driver import run_cohort
    from refine_more.config import preset

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    try:
        cpu0, io0, t0 = _cpu(), _rchar(), time.perf_counter()
        rep = run_cohort(manifest, out, mode=mode, config=preset("tiny"), cpus_per_task=1, progress=False,
                         tracking_uri=tracking_uri, log=lambda *a: None)
        wall, cpu, rchar = time.perf_counter() - t0, _cpu() - cpu0, _rchar() - io0
    finally:
        ray.shutdown()
    rows = [r for r in rep.rows if r["status"] == "ok"]
    assert len(rows) == len(rep.rows), [r.get("error") for r in rep.rows]
    span = max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)
    return {"workers": workers, "mode": mode, "wall_s": wall, "ray_start_s": ray_start, "task_span_s": span,
            "task_wall_sum_s": sum(r["wall_s"] for r in rows), "driver_cpu_s": cpu, "driver_cpu_share": cpu / wall,
            "driver_read_bytes": rchar, "n_tasks": len(rows), "seed_puts": rep.seed_puts,
            "parent_run_id": rep.parent_run_id}


def _plain_worker_init():
    import torch
    torch.set_num_threads(1)            # one CPU per task, as Ray gives each task


def _plain_task(args):
    from cohort.subject_run import run_subject
    path, out, sid, cfg = args
    return run_subject(path, out, "scratch", cfg, None, subject_id=sid)["wall_s"]


def plain_run(manifest: Path, out: Path, workers: int) -> dict:
    """The machine's ceiling: the same tasks (``subject_run.run_subject``) in a plain process pool
    of ``workers`` warm processes (imports done first), no Ray, no driver bookkeeping, no MLflow.
    What two such processes lose against one is the hardware's share of the inefficiency."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cohort.manifest import read_manifest
    from refine_more.config import preset

    cfg = {**preset("tiny").to_dict(), "progress": False}
    jobs = [(e.path, str(out), e.subject_id, cfg) for e in read_manifest(manifest)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_plain_worker_init) as pool:
        list(pool.map(_plain_task, [(p, str(out / "warmup"), s, c) for p, _, s, c in jobs[:workers]]))
        t0 = time.perf_counter()
        walls = list(pool.map(_plain_task, jobs))
        wall = time.perf_counter() - t0
    return {"workers": workers, "wall_s": wall, "task_wall_sum_s": sum(walls)}


def mlflow_per_child(uri: str, parent: str) -> dict:
    """Mean writes of one child (subject) run of ``parent``: params, tags, metric values, artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]

    def artifacts(run_id, path=None):
        out = []
        for a in client.list_artifacts(run_id, path):
            out += artifacts(run_id, a.path) if a.is_dir else [a.file_size or 0]
        return out

    per = []
    for r in children:
        values = sum(len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics)
        arts = artifacts(r.info.run_id)
        per.append({"params": len(r.data.params), "tags": len(r.data.tags), "metric_keys": len(r.data.metrics),
                    "metric_values": values, "artifacts": len(arts), "artifact_bytes": sum(arts)})
    return {k: statistics.mean(p[k] for p in per) for k in per[0]} | {"child_runs": len(per)} if per else {}


def seed_state_bytes(out: Path, seed: str) -> dict:
    """The seed state measured in an adapted run (safetensors on disk, the numpy dict that is
    ray.put once) and, from parameter counts, at the paper's preset (float32)."""
    from cohort.subject_run import load_seed_state_dict
    from refine_more.config import preset
    from refine_more.describe import model_sizes

    d = load_seed_state_dict(out, seed)
    sizes = model_sizes(preset("paper"))
    tiny = model_sizes(preset("tiny"))
    return {"tiny_put_bytes": int(sum(v.nbytes for v in d.values())),
            "tiny_file_bytes": (out / seed / "scratch" / "seed_state.safetensors").stat().st_size,
            "tiny_from_parameters_bytes": 4 * (tiny["inr_parameters"] + tiny["unet_parameters"]),
            "paper_from_parameters_bytes": 4 * (sizes["inr_parameters"] + sizes["unet_parameters"])}


def extrapolate(res: dict, gpus: int, per_node: int, adapted_s: float) -> dict:
    """What ``gpus`` GPUs at ``adapted_s`` per subject ask of the driver, MLflow, storage, object store."""
    rate = gpus / adapted_s                                             # subjects per second
    two = res["best"]["2"]
    n = two["n_tasks"]
    kspace = PAPER["T"] * PAPER["C"] * PAPER["Z"] * PAPER["Y"] * PAPER["X"] * 8        # complex64
    coils = PAPER["C"] * PAPER["Z"] * PAPER["Y"] * PAPER["X"] * 8
    ml = res.get("mlflow_per_subject", {})
    writes = ml.get("params", 0) + ml.get("tags", 0) + ml.get("metric_values", 0) + ml.get("artifacts", 0)
    seed = res.get("seed_state", {}).get("paper_from_parameters_bytes")
    nodes = -(-gpus // per_node)
    return {"gpus": gpus, "gpus_per_node": per_node, "nodes": nodes, "adapted_s_per_subject": adapted_s,
            "subjects_per_s": rate, "subjects_per_hour": rate * 3600,
            "driver_cpu_s_per_subject": two["driver_cpu_s"] / n,
            "driver_core_share": rate * two["driver_cpu_s"] / n,
            "mlflow_writes_per_subject": writes, "mlflow_writes_per_s": rate * writes,
            "mlflow_artifact_bytes_per_s": rate * ml.get("artifact_bytes", 0),
            "paper_subject_bytes": kspace + coils,
            "storage_read_bytes_per_s": rate * 2 * (kspace + coils),     # sha256 pass + the read
            "storage_read_bytes_per_s_page_cached": rate * (kspace + coils),
            "seed_state_paper_bytes": seed,
            "object_store_seed_bytes_total": None if seed is None else seed * nodes}


def markdown(res: dict) -> str:
    b1, b2, x = res["best"]["1"], res["best"]["2"], res["extrapolation"]
    gb = 1e9
    lines = [
        "# Fan-out efficiency (`python benchmarks/fanout.py`)", "",
        f"{res['subjects']} subjects {MATRIX}, {COILS} coils, preset tiny, mode scratch, one CPU per task, "
        f"MLflow sqlite on; {res['machine']}; best of {res['repeats']}; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in res['load_average_before'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in res['load_average_after'])} after.", "",
        "| workers | Ray start (s) | wall (s) | task span (s) | driver CPU (s) | driver CPU share |",
        "|---|---|---|---|---|---|",
        *[f"| {b['workers']} | {b['ray_start_s']:.1f} | {b['wall_s']:.1f} | {b['task_span_s']:.1f} | "
          f"{b['driver_cpu_s']:.1f} | {100 * b['driver_cpu_share']:.1f} % |" for b in (b1, b2)], "",
        f"**efficiency t1 / (2 t2) = {res['efficiency']:.3f}** (target 0.9); on the task span alone "
        f"{res['efficiency_task_span']:.3f}; all runs: {res['efficiency_all']}.", "",
        *([f"The machine's ceiling, the same tasks in a plain process pool (no Ray, no driver, no MLflow): "
           f"{pp['best_wall_s']['1']:.1f} s with 1 process, {pp['best_wall_s']['2']:.1f} s with 2, efficiency "
           f"**{pp['efficiency']:.3f}**; the Ray driver reaches **{res['efficiency_of_ceiling']:.3f}** of it.", ""]
          if (pp := res.get("plain_pool")) else []),
        f"## {x['gpus']} GPUs ({x['nodes']} nodes of {x['gpus_per_node']}), {x['adapted_s_per_subject']:.0f} s per "
        "adapted subject at the paper's size", "",
        f"- {x['subjects_per_hour']:.0f} subjects per hour ({x['subjects_per_s']:.3f}/s);",
        f"- driver: {x['driver_cpu_s_per_subject']:.2f} CPU s per subject here, so "
        f"{100 * x['driver_core_share']:.1f} % of one core;",
        f"- MLflow: {x['mlflow_writes_per_subject']:.0f} writes per subject (params, tags, metric values, "
        f"artifacts), {x['mlflow_writes_per_s']:.1f} writes/s, artifacts {x['mlflow_artifact_bytes_per_s'] / 1e6:.2f} MB/s "
        "at the tiny size (maps and figures grow with the matrix);",
        f"- shared storage: {x['paper_subject_bytes'] / gb:.2f} GB per subject (k-space + coil maps), read twice by "
        f"the task (sha256 for resume, then the data): {x['storage_read_bytes_per_s'] / gb:.2f} GB/s, "
        f"{x['storage_read_bytes_per_s_page_cached'] / gb:.2f} GB/s when the second read hits the page cache;",
    ]
    if x["seed_state_paper_bytes"]:
        s = res["seed_state"]
        lines.append(f"- seed state: {s['tiny_put_bytes']:,} bytes put once here (tiny; "
                     f"{s['tiny_from_parameters_bytes']:,} from parameter counts), {x['seed_state_paper_bytes'] / 1e6:.0f} MB "
                     f"at the paper's preset: {x['object_store_seed_bytes_total'] / gb:.2f} GB through the object store, "
                     "one copy per node, once per cohort.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--gpus", type=int, default=100)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-adapted-s", type=float, default=400.0)
    ap.add_argument("--no-adapted", action="store_true", help="skip the adapted run (seed-state bytes)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the plain process-pool runs (no Ray)")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    if args.subjects < 8 or args.repeats < 1:
        ap.error("--subjects must be >= 8 and --repeats >= 1")
    from refine_more.simulate import SimulationConfig, simulate_cohort

    work = Path(args.data or tempfile.mkdtemp(prefix="fanout"))
    load_before = os.getloadavg()          # the runs are only meaningful on an otherwise idle machine
    try:
        manifest = simulate_cohort(work / "data", args.subjects, SimulationConfig(matrix=MATRIX, n_coils=COILS),
                                   seed=3, progress=False)
        uri = f"sqlite:///{work.resolve()}/mlflow.db"     # one store, as a team server would be: made once
        one_run(manifest, work / "warmup", 2, uri)        # imports, the store's tables, page cache
        runs = []
        for rep in range(args.repeats):
            for w in (1, 2):
                runs.append(one_run(manifest, work / f"out{w}_{rep}", w, uri))
                print(json.dumps(runs[-1]), flush=True)
        plain = []
        if not args.no_ceiling:
            for rep in range(args.repeats):
                for w in (1, 2):
                    plain.append(plain_run(manifest, work / f"plain{w}_{rep}", w))
                    print(json.dumps(plain[-1]), flush=True)
        last = work / f"out2_{args.repeats - 1}"
        ml = mlflow_per_child(uri, runs[-1]["parent_run_id"])
        outputs = statistics.mean(_folder_bytes(d / "scratch") for d in last.glob("sub-*"))
        best = {str(w): min((r for r in runs if r["workers"] == w), key=lambda r: r["wall_s"]) for w in (1, 2)}
        pairs = list(zip(runs[0::2], runs[1::2]))
        res = {"subjects": args.subjects, "matrix": MATRIX, "coils": COILS, "preset": "tiny", "mode": "scratch",
               "repeats": args.repeats, "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "runs": runs,
               "best": best,
               "efficiency": best["1"]["wall_s"] / (2 * best["2"]["wall_s"]),
               "efficiency_task_span": best["1"]["task_span_s"] / (2 * best["2"]["task_span_s"]),
               "efficiency_all": [round(a["wall_s"] / (2 * b["wall_s"]), 3) for a, b in pairs],
               "driver_cpu_share": best["2"]["driver_cpu_share"],
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "mlflow_per_subject": ml,
               "per_subject_bytes": {"subject_file": (work / "data" / "sub-001.h5").stat().st_size,
                                     "task_reads": 2 * (work / "data" / "sub-001.h5").stat().st_size,
                                     "task_writes": outputs,
                                     "driver_reads": best["2"]["driver_read_bytes"] / args.subjects}}
        if plain:
            pbest = {w: min(r["wall_s"] for r in plain if r["workers"] == w) for w in (1, 2)}
            res["plain_pool"] = {"runs": plain, "best_wall_s": {str(w): v for w, v in pbest.items()},
                                 "efficiency": pbest[1] / (2 * pbest[2])}
            res["efficiency_of_ceiling"] = res["efficiency"] / res["plain_pool"]["efficiency"]
        if not args.no_adapted:
            try:                 # the efficiency above is the result; this adds the seed state's bytes
                res["adapted_run"] = one_run(manifest, work / "adapted", 2, uri, mode="adapted")
                res["seed_state"] = seed_state_bytes(work / "adapted", "sub-001")
            except Exception as exc:  # e.g. Ray not starting on a loaded machine
                res["adapted_error"] = f"{type(exc).__name__}: {exc}"
        res["extrapolation"] = extrapolate(res, args.gpus, args.gpus_per_node, args.gpu_adapted_s)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))
        print(markdown(res))
    finally:
        if not args.data:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
