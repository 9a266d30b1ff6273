"""Fan-out efficiency of the cohort driver (issue 16.3), and what 100 GPUs would ask of it.

Tiny cohorts (``--subjects`` simulated subjects, one or more sizes, default 16 and 32; 6 × 24 × 24,
4 coils, preset ``tiny``, mode ``scratch``: every task independent, no serial seed) run through
:func:`cohort.driver.run_cohort` in THIS process (the driver) on a local Ray of 1 and then 2 CPUs,
one CPU per task, MLflow on (one sqlite store for all runs, made by a warm-up run: the driver's
logging is part of its load). Ray is started before each run and its start timed apart (a
cluster is up before its jobs; its workers are not: each imports torch on its first task). Order
per repeat: each size, 1 then 2 workers; ``--repeats`` times. Each 1-worker run is paired with the
2-worker run right after it (this VM's speed drifts between minutes); the median pair is the result.

- efficiency = t1 / (2 · t2) on the run's wall time (manifest read to summary written), the
  issue's definition, target >= 0.9, per cohort size (median of the pairs; the fastest of each
  as well); the headline is the largest size. Also on
  the task span alone (first task start to last end). A worker's start-up (torch, torch._dynamo on
  the first optimiser, matplotlib: ~5 s here) is paid once per worker and run, so it weighs less
  as the cohort grows; ``first_task_s`` against ``steady_task_s`` shows it;
- the machine's ceiling: the same tasks (``subject_run.run_subject``) in a plain process pool of 1
  and 2 processes, no Ray, driver or MLflow (``--no-ceiling`` skips it), timed from the pool's
  start (its processes import torch on their first task, as Ray's workers do), and the Ray
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

    python benchmarks/fanout.py [--subjects 16 32] [--repeats 2] [--out benchmarks/results/fanout.json]

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
        cpu0, io0, t0, epoch0 = _cpu(), _rchar(), time.perf_counter(), time.time()
        rep = run_cohort(manifest, out, mode=mode, config=preset("tiny"), cpus_per_task=1, progress=False,
                         tracking_uri=tracking_uri, log=lambda *a: None)
        wall, cpu, rchar = time.perf_counter() - t0, _cpu() - cpu0, _rchar() - io0
    finally:
        ray.shutdown()
    rows = [r for r in rep.rows if r["status"] == "ok"]
    assert len(rows) == len(rep.rows), [r.get("error") for r in rep.rows]
    span = max(r["finished_at"] for r in rows) - min(r["started_at"] for r in rows)
    by_start = sorted(rows, key=lambda r: r["started_at"])
    first, rest = by_start[:workers], by_start[workers:]      # the first task of each worker
    return {"workers": workers, "mode": mode, "subjects": len(rows), "wall_s": wall, "ray_start_s": ray_start,
            "task_span_s": span, "lead_s": by_start[0]["started_at"] - epoch0,
            "first_task_s": statistics.mean(r["wall_s"] for r in first),
            "steady_task_s": statistics.median(r["wall_s"] for r in rest) if rest else None,
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
    of ``workers`` processes, no Ray, no driver bookkeeping, no MLflow, timed from the pool's start
    (each process imports torch on its first task, as a Ray worker does). What two such processes
    lose against one is the machine's and Python's share of the inefficiency."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from cohort.manifest import read_manifest
    from refine_more.config import preset

    cfg = {**preset("tiny").to_dict(), "progress": False}
    jobs = [(e.path, str(out), e.subject_id, cfg) for e in read_manifest(manifest)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_plain_worker_init) as pool:
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


def _size_table(size: dict) -> list:
    b1, b2 = size["best"]["1"], size["best"]["2"]
    return [
        f"### {size['subjects']} subjects", "",
        "| workers | Ray start (s) | wall (s) | task span (s) | first task (s) | steady task (s) | driver CPU (s) "
        "| driver CPU share |", "|---|---|---|---|---|---|---|---|",
        *[f"| {b['workers']} | {b['ray_start_s']:.1f} | {b['wall_s']:.1f} | {b['task_span_s']:.1f} | "
          f"{b['first_task_s']:.1f} | {b['steady_task_s']:.1f} | {b['driver_cpu_s']:.1f} | "
          f"{100 * b['driver_cpu_share']:.1f} % |" for b in (b1, b2)], "",
        f"**efficiency t1 / (2 t2) = {size['efficiency']:.3f}** (target 0.9); on the task span alone "
        f"{size['efficiency_task_span']:.3f}; each repeat: {size['efficiency_all']}; fastest of each "
        f"{size['efficiency_best_of']:.3f} (the table's rows).", "",
        *([f"The same tasks in a plain process pool (no Ray, no driver, no MLflow; process start-up timed): "
           f"fastest {pp['best_wall_s']['1']:.1f} s with 1 process, {pp['best_wall_s']['2']:.1f} s with 2; efficiency "
           f"**{pp['efficiency']:.3f}** (each repeat: {pp['efficiency_all']}); the Ray driver reaches "
           f"**{size['efficiency_of_ceiling']:.3f}** of it.", ""]
          if (pp := size.get("plain_pool")) else []),
    ]


def markdown(res: dict) -> str:
    x = res["extrapolation"]
    gb = 1e9
    lines = [
        "# Fan-out efficiency (`python benchmarks/fanout.py`)", "",
        f"Cohorts of {', '.join(str(n) for n in res['subject_counts'])} subjects {MATRIX}, {COILS} coils, preset tiny, "
        f"mode scratch, one CPU per task, MLflow sqlite on; {res['machine']}; {res['repeats']} repeats; load average "
        f"(1/5/15 min) {'/'.join(f'{x:.1f}' for x in res['load_average_before'])} before, "
        f"{'/'.join(f'{x:.1f}' for x in res['load_average_after'])} after.", "",
        f"**Efficiency at {res['subjects']} subjects: {res['efficiency']:.3f}** (target 0.9; median of the repeats); by cohort size: "
        + ", ".join(f"{n}: {v:.3f}" for n, v in res["efficiency_by_subjects"].items()) + ". "
        "A worker's first task carries its start-up (imports of torch, torch._dynamo at the first optimiser, "
        "matplotlib), paid once per worker and run, in both runs alike, so small cohorts weigh it most.", "",
        *[line for n in res["subject_counts"] for line in _size_table(res["by_subjects"][str(n)])],
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


def subset_manifest(manifest: Path, n: int) -> Path:
    """The first ``n`` rows of ``manifest``, beside it (relative paths stay valid)."""
    import pyarrow.parquet as pq
    out = manifest.with_name(f"manifest_{n}.parquet")
    pq.write_table(pq.read_table(manifest).slice(0, n), out)
    return out


def summarize_size(runs: list, plain: list, n: int) -> dict:
    """Best of each worker count, the efficiencies and the plain pool's ceiling for one cohort size."""
    runs = [r for r in runs if r["subjects"] == n]
    best = {str(w): min((r for r in runs if r["workers"] == w), key=lambda r: r["wall_s"]) for w in (1, 2)}
    # the headline pairs each 1-worker run with the 2-worker run right after it: this VM's speed
    # drifts by up to 20 % between minutes, so the fastest of each, taken at different times, is no pair
    pairs = list(zip(runs[0::2], runs[1::2]))
    effs = [a["wall_s"] / (2 * b["wall_s"]) for a, b in pairs]
    size = {"subjects": n, "best": best,
            "efficiency": statistics.median(effs),
            "efficiency_task_span": statistics.median(a["task_span_s"] / (2 * b["task_span_s"]) for a, b in pairs),
            "efficiency_all": [round(e, 3) for e in effs],
            "efficiency_best_of": best["1"]["wall_s"] / (2 * best["2"]["wall_s"]),
            "driver_cpu_share": best["2"]["driver_cpu_share"]}
    plain = [r for r in plain if r["subjects"] == n]
    if plain:
        pbest = {w: min(r["wall_s"] for r in plain if r["workers"] == w) for w in (1, 2)}
        peffs = [a["wall_s"] / (2 * b["wall_s"]) for a, b in zip(plain[0::2], plain[1::2])]
        size["plain_pool"] = {"best_wall_s": {str(w): v for w, v in pbest.items()},
                              "efficiency": statistics.median(peffs), "efficiency_all": [round(e, 3) for e in peffs],
                              "efficiency_best_of": pbest[1] / (2 * pbest[2])}
        size["efficiency_of_ceiling"] = size["efficiency"] / size["plain_pool"]["efficiency"]
    return size


def summarize(res: dict) -> dict:
    """Fill ``res`` (its ``runs``, ``plain_runs`` and ``subject_counts``) with the per-size summaries
    and the headline at the largest size; ``--rebuild`` reruns it on a saved file."""
    counts, runs, plain = res["subject_counts"], res["runs"], res.get("plain_runs", [])
    n = counts[-1]
    sizes = {str(k): summarize_size(runs, plain, k) for k in counts}
    head = sizes[str(n)]
    res.update({"subjects": n, "by_subjects": sizes, "best": head["best"], "efficiency": head["efficiency"],
                "efficiency_task_span": head["efficiency_task_span"], "efficiency_all": head["efficiency_all"],
                "efficiency_best_of": head["efficiency_best_of"],
                "efficiency_by_subjects": {str(k): sizes[str(k)]["efficiency"] for k in counts},
                "driver_cpu_share": head["driver_cpu_share"]})
    res["per_subject_bytes"]["driver_reads"] = head["best"]["2"]["driver_read_bytes"] / n
    if "plain_pool" in head:
        res["plain_pool"] = head["plain_pool"]
        res["efficiency_of_ceiling"] = head["efficiency_of_ceiling"]
    return res


def _write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[16, 32],
                    help="cohort sizes (each >= 8); the largest is the headline")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--gpus", type=int, default=100)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--gpu-adapted-s", type=float, default=400.0)
    ap.add_argument("--no-adapted", action="store_true", help="skip the adapted run (seed-state bytes)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the plain process-pool runs (no Ray)")
    ap.add_argument("--out", default=str(RESULT))
    ap.add_argument("--rebuild", metavar="JSON", help="no runs: summarise the runs saved in JSON again, "
                    "write --out and its .md")
    args = ap.parse_args(argv)
    if args.rebuild:
        res = summarize(json.loads(Path(args.rebuild).read_text()))
        res["extrapolation"] = extrapolate(res, args.gpus, args.gpus_per_node, args.gpu_adapted_s)
        _write(res, Path(args.out))
        return 0
    if min(args.subjects) < 8 or args.repeats < 1:
        ap.error("every --subjects must be >= 8 and --repeats >= 1")
    from refine_more.evaluation.simulate import SimulationConfig, simulate_cohort

    counts = sorted(set(args.subjects))
    work = Path(args.data or tempfile.mkdtemp(prefix="fanout"))
    load_before = os.getloadavg()          # the runs are only meaningful on an otherwise idle machine
    try:
        full = simulate_cohort(work / "data", counts[-1], SimulationConfig(matrix=MATRIX, n_coils=COILS),
                               seed=3, progress=False)
        manifests = {n: subset_manifest(full, n) for n in counts}
        uri = f"sqlite:///{work.resolve()}/mlflow.db"     # one store, as a team server would be: made once
        one_run(manifests[counts[0]], work / "warmup", 2, uri)   # imports, the store's tables, page cache
        runs, plain = [], []
        for rep in range(args.repeats):
            for n in counts:
                for w in (1, 2):
                    runs.append(one_run(manifests[n], work / f"out{n}_{w}_{rep}", w, uri))
                    print(json.dumps(runs[-1]), flush=True)
        if not args.no_ceiling:
            for rep in range(args.repeats):
                for n in counts:
                    for w in (1, 2):
                        plain.append({"subjects": n, **plain_run(manifests[n], work / f"plain{n}_{w}_{rep}", w)})
                        print(json.dumps(plain[-1]), flush=True)
        n = counts[-1]
        last = work / f"out{n}_2_{args.repeats - 1}"
        res = {"subject_counts": counts, "matrix": MATRIX, "coils": COILS, "preset": "tiny", "mode": "scratch",
               "repeats": args.repeats, "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "runs": runs,
               "plain_runs": plain, "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "mlflow_per_subject": mlflow_per_child(uri, [r for r in runs if r["subjects"] == n][-1]["parent_run_id"]),
               "per_subject_bytes": {"subject_file": (work / "data" / "sub-001.h5").stat().st_size,
                                     "task_reads": 2 * (work / "data" / "sub-001.h5").stat().st_size,
                                     "task_writes": statistics.mean(_folder_bytes(d / "scratch")
                                                                    for d in last.glob("sub-*"))}}
        summarize(res)
        if not args.no_adapted:
            try:                 # the efficiency above is the result; this adds the seed state's bytes
                res["adapted_run"] = one_run(manifests[counts[0]], work / "adapted", 2, uri, mode="adapted")
                res["seed_state"] = seed_state_bytes(work / "adapted", "sub-001")
            except Exception as exc:  # e.g. Ray not starting on a loaded machine
                res["adapted_error"] = f"{type(exc).__name__}: {exc}"
        res["extrapolation"] = extrapolate(res, args.gpus, args.gpus_per_node, args.gpu_adapted_s)
        _write(res, Path(args.out))
    finally:
        if not args.data:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
