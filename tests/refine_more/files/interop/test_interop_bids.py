"""BIDS derivatives (refine_more/files/interop/bids.py), checked by the BIDS validator and indexed by pybids.

The validator is the schema-based one (``bids-validator-deno`` from PyPI: the BIDS validator's
JavaScript bundle run by the ``deno`` wheel's binary); it runs offline with the schema it ships.
(The Python ``bids-validator`` package's ``BIDSValidator`` only matches raw-dataset paths, and
knows nothing of derivatives.)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from refine_more.files.interop.bids import BidsEntry, bids_label, entries_from_results, write_bids
from refine_more.files.maps_io import write_maps
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.files.subject import write_subject


def validator():
    exe = Path(sys.executable).parent / "bids-validator-deno"
    exe = str(exe) if exe.exists() else shutil.which("bids-validator-deno")
    # a test extra: a missing validator is a broken install and fails the test, never skips it
    assert exe is not None, "bids-validator-deno is not installed (pip install -e '.[test]')"
    return exe


def validate(root) -> list:
    """Errors the BIDS validator finds in ``root`` (warnings are returned too, as (severity, code, where))."""
    proc = subprocess.run([validator(), "--json", str(root)], capture_output=True, text=True, timeout=300)
    report = json.loads(proc.stdout)
    return [(i["severity"], i["code"], i.get("location"), i.get("subCode")) for i in report["issues"]["issues"]]


def assert_valid(root):
    issues = validate(root)
    errors = [i for i in issues if i[0] == "error"]
    assert not errors, errors
    return issues


@pytest.fixture(scope="module")
def recon_dirs(tmp_path_factory):
    """Two subjects' maps.h5 (the simulation's truth as maps) and their subject files."""
    tmp = tmp_path_factory.mktemp("maps")
    out = []
    for sid, seed in (("sub-001", 1), ("sub-x_2", 2)):
        s = simulate_subject(sid, SimulationConfig(matrix=(4, 16, 16), n_coils=2), seed=seed)
        write_subject(tmp / f"{sid}.h5", s)
        for mode in ("scratch", "adapted"):
            write_maps(tmp / sid / mode, s.reference, s.tissue_mask, subject_id=sid, method=f"refine-more-{mode}",
                       config_hash="abc123", voxel_size_mm=s.voxel_size_mm, nifti=False)
        out.append((sid, tmp / f"{sid}.h5", tmp / sid))
    return out


def test_labels():
    assert bids_label("sub-001") == "001" and bids_label("sub-x_2") == "x2" and bids_label("P.07") == "P07"
    with pytest.raises(ValueError):
        bids_label("sub-_")
    assert bids_label("../../etc") == "etc"      # never leaves the output folder


def test_derivatives_pass_the_validator_and_index_with_pybids(recon_dirs, tmp_path):
    entries = [BidsEntry(str(d / mode / "maps.h5"), str(path), mode) for _, path, d in recon_dirs
               for mode in ("scratch", "adapted")]
    written = write_bids(tmp_path / "bids", entries)
    assert len(written) == 16
    issues = assert_valid(tmp_path / "bids")
    assert {i[1] for i in issues} == {"TOO_FEW_AUTHORS"}  # MPFmap/kFmap are in .bidsignore; no author list

    from bids import BIDSLayout
    layout = BIDSLayout(tmp_path / "bids", is_derivative=True, validate=False)
    assert sorted(layout.get_subjects()) == ["001", "x2"]
    t1 = layout.get(subject="001", suffix="T1map", desc="freepool", reconstruction="adapted", extension=".nii.gz")
    assert len(t1) == 1
    meta = t1[0].get_metadata()
    assert meta["Units"] == "s" and meta["EstimationReference"] == "https://doi.org/10.1002/mrm.70227"
    assert meta["FlipAngle"] == [5.0, 10.0, 20.0, 40.0] * 2 and meta["RepetitionTimeExcitation"] == 0.04
    assert meta["MTOffsetFrequency"] == 4000.0 and meta["MTPulseDuration"] == 0.008 and meta["MTPulseShape"] == "FERMI"
    assert meta["Sources"][0] == "sub-001.h5"
    f = layout.get(subject="x2", desc="boundpoolfraction", reconstruction="scratch", extension=".nii.gz")
    assert [x.entities["suffix"] for x in f] == ["MPFmap"]
    desc = json.loads((tmp_path / "bids" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["ConfigHashes"] == ["abc123"]


def test_maps_survive_into_nifti(recon_dirs, tmp_path):
    import nibabel as nib

    from refine_more.files.maps_io import read_maps
    sid, path, d = recon_dirs[0]
    write_bids(tmp_path, [BidsEntry(str(d / "scratch" / "maps.h5"), str(path), "scratch")])
    maps, attrs = read_maps(d / "scratch" / "maps.h5")
    img = nib.load(tmp_path / "sub-001" / "anat" / "sub-001_rec-scratch_desc-freetobound_kFmap.nii.gz")
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), maps["kF"])
    vz, vy, vx = attrs["voxel_size_mm"]
    np.testing.assert_allclose(np.diag(img.affine)[:3], [vx, vy, vz])


def test_colliding_labels_fail(recon_dirs, tmp_path):
    _, path, d = recon_dirs[1]
    other = tmp_path / "maps"
    from refine_more.files.maps_io import read_maps
    maps, attrs = read_maps(d / "scratch" / "maps.h5")
    write_maps(other, maps, subject_id="sub-x2", method="m", config_hash="h", voxel_size_mm=[1, 1, 1], nifti=False)
    with pytest.raises(ValueError, match="same BIDS label 'x2'"):
        write_bids(tmp_path / "bids", [BidsEntry(str(d / "scratch" / "maps.h5")), BidsEntry(str(other / "maps.h5"))])


def test_single_recon_output_folder(recon_dirs, tmp_path):
    _, path, d = recon_dirs[0]
    entries = entries_from_results(d / "adapted", subject_path=path)
    write_bids(tmp_path, entries)
    assert (tmp_path / "sub-001" / "anat" / "sub-001_desc-freepool_T1map.nii.gz").exists()
    assert_valid(tmp_path)
