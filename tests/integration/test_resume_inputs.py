"""Resume on a real local Ray trusts done.json only with its outputs and its input: a deleted maps.h5,
a manifest row now pointing at another subject's file and a file rewritten in place are redone
(with a log line saying why); a subject file moved elsewhere (same bytes) is resumed."""
import shutil

import pandas as pd
import pytest

from cohort.driver import run_cohort
from cohort.results import subject_dir

pytestmark = pytest.mark.slow


def test_resume_checks_outputs_and_input_digest(local_ray, sim_cohort, tiny_config, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sim_cohort.parent, data)           # the session's files stay untouched
    manifest = data / "manifest.parquet"
    out = tmp_path / "out"
    run = dict(mode="scratch", config=tiny_config, progress=False, tracking=False)
    first = run_cohort(manifest, out, **run, log=lambda *a: None)
    assert first.n_reconstructed == 4 and first.n_failed == 0
    df = pd.read_parquet(out / "results.parquet")
    assert df.input_sha256.str.fullmatch(r"[0-9a-f]{64}").all()

    (subject_dir(out, "sub-002", "scratch") / "maps.h5").unlink()            # an output lost
    m = pd.read_parquet(manifest)
    moved = tmp_path / "elsewhere" / "sub-001.h5"
    moved.parent.mkdir()
    shutil.copy(data / "sub-001.h5", moved)                                   # same bytes, new path and mtime
    m.loc[m.subject_id == "sub-001", "path"] = str(moved)
    m.loc[m.subject_id == "sub-003", "path"] = "sub-004.h5"                   # the row now names another file
    m.to_parquet(manifest, index=False)
    shutil.copy(data / "sub-002.h5", data / "sub-004.h5")                     # rewritten in place
    lines = []
    rerun = run_cohort(manifest, out, **run, log=lines.append)

    df = pd.read_parquet(out / "results.parquet").set_index("subject_id")
    assert rerun.n_reconstructed == 3 and (df.status == "ok").all()
    assert df.resumed.to_dict() == {"sub-001": True, "sub-002": False, "sub-003": False, "sub-004": False}
    redo = sorted(line for line in lines if line.startswith("redo "))
    assert len(redo) == 3, lines
    assert redo[0].startswith("redo sub-002/scratch: maps.h5 is missing from ")
    assert redo[1].startswith("redo sub-003/scratch: input ") and "sub-004.h5 is not the file" in redo[1]
    assert "the row pointed at" in redo[1] and "differs" in redo[1]
    assert redo[2].startswith("redo sub-004/scratch: input ") and "differs" in redo[2]
    for sid, r in df.iterrows():
        assert (subject_dir(out, sid, "scratch") / "maps.h5").is_file()
    assert df.loc["sub-003", "subject_path"].endswith("sub-004.h5")
    assert df.loc["sub-003", "input_sha256"] == df.loc["sub-004", "input_sha256"]   # both now sub-002's bytes
