"""A seed that validates but fails (its worker SIGKILLed, no retries) on a real local Ray: the next
valid subject becomes the seed, the log and summary.json say so, and every adapted subject is
adapted from it. In mode both the new seed's own scratch task is in flight: its seed run follows it."""
import json
import os
import signal
import threading
import time

import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.results import SEED_STATE_FILE, SUMMARY_FILE, subject_dir
from test_cohort_faults import _running_task_pids

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode", ["adapted", "both"])
def test_a_failed_seed_falls_back_to_the_next_subject(local_ray, sim_cohort, tiny_config, tmp_path, mode):
    out, lines, result, killed = tmp_path / "out", [], {}, []
    config = tiny_config.replace(iters_stage1=300)          # a seed run long enough to be killed in

    def target():
        result["report"] = run_cohort(sim_cohort, out, mode=mode, config=config, progress=False, tracking=False,
                                      max_retries=0, log=lines.append)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.time() + 180
    while thread.is_alive() and not killed and time.time() < deadline:
        pids = _running_task_pids("seed_task")
        if pids:
            os.kill(pids[0], signal.SIGKILL)                 # the first seed only
            killed.append(pids[0])
        time.sleep(0.05)
    thread.join(400)
    assert not thread.is_alive() and killed, (killed, lines)

    df = pd.read_parquet(out / "results.parquet").set_index(["subject_id", "mode"])
    seed_row, new_seed = df.loc[("sub-001", "scratch")], df.loc[("sub-002", "scratch")]
    assert seed_row.status == "failed" and seed_row.is_seed and "died" in seed_row.error.lower(), seed_row.error
    assert new_seed.status == "ok" and new_seed.is_seed
    adapted = df.xs("adapted", level="mode")
    assert len(adapted) == 4 and (adapted.status == "ok").all(), adapted[["status", "error"]]
    assert (adapted.seed_subject == "sub-002").all()
    assert any(line.startswith("seed sub-001 failed (") and "falling back to sub-002 as the seed" in line
               for line in lines), lines
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["seed_subject"] == "sub-002" == result["report"].seed_subject
    assert [f["seed"] for f in summary["seed_failures"]] == ["sub-001"]
    assert (subject_dir(out, "sub-002", "scratch") / SEED_STATE_FILE).is_file()
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_seed_with_bad_values_falls_back(local_ray, sim_cohort, tiny_config, tmp_path):
    """All-zero k-space passes the driver's header checks and fails in the seed's task."""
    import shutil

    import h5py
    data = tmp_path / "data"
    shutil.copytree(sim_cohort.parent, data)
    with h5py.File(data / "sub-001.h5", "r+") as f:
        f["kspace"][...] = 0
    lines = []
    rep = run_cohort(data / "manifest.parquet", tmp_path / "out", mode="adapted", config=tiny_config, progress=False,
                     tracking=False, log=lines.append)
    df = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index(["subject_id", "mode"])
    assert "is all zero" in df.loc[("sub-001", "scratch"), "error"] and rep.seed_subject == "sub-002"
    assert any("falling back to sub-002 as the seed" in line for line in lines), lines
    ok = df[df.status == "ok"].xs("adapted", level="mode")
    assert sorted(ok.index) == ["sub-002", "sub-003", "sub-004"] and (ok.seed_subject == "sub-002").all()
