"""The cohort driver: Ray connection and a short scheduler over :mod:`cohort.tasks`.

A run (:func:`run_cohort`):

1. read the manifest (:mod:`cohort.manifest`) and validate every subject file up front; bad or
   missing files become ``failed`` rows and are not scheduled;
2. plan (:func:`cohort.plan.plan_cohort`, no Ray): what is done already with this config (resume,
   unless ``force``), what runs, and whether the seed runs first;
3. the seed is reconstructed from scratch as one Ray task that writes its outputs and returns its
   row plus the ``SeedState`` numpy dict; the driver ``ray.put``\\ s that dict ONCE, only when the
   seed's result passes QC (a failed or flagged seed falls back to the next subject), and passes
   the ObjectRef as a top-level argument to every adaptation task (Ray resolves it before the task
   starts; workers on a node share one copy);
4. results are collected as they finish, logged to MLflow by the driver alone (:mod:`cohort.tracking`),
   ``DIR/results.parquet`` rewritten after each (an interrupted run leaves a consistent table); while
   none finishes, the console shows where the running tasks are (:mod:`cohort.progress`).

What is written where: :mod:`cohort.results`.
"""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Optional

from . import plots
from .guards import LOCK_FILE, clear_killed_writes, output_lock
from .manifest import file_sha256, read_manifest, validate_entries
from .plan import CohortPlan, plan_cohort
from .progress import POLL_S as PROGRESS_POLL_S, describe as describe_progress
from .ray_cluster import check_num_cpus, connect_ray, free_task_slots, task_error, task_resources
from .results import (CONFIG_FILE, RESULTS_FILE, SEED_STATE_FILE, SUMMARY_FILE, SUMMARY_PNG, CohortReport,
                      failed_row, flagged, format_summary, read_done, rejudge, rows_frame, subject_dir, summarize,
                      summary_metrics, write_json, write_results)
from .resume import check_done
from .subject_run import load_seed_state_dict


#: seeds tried after the first one fails or is flagged by QC (each a scratch run, one after another)
MAX_SEED_FALLBACKS = 2


def seed_problem(row: dict) -> tuple:
    """Why a seed's scratch run is not published: ``("failed", its error)`` or ``("flagged by QC",
    its reasons)`` (docs/decisions/015, 017); None when it may be."""
    if flagged(row):
        return "flagged by QC", row.get("qc_reasons") or ""
    if row.get("status") != "ok":
        return "failed", row.get("error") or ""
    return None


class _Scheduler:
    """Submits the plan's tasks (the seed first when it runs), collects rows as tasks finish."""

    def __init__(self, plan: CohortPlan, out_dir: Path, task_cfg: dict, opts: dict, tracker, report: CohortReport,
                 config_hash: str, lora_rank: int, log, progress: bool):
        self.plan, self.out_dir, self.task_cfg, self.opts = plan, out_dir, task_cfg, opts
        self.tracker, self.report, self.config_hash, self.lora_rank, self.log = tracker, report, config_hash, lora_rank, log
        self.rows = dict(plan.rows)
        self.seed_id = plan.seed_id      # the seed now: a failed seed falls back to the next valid subject
        self.deferred_seed = None        # a fallback seed whose own scratch task must end first
        self.pending: dict = {}          # ObjectRef -> (kind, entry, mode)
        self.seed_ref = None
        self.waiting: list = []          # adapted (entry, mode) waiting for the seed state
        self.counts = {"ok": 0, "failed": 0}
        self.started = time.time()       # progress files older than this are a killed run's
        from tqdm import tqdm
        self.bar = tqdm(total=plan.n_tasks, desc="cohort", unit="recon", disable=not progress)

    def _seed_of(self, m: str) -> Optional[str]:
        return self.seed_id if m == "adapted" else None

    def submit(self, e, m: str):
        from . import tasks
        ref = tasks.subject_task.options(**self.opts).remote(
            e.path, str(self.out_dir), m, self.task_cfg, self.seed_ref if m == "adapted" else None,
            subject_id=e.subject_id, is_seed=e.subject_id == self.seed_id, seed_subject=self._seed_of(m))
        self.pending[ref] = ("subject", e, m)

    def submit_seed(self, e):
        from . import tasks
        ref = tasks.seed_task.options(**self.opts).remote(e.path, str(self.out_dir), self.task_cfg,
                                                          subject_id=e.subject_id)
        self.pending[ref] = ("seed", e, "scratch")

    def put_seed_state(self, d):
        import ray
        self.seed_ref = ray.put(d)       # ONCE per cohort run
        self.report.seed_puts += 1

    def warm_up(self, slots: int):
        """While the seed runs alone, warm one idle worker per free slot (at most one per waiting
        task) with the tasks' own resources, so that no adapted task pays a worker's start-up
        (imports, torch._dynamo, the CUDA context) after the seed. Results are not waited for."""
        from . import tasks
        device = "cuda" if self.opts.get("num_gpus") else "cpu"
        n = max(0, min(slots, len(self.waiting)))
        if n:
            self.log(f"warming {n} idle worker{'s' if n > 1 else ''} while the seed {self.seed_id} runs")
        for _ in range(n):
            ref = tasks.warm_up_task.options(num_cpus=self.opts["num_cpus"], num_gpus=self.opts["num_gpus"],
                                             max_retries=0).remote(device)
            self.pending[ref] = ("warm_up", None, None)

    def start(self, seed_dict=None, free_slots: int = 0):
        """Submit what can run now; ``free_slots``: task slots free before anything was submitted."""
        plan = self.plan
        if plan.seed_todo:
            self.submit_seed(plan.seed)
        elif seed_dict is not None:
            self.put_seed_state(seed_dict)
        for e, m in plan.todo:
            if m == "scratch" or self.seed_ref is not None:
                self.submit(e, m)
            else:
                self.waiting.append((e, m))
        if plan.seed_todo and len(self.pending) == 1:      # the seed alone: the other slots idle
            self.warm_up(free_slots - 1)
        resumed_seed = self.rows.get((self.seed_id, "scratch"))
        if self.waiting and self.seed_ref is None and not plan.seed_todo and resumed_seed is not None:
            self._seed_done(resumed_seed, None)    # a resumed seed that QC flags now is not published

    def _fall_back(self, row: dict) -> bool:
        """After a failed or QC-flagged seed run: the next valid subject (manifest order) becomes the
        seed, at most MAX_SEED_FALLBACKS times (a config that fails every subject should not run
        them all serially). False when nothing waits for a seed or none is left."""
        verb, detail = seed_problem(row) or ("failed", "")
        first = detail.strip().splitlines()[:1]
        why = (f"{verb}: " if verb != "failed" else "") + (first[0] if first else "")
        self.report.seed_failures.append({"seed": self.seed_id, "error": why})
        tried = {f["seed"] for f in self.report.seed_failures}
        nxt = next((e for e in self.plan.fallbacks if e.subject_id not in tried), None)
        if nxt is None or not self.waiting or len(tried) > MAX_SEED_FALLBACKS:
            return False
        self.log(f"seed {self.seed_id} {verb} ({first[0] if first else 'no error text'}); "
                 f"falling back to {nxt.subject_id} as the seed")
        self.seed_id = self.report.seed_subject = nxt.subject_id
        self.bar.total += 1
        if any(k == "subject" and x is nxt and mm == "scratch" for k, x, mm in self.pending.values()):
            self.deferred_seed = nxt     # mode both: its scratch task writes the same folder; the seed run follows it
        else:
            self.submit_seed(nxt)
        return True

    def _seed_done(self, row: dict, state):
        if seed_problem(row):
            state = None                 # published only when it finished and passed QC (decision 017)
        if state is None and self._fall_back(row):
            return
        if state is not None:
            self.put_seed_state(state)
            for e, m in self.waiting:
                self.submit(e, m)
        else:
            verb, detail = seed_problem(row) or ("failed", "no seed state")
            for e, m in self.waiting:
                seeds = ", ".join(f["seed"] for f in self.report.seed_failures)
                self.rows[(e.subject_id, m)] = failed_row(
                    e.subject_id, m, f"seed {seeds} {verb}: {detail}", path=e.path,
                    config_hash=self.config_hash, seed_subject=self.seed_id)
                self.counts["failed"] += 1
                self.bar.update(1)
        self.waiting = []

    def _record(self, e, m: str, row: dict):
        history = row.pop("history", None)
        if row["status"] == "ok":
            row["mlflow_run_id"] = self.tracker.log_child(row, history or [], lora_rank=self.lora_rank)
            self.counts["ok"] += 1
            if flagged(row):
                self.log(f"flagged by QC: {e.subject_id}/{m}: {row.get('qc_reasons')}")
        else:
            self.log(f"failed: {e.subject_id}/{m}: {row['error'].splitlines()[0] if row['error'] else ''}")
            row["mlflow_run_id"] = self.tracker.log_child(row, [])
            self.counts["failed"] += 1
        self.rows[(e.subject_id, m)] = row
        write_results(self.out_dir, list(self.rows.values()))
        self.bar.update(1)

    def _refresh(self):
        # in_flight: submitted, not yet finished (queued or running); now: where the running ones are
        running = [(e.subject_id, m) for k, e, m in self.pending.values() if k != "warm_up"]
        now = "" if self.bar.disable else describe_progress(self.out_dir, running, since=self.started)
        self.bar.set_postfix(ok=self.counts["ok"], failed=self.counts["failed"], in_flight=len(running),
                             **({"now": now} if now else {}), refresh=False)
        self.bar.refresh()

    def run(self) -> list:
        """Wait for every task; returns all rows (known before plus finished now)."""
        import ray
        self._refresh()
        while self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=PROGRESS_POLL_S)
            if not ready:                 # nothing finished: show where the running tasks are
                self._refresh()
                continue
            kind, e, m = self.pending.pop(ready[0])
            if kind == "warm_up":
                try:
                    ray.get(ready[0])
                    self.report.warmed_workers += 1
                except ray.exceptions.RayError:      # only an optimisation: the task itself will tell
                    pass
                continue
            try:
                value = ray.get(ready[0])
                row, state = value if kind == "seed" else (value, None)
            except ray.exceptions.RayError as exc:   # task raised, or its worker/node died past max_retries
                row, state = failed_row(e.subject_id, m, task_error(exc), path=e.path, is_seed=kind == "seed",
                                        config_hash=self.config_hash, seed_subject=self._seed_of(m)), None
            self.report.n_reconstructed += 1
            if kind == "seed":
                self._seed_done(row, state)
                del state
            elif self.deferred_seed is e and m == "scratch":
                self.deferred_seed = None
                self.submit_seed(e)
            self._record(e, m, row)
            self._refresh()
        self.bar.close()
        return list(self.rows.values())


def _finish(report: CohortReport, tracker, rows: list, out_dir: Path, mode: str, n_subjects: int,
            t_start: float, log) -> None:
    """Results table, summary (printed and in summary.json), summary figure, the reports (cohort
    and any subject report missing or out of date), the parent MLflow run."""
    report.rows = rows_frame(rows).to_dict("records") if rows else []
    report.results_path = write_results(out_dir, rows) if rows else report.results_path
    summary_png = plots.summary_plot(out_dir / SUMMARY_PNG, rows, f"cohort {out_dir.name} ({mode})")
    report.wall_s = time.time() - t_start
    report.summary = summarize(rows)
    report.summary_text = format_summary(report.summary, n_subjects, report.wall_s)
    summary = {**report.summary, "n_subjects": n_subjects, "wall_s": report.wall_s,
               "seed_subject": report.seed_subject, "seed_failures": report.seed_failures}
    write_json(out_dir / SUMMARY_FILE, summary)
    html = _write_reports(out_dir, report.rows, summary, log)
    write_json(out_dir / SUMMARY_FILE, summary)      # with the reports' seconds
    fresh_ok = [r for r in rows if r["status"] == "ok" and not r.get("resumed")]
    tracker.finish_parent(
        metrics={"cohort_wall_s": report.wall_s,
                 "subjects_per_hour": (len({r["subject_id"] for r in fresh_ok}) / (report.wall_s / 3600.0))
                 if report.wall_s > 0 else 0.0,
                 "n_ok": float(sum(r["status"] == "ok" for r in rows)),
                 "n_failed": float(sum(r["status"] == "failed" for r in rows)),
                 "n_flagged": float(sum(flagged(r) for r in rows)),
                 "n_resumed": float(report.n_resumed), "n_reconstructed": float(report.n_reconstructed),
                 "reconstructions_ok": float(len(fresh_ok)),
                 **summary_metrics(report.summary)},   # NaN (not logged) without both modes
        artifacts=[report.results_path, summary_png, str(out_dir / SUMMARY_FILE), html],
        status="FINISHED")
    report.parent_run_id = tracker.parent_run_id
    log(report.summary_text)
    log(f"results: {report.results_path}" + (f"; MLflow run {tracker.parent_run_id} at {report.tracking_uri}"
                                             if tracker.parent_run_id else ""))


def _write_reports(out_dir: Path, rows: list, summary: dict, log) -> Optional[str]:
    """``DIR/report.html`` and the subject reports it links (cohort/report.py); records in
    ``summary['report_seconds']`` what writing reports cost: the cohort's here, and the subject
    reports and their diagnostics in this run's tasks (summed over tasks, which ran in parallel)."""
    from .report import write_reports

    done = write_reports(out_dir, rows, summary, log=log)
    fresh = [r for r in rows if r.get("status") == "ok" and not r.get("resumed")]

    def total(key: str) -> float:
        return float(sum(r[key] for r in fresh if isinstance(r.get(key), float) and r[key] == r[key]))
    summary["report_seconds"] = {"cohort": done["seconds"], "subject_reports_in_tasks": total("report_s"),
                                 "diagnostics_in_tasks": total("diagnostics_s"),
                                 "subject_reports_rewritten": done["subject_reports"]}
    if done["path"]:
        log(f"report: {done['path']}")
    return done["path"]


def _plan(manifest, out_dir: Path, mode: str, config, force: bool, progress: bool, log, external=None):
    """``external``: ``(seed dict, seed subject)`` of ``--seed-from``, or None. Resumed rows are
    judged again against this run's QC thresholds; a resumed seed that QC flags is not loaded (the
    scheduler falls back from it)."""
    config_hash = config.hash()
    entries = read_manifest(manifest, out_dir)
    validate_entries(entries, progress=progress)
    for e in entries:
        if not e.valid:
            log(f"skipping {e.subject_id}: invalid subject file:\n  " + "\n  ".join(e.problems))
    plan = plan_cohort(entries, mode, config_hash, lambda sid, m: read_done(out_dir, sid, m), force=force,
                       external_seed=external[1] if external else None, check=check_done(out_dir))
    for sid, m, why in plan.redo:
        log(f"redo {sid}/{m}: {why}")
    for key, row in plan.rows.items():
        if row.get("resumed"):
            plan.rows[key] = rejudge(row, config.qc)
    seed_dict = None
    if external:
        seed_dict = external[0] if plan.needs_seed_state else None
    elif plan.needs_seed_state and not plan.seed_todo and not flagged(plan.rows.get((plan.seed_id, "scratch"), {})):
        seed_dict = load_seed_state_dict(out_dir, plan.seed_id)
        if seed_dict is None:
            plan = plan.redo_seed()
    if plan.n_resumed:
        log(f"resuming: {plan.n_resumed} subject/mode results already done with config {config_hash} "
            "(use --force to redo)")
    return entries, plan, seed_dict


def _one_driver(run):
    """``run`` under the output folder's lock (:func:`cohort.guards.output_lock`), so that a second
    driver on the same ``--out`` is refused; a folder this call created is removed again when the
    run is refused or fails before writing anything into it."""
    @functools.wraps(run)
    def locked(manifest, out_dir, **kw):
        check_num_cpus(kw.get("num_cpus"))
        out_dir = Path(out_dir).resolve()
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with output_lock(out_dir):
                return run(manifest, out_dir, **kw)
        except BaseException:
            if created and [p.name for p in out_dir.iterdir()] == [LOCK_FILE]:
                (out_dir / LOCK_FILE).unlink(missing_ok=True)
                out_dir.rmdir()
            raise
    return locked


@_one_driver
def run_cohort(manifest, out_dir, *, mode: str = "adapted", config=None, address: Optional[str] = None,
               gpus_per_task: Optional[float] = None, cpus_per_task: float = 1, tracking_uri: Optional[str] = None,
               experiment: str = "refine-more-cohort", tracking: bool = True, force: bool = False,
               max_retries: int = 2, num_cpus: Optional[int] = None, progress: bool = True,
               seed_from: Optional[str] = None, resource_wait_s: float = 300.0, log=print) -> CohortReport:
    """Run a cohort (see the module docstring); returns a :class:`cohort.results.CohortReport`.
    ``seed_from``: adapt from an earlier run's seed state (:mod:`cohort.seed_source`), no seed run.
    ``resource_wait_s``: on a joined cluster, how long to wait for a node big enough for one task
    (an autoscaler may add it) before refusing; a local Ray started here is refused at once."""
    import ray

    from refine_more.config import ReconConfig, preset

    from .tracking import CohortTracker, default_tracking_uri

    config = ReconConfig.from_dict(config) if isinstance(config, dict) else (config or preset("small"))
    config_hash = config.hash()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_killed_writes(out_dir)
    t_start = time.time()
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir)
    external, seed_path = None, None
    if seed_from:
        from .seed_source import resolve_seed_from
        seed_dict, seed_subject, seed_path = resolve_seed_from(seed_from, config, tracking_uri)
        external = (seed_dict, seed_subject)
        log(f"seed state from {seed_from}: seed subject {seed_subject}, no seed reconstructed")
    entries, plan, seed_dict = _plan(manifest, out_dir, mode, config, force, progress, log, external)
    del external
    write_json(out_dir / CONFIG_FILE, {"config_hash": config_hash, "config": config.to_dict()})
    report = CohortReport(rows=[], results_path=str(out_dir / RESULTS_FILE), summary={}, summary_text="",
                          wall_s=0.0, seed_subject=plan.seed_id, n_resumed=plan.n_resumed)
    started_ray = connect_ray(address, num_cpus, log) if plan.n_tasks else False
    tracker = None
    try:
        report.resources = task_resources(gpus_per_task, cpus_per_task, log, 0.0 if started_ray else resource_wait_s)
        gpus = report.resources["gpus_per_task"]
        task_cfg = {**config.to_dict(), "progress": False}      # progress bar in the driver only
        if gpus == 0 and task_cfg.get("device", "auto") == "auto":
            task_cfg["device"] = "cpu"                  # a CPU task never takes a GPU Ray did not give it
        opts = dict(num_cpus=cpus_per_task, num_gpus=gpus, max_retries=int(max_retries), retry_exceptions=False)
        # MLflow: the driver is the single writer (one process writes the sqlite file; remote nodes need not
        # reach the store); workers return small rows, artifacts are read from the shared output folder
        report.tracking_uri = tracking_uri
        tracker = CohortTracker(report.tracking_uri, experiment, out_dir, enabled=tracking, log=log)
        tracker.start_parent(config, mode=mode, manifest=manifest, manifest_sha256=file_sha256(manifest),
                             resources=report.resources, n_subjects=len(entries), seed_subject=plan.seed_id)
        scheduler = _Scheduler(plan, out_dir, task_cfg, opts, tracker, report, config_hash,
                               config.adapt.lora_rank, log, progress)
        scheduler.start(seed_dict, free_slots=free_task_slots(cpus_per_task, gpus) if plan.n_tasks else 0)
        del seed_dict
        rows = scheduler.run()
        tracker.log_unrecorded(rows)        # invalid files, subjects failed with their seed, resumed rows
        tracker.log_seed_state(seed_path or (subject_dir(out_dir, report.seed_subject, "scratch") / SEED_STATE_FILE
                                             if report.seed_subject else None))
        _finish(report, tracker, rows, out_dir, mode, len(entries), t_start, log)
        return report
    except BaseException:
        if tracker is not None:
            tracker.finish_parent(metrics={}, artifacts=[], status="FAILED")
        raise
    finally:
        if started_ray:
            ray.shutdown()
