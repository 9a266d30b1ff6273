"""Faults in a cohort run on a real local Ray: a worker killed (SIGKILL) in the middle of a
reconstruction is retried and the cohort completes; with no retries left, that subject is recorded
as failed, the others finish, and nothing half-written is left in the output folder."""
import glob
import os
import signal
import threading
import time

import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.results import DONE, subject_dir

pytestmark = pytest.mark.slow


def _running_task_pids(name: str) -> list:
    """PIDs of Ray workers executing task `name` now (Ray sets their process title to ray::<name>)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title == f"ray::{name}":
            pids.append(int(path.split("/")[2]))
    return pids


def _run_and_kill_one(manifest, out, config, max_retries):
    """run_cohort in a thread; SIGKILL the first worker seen running a subject task. Returns
    (report, killed pid)."""
    result, killed = {}, []

    def target():
        result["report"] = run_cohort(manifest, out, mode="scratch", config=config, progress=False,
                                      tracking=False, max_retries=max_retries, log=lambda *a: None)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 120
    while thread.is_alive() and not killed and time.time() < deadline:
        pids = _running_task_pids("subject_task")
        if pids:
            time.sleep(0.5)  # well inside the reconstruction, not at its start
            if pids[0] in _running_task_pids("subject_task"):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
        time.sleep(0.05)
    thread.join(300)
    assert not thread.is_alive(), "the cohort run did not finish after a worker was killed"
    return result["report"], killed


@pytest.fixture
def slow_config(tiny_config):
    # long enough (seconds) that a running task can be found and killed mid-reconstruction
    return tiny_config.replace(iters_stage1=600)


def _leftovers(out):
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def _kill_marked(marker: str, timeout: float = 60.0) -> None:
    """SIGKILL every process whose environment carries ``marker`` (the killed driver's Ray: raylet,
    GCS and workers run in their own sessions, so killing the driver's process group misses them,
    and an orphaned worker would go on writing its subject beside the rerun), until none is left."""
    needle = marker.encode()
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = []
        for path in glob.glob("/proc/[0-9]*/environ"):
            try:
                with open(path, "rb") as f:
                    if needle in f.read().split(b"\0"):
                        pids.append(int(path.split("/")[2]))
            except OSError:
                continue
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    raise AssertionError(f"processes marked {marker} still alive after {timeout} s")


def test_killed_worker_is_retried_and_the_cohort_completes(local_ray, sim_cohort, slow_config, tmp_path):
    out = tmp_path / "out"
    report, killed = _run_and_kill_one(sim_cohort, out, slow_config, max_retries=1)
    assert len(killed) == 1, "no running subject task was found to kill"
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all(), df[["subject_id", "status", "error"]]
    for sid in df.subject_id:
        assert (subject_dir(out, sid, "scratch") / DONE).exists() and (subject_dir(out, sid, "scratch") / "maps.h5").exists()
    assert not _leftovers(out)


def test_killed_worker_without_retries_fails_only_its_subject(local_ray, sim_cohort, slow_config, tmp_path):
    out = tmp_path / "out"
    report, killed = _run_and_kill_one(sim_cohort, out, slow_config, max_retries=0)
    assert len(killed) == 1, "no running subject task was found to kill"
    df = pd.read_parquet(out / "results.parquet")
    failed, ok = df[df.status == "failed"], df[df.status == "ok"]
    assert len(failed) == 1 and len(ok) == len(df) - 1
    sid = failed.subject_id.iloc[0]
    assert "Worker" in failed.error.iloc[0] or "died" in failed.error.iloc[0], failed.error.iloc[0]
    # the killed subject left no result behind that could pass for a finished one
    folder = subject_dir(out, sid, "scratch")
    assert not (folder / DONE).exists() and not (folder / "maps.h5").exists()
    assert not _leftovers(out)
    # a rerun redoes only that subject
    rerun = run_cohort(sim_cohort, out, mode="scratch", config=slow_config, progress=False, tracking=False,
                       log=lambda *a: None)
    assert rerun.n_reconstructed == 1
    df2 = pd.read_parquet(out / "results.parquet")
    assert (df2.status == "ok").all() and set(df2[~df2.resumed].subject_id) == {sid}


def test_killed_driver_leaves_finished_subjects_and_a_rerun_resumes(local_ray, ray_token, sim_cohort, tmp_path):
    """SIGKILL the driver process (`python -m cohort run`, its own local Ray) once one subject is
    done: the finished subjects stay valid; a rerun reconstructs only the rest, and clears
    temporaries a killed write left behind."""
    import subprocess
    import sys

    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("preset: tiny\niters_stage1: 600\n")
    cmd = [sys.executable, "-m", "cohort", "run", str(sim_cohort), "--out", str(out), "--mode", "scratch",
           "--config", str(cfg), "--num-cpus", "2", "--no-tracking", "--no-progress"]
    marker_name, marker_value = "REFINE_MORE_KILLED_DRIVER_TEST", str(os.getpid())
    marker = f"{marker_name}={marker_value}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": "", marker_name: marker_value})
    try:
        deadline = time.time() + 480   # a loaded 2-core machine: Ray ~40 s to start, a subject ~130 s
        while not list(out.glob(f"*/scratch/{DONE}")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the driver ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)                      # the driver alone: a crash
        proc.wait(30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)                # then its Ray and workers
        except ProcessLookupError:
            pass
        _kill_marked(marker)
    done_before = {p.parent.parent.name for p in out.glob(f"*/scratch/{DONE}")}
    assert 1 <= len(done_before) < 4
    if (out / "results.parquet").exists():   # written as subjects finish: whole, never half
        assert set(pd.read_parquet(out / "results.parquet").subject_id) <= {f"sub-{i:03d}" for i in range(1, 5)}
    # a write killed half-way leaves a temporary beside the final name: the rerun must clear it
    todo = subject_dir(out, next(f"sub-{i:03d}" for i in range(1, 5) if f"sub-{i:03d}" not in done_before), "scratch")
    todo.mkdir(parents=True, exist_ok=True)
    (todo / ".maps.killed.tmp.h5").write_bytes(b"half")
    (out / ".results.killed.tmp.parquet").write_bytes(b"half")    # the driver's own files too
    from refine_more.config import load_config
    rerun = run_cohort(sim_cohort, out, mode="scratch", config=load_config(cfg), progress=False, tracking=False,
                       log=lambda *a: None)
    assert rerun.n_reconstructed == 4 - len(done_before)
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all() and set(df[df.resumed].subject_id) == done_before
    assert not _leftovers(out)
