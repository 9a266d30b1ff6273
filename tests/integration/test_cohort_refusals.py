"""Refusals that need a real Ray, never a hang: a task bigger than every node (a local Ray refuses at
once, a joined cluster after its wait), and a second `cohort run` while a real driver holds the
output folder; the SIGKILLed driver leaves no stale lock."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cohort.driver import run_cohort
from cohort.guards import LOCK_FILE, RunRefused, output_lock

pytestmark = pytest.mark.slow


def _cli(*args):
    return [sys.executable, "-m", "cohort", "run", *map(str, args), "--no-tracking", "--no-progress"]


ENV = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}


def test_a_task_bigger_than_every_node_is_refused(local_ray, sim_cohort, tiny_config, tmp_path):
    run = dict(mode="scratch", config=tiny_config, progress=False, tracking=False, cpus_per_task=3)
    with pytest.raises(RunRefused, match=r"--cpus-per-task 3 .*no node of the Ray cluster has that much "
                                         r"\(largest: 2 CPUs, 0 GPUs\)"):
        run_cohort(sim_cohort, tmp_path / "a", **run, resource_wait_s=0, log=lambda *a: None)
    lines, t0 = [], time.time()
    with pytest.raises(RunRefused):
        run_cohort(sim_cohort, tmp_path / "b", **run, resource_wait_s=3, log=lines.append)
    assert time.time() - t0 >= 3 and any(line.startswith("waiting up to 3 s for a node with 3 CPUs") for line in lines)
    assert not list((tmp_path / "b").glob("*/scratch"))                 # nothing was scheduled


def test_cpus_per_task_above_a_local_ray_exits_2(sim_cohort, tmp_path):
    t0 = time.time()
    p = subprocess.run(_cli(sim_cohort, "--out", tmp_path / "out", "--preset", "tiny", "--num-cpus", "1",
                            "--cpus-per-task", "2"), capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 2 and "--cpus-per-task 2 " in p.stderr and "largest: 1 CPUs" in p.stderr, p.stderr[-3000:]
    print(f"refused in {time.time() - t0:.1f} s")


def test_a_second_driver_on_a_running_folder_is_refused(sim_cohort, tmp_path):
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("preset: tiny\niters_stage1: 600\n")
    first = subprocess.Popen(_cli(sim_cohort, "--out", out, "--config", cfg, "--mode", "scratch", "--num-cpus", "2"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, env=ENV)
    try:
        deadline = time.time() + 240
        while not list(out.glob("sub-*/scratch")) and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)                                    # the first driver is running its tasks
        assert first.poll() is None, "the first driver ended before the second started"
        second = subprocess.run(_cli(sim_cohort, "--out", out, "--config", cfg, "--mode", "scratch"),
                                capture_output=True, text=True, timeout=120, env=ENV)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another cohort run (pid {first.pid} on " in second.stderr, second.stderr
        os.kill(first.pid, signal.SIGKILL)                     # the driver alone, mid-run
        first.wait(30)
        with output_lock(out):                                 # free at once: the kernel released it
            pass
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)               # then its local Ray and workers
        except ProcessLookupError:
            pass
    assert (out / LOCK_FILE).is_file()
