"""Idle workers warm up while the seed runs alone (cohort.driver._Scheduler.warm_up), on a real
local Ray of 2 CPUs: one slot runs the seed, the other warms a worker; nothing is warmed when
scratch tasks fill the slots from the start."""
import json
import subprocess
import sys
import time

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

from cohort.driver import run_cohort

from conftest import N_SUBJECTS


def _all_cpus_free(n=2, timeout_s=20.0):
    """Ray reports freed resources a moment late; a test that counts free slots waits for them."""
    import ray
    t0 = time.time()
    while ray.available_resources().get("CPU", 0.0) < n:
        assert time.time() - t0 < timeout_s, ray.available_resources()
        time.sleep(0.2)


def test_warm_up_imports_what_the_first_task_would():
    code = ("import sys, json; import cohort.subject_run as s; before = 'torch._dynamo' in sys.modules; "
            "r = s.warm_up('cpu'); print(json.dumps({'before': before, 'after': 'torch._dynamo' in sys.modules, "
            "'mpl': 'matplotlib.pyplot' in sys.modules, **r}))")
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    timeout=120).stdout.strip().splitlines()[-1])
    # importing the package does not import torch._dynamo; the first optimiser does, and warm_up pays it
    assert not out["before"] and out["after"] and out["mpl"]
    assert out["seconds"] > 0 and out["pid"] > 0 and out["node"]


def test_adapted_cohort_warms_the_idle_worker(local_ray, sim_cohort, tiny_config, tmp_path):
    _all_cpus_free()
    logs = []
    rep = run_cohort(sim_cohort, tmp_path / "adapted", mode="adapted", config=tiny_config, progress=False,
                     tracking=False, log=logs.append)
    assert rep.warmed_workers == 1                      # 2 slots: the seed's and one warmed
    assert any("warming 1 idle worker while the seed sub-001 runs" in m for m in logs), logs
    df = pd.read_parquet(tmp_path / "adapted" / "results.parquet")
    assert (df.status == "ok").all() and len(df) == N_SUBJECTS + 1    # seed scratch + every subject adapted
    assert rep.n_reconstructed == N_SUBJECTS + 1         # warm-ups are not reconstructions


def test_both_modes_warm_nothing(local_ray, sim_cohort, tiny_config, tmp_path):
    _all_cpus_free()
    rep = run_cohort(sim_cohort, tmp_path / "both", mode="both", config=tiny_config, progress=False, tracking=False)
    assert rep.warmed_workers == 0                      # scratch tasks take the free slots at once
    assert all(r["status"] == "ok" for r in rep.rows)
