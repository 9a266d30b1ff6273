"""A seed that validates but fails (its worker SIGKILLed, no retries) on a real local Ray: the next
valid subject becomes the seed, the log and summary.json say so, and every adapted subject is
adapted from it. In mode both the new seed's own scratch task is in flight: its seed run follows it."""
import json
import re
import os
import signal
import threading
import time

import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.results import RESULTS_FILE, SEED_STATE_FILE, SUMMARY_FILE, subject_dir
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


def test_a_seed_flagged_by_qc_falls_back_and_stays_unpublished_on_a_rerun(local_ray, sim_cohort, tiny_config,
                                                                          tmp_path):
    """The seed's k-space of image 3 ×3: its scratch run finishes but QC flags it (docs/decisions/017);
    the driver does not publish it and falls back to sub-002, as for a failed seed. The results,
    summary.json and the console name it. A rerun resumes the flagged seed's row and again does not
    publish it."""
    import shutil

    from refine_more.evaluation.broken_inputs import scale_image
    from refine_more.files.subject import read_subject, write_subject
    data = tmp_path / "data"
    shutil.copytree(sim_cohort.parent, data)
    write_subject(data / "sub-001.h5", scale_image(read_subject(data / "sub-001.h5")))
    out, lines = tmp_path / "out", []
    rep = run_cohort(data / "manifest.parquet", out, mode="adapted", config=tiny_config, progress=False,
                     tracking=False, log=lines.append)
    df = pd.read_parquet(out / RESULTS_FILE).set_index(["subject_id", "mode"])
    seed_row = df.loc[("sub-001", "scratch")]
    assert seed_row.status == "ok" and seed_row.is_seed and seed_row.qc_status == "flagged"
    assert seed_row.qc_reasons.startswith("image_residual_ratio ")
    assert not (subject_dir(out, "sub-001", "scratch") / SEED_STATE_FILE).exists()
    assert rep.seed_subject == "sub-002" and (subject_dir(out, "sub-002", "scratch") / SEED_STATE_FILE).is_file()
    adapted = df.xs("adapted", level="mode")
    assert len(adapted) == 4 and (adapted.status == "ok").all() and (adapted.seed_subject == "sub-002").all()
    assert adapted.loc["sub-001", "qc_status"] == "flagged"            # its own data are still broken
    assert (adapted.drop("sub-001").qc_status == "ok").all(), adapted[["qc_status", "qc_reasons"]]
    assert any(line.startswith("seed sub-001 flagged by QC (image_residual_ratio ")
               and "falling back to sub-002 as the seed" in line for line in lines), lines
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["seed_failures"] == [{"seed": "sub-001", "error": "flagged by QC: " + seed_row.qc_reasons}]
    assert summary["modes"]["scratch"]["flagged"] == 1 and summary["modes"]["adapted"]["flagged"] == 1
    assert rep.n_flagged == 2
    assert f"    sub-001/adapted: {adapted.loc['sub-001', 'qc_reasons']}" in rep.summary_text.splitlines()
    assert rep.summary_text in lines
    # the reports (issue: reports people look at): marked in the cohort's table, explained in its own
    cohort_html = (out / "report.html").read_text()
    marked = set(re.findall(r'<tr class="subject qc-flagged[^"]*" data-subject="([^"]+)"[^>]*data-qc="flagged"', cohort_html))
    assert marked == {"sub-001"}, marked
    for mode in ("scratch", "adapted"):
        own = (subject_dir(out, "sub-001", mode) / "report.html").read_text()
        assert "QC flagged" in own and "image_residual_ratio" in own
    assert "QC flagged" not in (subject_dir(out, "sub-002", "adapted") / "report.html").read_text()

    lines.clear()
    rerun = run_cohort(data / "manifest.parquet", out, mode="adapted", config=tiny_config, progress=False,
                       tracking=False, log=lines.append)
    again = pd.read_parquet(out / RESULTS_FILE).set_index(["subject_id", "mode"])
    assert again.loc[("sub-001", "scratch"), "resumed"] and rerun.seed_subject == "sub-002"
    assert any(line.startswith("seed sub-001 flagged by QC (") for line in lines), lines
    assert (again.xs("adapted", level="mode").seed_subject == "sub-002").all()
