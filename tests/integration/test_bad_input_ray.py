"""Bad values found in the task, not the driver (issue 16.1): on a real local Ray, a subject whose
headers pass but whose k-space is all zero (or NaN) is scheduled, its task reads the file and fails
with one line naming the file and the member; the other subjects finish; the adapted cohort's
seed stays the good subject."""
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.results import DONE, subject_dir

pytestmark = pytest.mark.slow


def test_a_subject_with_bad_values_fails_in_its_task_naming_the_member(local_ray, sim_cohort, tiny_config, tmp_path):
    zero, nan = tmp_path / "zero.h5", tmp_path / "nan.h5"
    for dst, src in ((zero, "sub-002.h5"), (nan, "sub-003.h5")):
        shutil.copy(sim_cohort.parent / src, dst)
    with h5py.File(zero, "a") as f:
        f["kspace"][...] = 0
    with h5py.File(nan, "a") as f:
        f["kspace"][0, 0, 0, 0, 0] = np.nan
    manifest = tmp_path / "m.csv"
    pd.DataFrame([{"subject_id": "good", "path": str(sim_cohort.parent / "sub-001.h5")},
                  {"subject_id": "zero", "path": str(zero)}, {"subject_id": "nan", "path": str(nan)}]).to_csv(
        manifest, index=False)
    logs = []
    out = tmp_path / "out"
    report = run_cohort(manifest, out, mode="scratch", config=tiny_config, tracking=False, progress=False,
                        log=logs.append)
    assert not any("skipping" in line for line in logs), logs    # the headers passed: nothing skipped up front
    df = pd.read_parquet(out / "results.parquet").set_index("subject_id")
    assert df.loc["good", "status"] == "ok" and (subject_dir(out, "good", "scratch") / DONE).exists()
    for sid, words in (("zero", "member 'kspace': is all zero"), ("nan", "member 'kspace': contains non-finite")):
        error = df.loc[sid, "error"]
        assert df.loc[sid, "status"] == "failed" and str(tmp_path / f"{sid}.h5") in error and words in error, error
        assert "\n" not in error, error
        assert not (subject_dir(out, sid, "scratch") / DONE).exists()
    assert report.n_failed == 2
