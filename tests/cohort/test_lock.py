"""One driver per output folder (cohort.guards.output_lock) with real processes, and the refusals
that need no Ray: a second `cohort run` on a held folder exits 2 naming the holder; the lock of a
SIGKILLed holder is free at once; `--num-cpus 0` is refused before anything starts."""
import os
import signal
import subprocess
import sys
import time

import pytest

from cohort.guards import LOCK_FILE, RunRefused, output_lock

HOLD = ("import sys, time\nfrom cohort.guards import output_lock\n"
        "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
    """A second process holding tmp_path/out's lock (killed with SIGKILL at the end)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait(10)


def _cli(*args, timeout=120):
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cohort", "run", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_a_second_cohort_run_on_a_held_folder_is_refused(holder, sim_cohort):
    out, proc = holder
    t0 = time.time()
    p = _cli(sim_cohort, "--out", out, "--preset", "tiny", "--no-tracking", "--no-progress")
    assert p.returncode == 2, p.stdout + p.stderr
    assert f"is in use by another cohort run (pid {proc.pid} on " in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and time.time() - t0 < 60
    assert [x.name for x in out.iterdir()] == [LOCK_FILE]          # nothing written, nothing cleared


def test_the_lock_of_a_killed_holder_is_not_stale(holder):
    out, proc = holder
    with pytest.raises(RunRefused, match=f"pid {proc.pid}"):
        with output_lock(out):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    with output_lock(out) as lock:              # the kernel released it with the process
        assert f"pid {os.getpid()} " in lock.read_text()


def test_num_cpus_zero_is_refused_before_anything_starts(sim_cohort, tmp_path):
    p = _cli(sim_cohort, "--out", tmp_path / "out", "--num-cpus", "0", "--no-tracking", timeout=60)
    assert p.returncode == 2 and "--num-cpus 0" in p.stderr and "at least 1 CPU" in p.stderr, p.stderr
    assert not (tmp_path / "out").exists()

