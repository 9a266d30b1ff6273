"""A cohort's bad input, refused before the driver starts (no Ray here): manifests, configs,
--out; and the driver's up-front validation, which reads headers only (issue 16.1, 16.6)."""
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from cohort.console import main
from cohort.manifest import ManifestError, read_manifest, validate_entries
from refine_more.files.subject import validate_subject_file


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def _manifest(tmp_path, sim_cohort, rows, name="m.parquet"):
    m = tmp_path / name
    pd.DataFrame(rows).to_parquet(m) if name.endswith(".parquet") else pd.DataFrame(rows).to_csv(m, index=False)
    return m


def _path(sim_cohort, i):
    return str(sim_cohort.parent / f"sub-00{i}.h5")


def test_two_seed_rows_are_refused(tmp_path, sim_cohort):
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": f"s{i}", "path": _path(sim_cohort, i), "role": "seed"}
                                         for i in (1, 2)])
    with pytest.raises(ManifestError, match=r"rows \[0, 1\] all have role 'seed'"):
        read_manifest(m)


def test_an_unknown_role_is_refused(tmp_path, sim_cohort):
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": "s1", "path": _path(sim_cohort, 1), "role": "sead"}])
    with pytest.raises(ManifestError, match=r"row 0: unknown role 'sead'"):
        read_manifest(m)


@pytest.mark.parametrize("ids, row", [(["s1", None], 1), (["s1", float("nan")], 1), ([1.0, 2.0], 0)])
def test_a_missing_or_float_subject_id_is_refused_not_turned_into_text(tmp_path, sim_cohort, ids, row):
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": sid, "path": _path(sim_cohort, i + 1)}
                                         for i, sid in enumerate(ids)])
    with pytest.raises(ManifestError, match=rf"row {row}: subject_id .*missing or not text"):
        read_manifest(m)


def test_a_rejected_manifest_leaves_no_output_folder(tmp_path, sim_cohort, capsys):
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": "../x", "path": _path(sim_cohort, 1)}])
    out = tmp_path / "out"
    assert main(["cohort", "run", str(m), "--out", str(out), "--no-tracking"]) == 2
    _one_error_line(capsys, str(m), "../x")
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--set", "iters_stage1=-5"], "config.iters_stage1: must be an integer >= 1"),
    (["--set", "unroll.iterations=-1"], "config.unroll.iterations"),
    (["--set", "adapt.lr=-1"], "config.adapt.lr"),
])
def test_a_bad_config_is_refused_before_any_worker(tmp_path, sim_cohort, capsys, args, words):
    out = tmp_path / "out"
    assert main(["cohort", "run", str(sim_cohort), "--out", str(out), "--no-tracking", *args]) == 2
    _one_error_line(capsys, words)
    assert not out.exists()


def test_a_bad_config_file_is_refused_in_one_line(tmp_path, sim_cohort, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("unroll: {iterations: 2\n")
    assert main(["cohort", "run", str(sim_cohort), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    _one_error_line(capsys, str(cfg), "YAML syntax error at line")


def test_the_driver_refuses_a_bad_config_itself(tmp_path, sim_cohort):
    """The Python API too: run_cohort checks the config before it connects to Ray."""
    from cohort.driver import run_cohort
    from refine_more.config import preset
    bad = preset("tiny").to_dict()
    bad["unroll"]["iterations"] = -1
    with pytest.raises(ValueError, match="config.unroll.iterations"):
        run_cohort(sim_cohort, tmp_path / "o", config=bad, tracking=False, progress=False)


def test_out_that_is_a_file_is_refused(tmp_path, sim_cohort, capsys):
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(["cohort", "run", str(sim_cohort), "--out", str(taken), "--no-tracking"]) == 2
    _one_error_line(capsys, "--out", "is a file")


def test_the_driver_validates_headers_only(tmp_path, sim_cohort):
    """A file whose headers pass but whose values are bad (NaN) is left to its task, which reads it
    anyway and fails with the member named (tests/integration/test_bad_input_ray.py); a file whose
    headers lie (1 GiB declared, never written) is refused up front without reading it."""
    nan = tmp_path / "nan.h5"
    shutil.copy(_path(sim_cohort, 1), nan)
    with h5py.File(nan, "a") as f:
        f["kspace"][0, 0, 0, 0, 0] = np.nan
    empty = tmp_path / "empty.h5"
    shutil.copy(_path(sim_cohort, 2), empty)
    with h5py.File(empty, "a") as f:
        del f["kspace"]
        f.create_dataset("kspace", shape=(8, 128, 16, 256, 256), dtype=np.complex64, chunks=(1, 1, 16, 256, 256))
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": "nan", "path": str(nan)},
                                         {"subject_id": "empty", "path": str(empty)},
                                         {"subject_id": "loop", "path": str(tmp_path / "loop.h5")}])
    os.symlink(tmp_path / "loop.h5", tmp_path / "loop.h5")
    ok, bad, loop = validate_entries(read_manifest(m))
    assert ok.valid and "non-finite" in validate_subject_file(nan)[0]
    assert len(bad.problems) == 1 and "member 'kspace'" in bad.problems[0] and "never written" in bad.problems[0]
    assert "symbolic link loop" in loop.problems[0]


def test_a_cohort_of_only_missing_files_finishes_without_a_cluster(tmp_path, sim_cohort):
    """Nothing to run (every path missing): no Ray is started, and the driver still records every
    subject as failed with its file named, instead of asking a cluster it never joined for resources."""
    from cohort.driver import run_cohort
    m = _manifest(tmp_path, sim_cohort, [{"subject_id": f"s{i}", "path": str(tmp_path / f"gone{i}.h5")} for i in range(2)])
    lines = []
    rep = run_cohort(m, tmp_path / "out", mode="adapted", tracking=False, progress=False, log=lines.append)
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(df.subject_id) == {"s0", "s1"} and (df.status == "failed").all()
    assert all("does not exist" in e for e in df.error), df.error.tolist()
    assert rep.rows and any("skipping s0" in line for line in lines)
