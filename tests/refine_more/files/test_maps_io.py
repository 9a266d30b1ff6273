"""Reconstruction output version 1: maps.h5 + NIfTI, atomic writes."""
import json
import os

import h5py
import nibabel as nib
import numpy as np
import pytest

from refine_more.files.atomic import atomic_write
from refine_more.files.maps_io import MapsFormatError, read_maps, write_maps

Z, Y, X = 6, 24, 20


def _maps(seed=0):
    rng = np.random.default_rng(seed)
    tm = np.zeros((Z, Y, X), bool)
    tm[1:5, 4:20, 3:17] = True
    maps = {n: rng.random((Z, Y, X)).astype(np.float64) * s for n, s in
            (("I0", 100.0), ("T1F", 2.0), ("f", 0.2), ("kF", 5.0))}
    maps["T1F"][0, 0, 0] = np.nan  # outside the mask: must become 0
    return maps, tm


def test_maps_round_trip(tmp_path):
    maps, tm = _maps()
    out = tmp_path / "sub-1" / "refine-more"
    p = write_maps(out, maps, tm, subject_id="sub-1", method="refine-more", config_hash="abc123",
                   voxel_size_mm=(2.0, 1.0, 1.5))
    assert p == os.path.join(out, "maps.h5")
    assert sorted(os.listdir(out)) == ["I0.nii.gz", "T1F.nii.gz", "f.nii.gz", "kF.nii.gz", "maps.h5"]
    got, attrs = read_maps(p)
    assert attrs["format"] == "refine-more-maps" and attrs["format_version"] == 1
    assert attrs["subject_id"] == "sub-1" and attrs["method"] == "refine-more"
    assert attrs["config_hash"] == "abc123" and isinstance(attrs["software_version"], str)
    assert got["tissue_mask"].dtype == bool
    np.testing.assert_array_equal(got["tissue_mask"], tm)
    for n in ("I0", "T1F", "f", "kF"):
        assert got[n].dtype == np.float32 and got[n].shape == (Z, Y, X)
        np.testing.assert_array_equal(got[n][tm], maps[n][tm].astype(np.float32))
        assert np.all(got[n][~tm] == 0)
    with h5py.File(p, "r") as f:
        assert f["I0"].dtype == np.float32 and f["tissue_mask"].dtype == bool
    # folder accepted too; explicit software_version kept; tissue_mask may come in the dict
    maps["tissue_mask"] = tm
    write_maps(out, maps, subject_id="sub-1", method="zf-fit", config_hash="h", voxel_size_mm=(1, 1, 1),
               software_version="9.9")
    _, attrs = read_maps(out)
    assert attrs["software_version"] == "9.9" and attrs["method"] == "zf-fit"


def test_nifti_affine_and_shape(tmp_path):
    maps, tm = _maps()
    write_maps(tmp_path, maps, tm, subject_id="s", method="zf-fit", config_hash="h", voxel_size_mm=(2.0, 1.0, 1.5))
    for n in ("I0", "T1F", "f", "kF"):
        img = nib.load(tmp_path / f"{n}.nii.gz")
        assert img.shape == (X, Y, Z)
        np.testing.assert_allclose(img.affine, np.diag([1.5, 1.0, 2.0, 1.0]))
        np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.0, 2.0))
        data = np.asarray(img.dataobj)
        assert data.dtype == np.float32
        ref = np.where(tm, maps[n], 0).astype(np.float32)
        ref[~np.isfinite(ref)] = 0
        np.testing.assert_array_equal(data.transpose(2, 1, 0), ref)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_write_maps_rejects_bad_input(tmp_path):
    maps, tm = _maps()
    with pytest.raises(ValueError):
        write_maps(tmp_path, {k: v for k, v in maps.items() if k != "kF"}, tm, subject_id="s", method="m",
                   config_hash="h", voxel_size_mm=(1, 1, 1))
    with pytest.raises(ValueError):
        write_maps(tmp_path, maps, tm, subject_id="../evil", method="m", config_hash="h", voxel_size_mm=(1, 1, 1))
    with pytest.raises(ValueError):
        write_maps(tmp_path, maps, tm[:, :, :-1], subject_id="s", method="m", config_hash="h",
                   voxel_size_mm=(1, 1, 1))
    assert os.listdir(tmp_path) == []


def test_read_maps_validation(tmp_path):
    maps, tm = _maps()
    p = write_maps(tmp_path, maps, tm, subject_id="s", method="m", config_hash="h", voxel_size_mm=(1, 1, 1),
                   nifti=False)
    bad = tmp_path / "bad.h5"
    with h5py.File(p, "r") as a, h5py.File(bad, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v
        b.attrs["format_version"] = 2
        for k in a:
            a.copy(k, b)
    with pytest.raises(MapsFormatError, match="format_version"):
        read_maps(bad)
    with h5py.File(bad, "a") as b:
        b.attrs["format_version"] = 1
        del b["f"]
        b["f"] = np.zeros((Z, Y, X), np.float64)
    with pytest.raises(MapsFormatError, match="member 'f'") as ei:
        read_maps(bad)
    assert "bad.h5" in str(ei.value) and ei.value.member == "f"
    bad.write_bytes(open(p, "rb").read()[:500])
    with pytest.raises(MapsFormatError, match="bad.h5"):
        read_maps(bad)
    with pytest.raises(MapsFormatError, match="not found"):
        read_maps(tmp_path / "none.h5")


def test_atomic_write(tmp_path):
    p = tmp_path / "sub" / "x.json"
    atomic_write(p, lambda tmp: open(tmp, "w").write(json.dumps({"a": 1})))
    assert json.loads(p.read_text()) == {"a": 1}

    def boom(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("fail")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert json.loads(p.read_text()) == {"a": 1}  # untouched
    assert os.listdir(p.parent) == ["x.json"]      # no temp left

    seen = {}
    atomic_write(tmp_path / "fig.png", lambda tmp: seen.setdefault("name", tmp) and open(tmp, "wb").write(b"x"))
    assert seen["name"].endswith(".png")
