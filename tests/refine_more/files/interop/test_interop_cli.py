"""The interop commands through the ``refine-more`` console script's parser (cohort.console):
``import refine-more-mat|ismrmrd``, ``export ismrmrd|bids``, and ``cohort run --bids``."""
import json
from pathlib import Path

import numpy as np
import pytest

from cohort.console import main
from refine_more.files.subject import read_subject
from test_interop_bids import assert_valid
from test_interop_matlab import write_public_folder


def test_import_public_folder_and_one_line_errors(sim_cohort, tmp_path, capsys):
    s = read_subject(sim_cohort.parent / "sub-002.h5")
    s.coil_sens = (s.coil_sens * s.tissue_mask[None]).astype(np.complex64)
    folder = write_public_folder(tmp_path / "data", s)
    rc = main(["import", "refine-more-mat", str(folder), "--out", str(tmp_path / "s.h5"),
               "--protocol", str(folder / "protocol.json")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subject_id"] == "sub-002" and report["saturation_check"]["w_over_W"]["median"] == pytest.approx(1)
    np.testing.assert_array_equal(read_subject(tmp_path / "s.h5").kspace, s.kspace)
    (folder / "B1.mat").write_bytes((folder / "kspace.mat").read_bytes())    # v7.3 where v5 is expected
    rc = main(["import", "refine-more-mat", str(folder), "--out", str(tmp_path / "t.h5")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and err.startswith(f"error: {folder / 'B1.mat'}: key 'B1': expected a MATLAB v5")


def test_export_and_import_ismrmrd(sim_cohort, tmp_path, capsys):
    src = sim_cohort.parent / "sub-003.h5"
    assert main(["export", "ismrmrd", str(src), "--out", str(tmp_path / "x.mrd.h5")]) == 0
    assert main(["import", "ismrmrd", str(tmp_path / "x.mrd.h5"), "--out", str(tmp_path / "back.h5")]) == 0
    a, b = read_subject(src, load_reference=False), read_subject(tmp_path / "back.h5")
    np.testing.assert_array_equal(a.kspace, b.kspace)
    assert a.protocol == b.protocol and a.subject_id == b.subject_id


def test_cohort_run_with_bids_and_export_bids(local_ray, sim_cohort, tmp_path):
    out, bids = tmp_path / "out", tmp_path / "bids"
    rc = main(["cohort", "run", str(sim_cohort), "--out", str(out), "--mode", "adapted", "--preset", "tiny",
               "--no-tracking", "--no-progress", "--bids", str(bids)])
    assert rc == 0
    assert_valid(bids)
    files = sorted(p.relative_to(bids).as_posix() for p in bids.rglob("*.nii.gz"))
    assert "sub-001/anat/sub-001_rec-scratch_desc-freepool_T1map.nii.gz" in files      # the seed's own run
    assert sum(f.endswith("rec-adapted_desc-boundpoolfraction_MPFmap.nii.gz") for f in files) == 4
    assert main(["export", "bids", str(out), "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.relative_to(tmp_path / "again").as_posix() for p in (tmp_path / "again").rglob("*.nii.gz")) == files
    meta = json.loads((bids / "sub-002/anat/sub-002_rec-adapted_M0map.json").read_text())
    assert meta["Sources"][0] == "sub-002.h5" and meta["FlipAngle"] == [5.0, 10.0, 20.0, 40.0] * 2
