"""Subject file format version 1: round trip, foreign files, one test per bad input, ESPIRiT."""
import os

import h5py
import numpy as np
import pytest

from refine_more.physics.protocol import Protocol
from refine_more.files.subject import Subject, SubjectFormatError, read_subject, validate_subject_file, write_subject
from refine_more.physics.tissue import derive_tissue_mask

T, C, Z, Y, X = 8, 4, 6, 24, 24


def _phantom(z=Z, y=Y, x=X):
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (z, y, x)], indexing="ij")
    obj = ((zz / 1.3) ** 2 + (yy / 0.7) ** 2 + (xx / 0.7) ** 2 < 1).astype(np.float32)
    return obj, yy


def _mask(rng, acs=8, z=Z, y=Y, t=T):
    m = rng.random((t, z, y)) < 0.3
    m[:, :, y // 2 - acs // 2: y // 2 - acs // 2 + acs] = True
    return m


def _kspace(obj, yy, maps, mask):
    ks = []
    for t in range(mask.shape[0]):
        img = obj * (1.0 + 0.1 * t) * np.exp(1j * 0.2 * t * yy)
        ks.append(np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(maps * img, axes=(-3, -2, -1)),
                                               axes=(-3, -2, -1), norm="ortho"), axes=(-3, -2, -1)))
    return (np.asarray(ks) * mask[:, None, :, :, None]).astype(np.complex64)


def make_subject(with_optional=True, seed=0) -> Subject:
    rng = np.random.default_rng(seed)
    obj, yy = _phantom()
    maps = np.ones((C, Z, Y, X), np.complex64) / np.sqrt(C)
    mask = _mask(rng)
    ks = _kspace(obj, yy, maps, mask)
    s = Subject(subject_id="sub-01_a.b", kspace=ks, mask=mask, protocol=Protocol.paper_in_vivo(),
                voxel_size_mm=np.array([2.0, 1.0, 1.5]))
    if with_optional:
        s.coil_sens = maps
        s.b1 = np.full((Z, Y, X), 0.95, np.float32)
        s.tissue_mask = obj > 0
        s.reference = {"T1F": np.full((Z, Y, X), 1.2, np.float32), "f": obj * 0.1, "kF": obj * 2.0,
                       "I0": obj.copy(), "kspace_full": _kspace(obj, yy, maps, np.ones_like(mask)),
                       "labels": (obj > 0).astype(np.int16)}
        s.label_names = ["brain"]
    return s


@pytest.fixture
def good(tmp_path):
    p = tmp_path / "good.h5"
    write_subject(p, make_subject())
    return p


def _copy_without(src, dst, drop_member=None, drop_attr=None, set_attrs=None, replace=None):
    """Copy a subject file, dropping/replacing members or attributes (plain h5py)."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for k, v in a.attrs.items():
            if k != drop_attr:
                b.attrs[k] = v
        for k, v in (set_attrs or {}).items():
            b.attrs[k] = v
        for k in a.keys():
            if k == drop_member:
                continue
            if replace and k in replace:
                b.create_dataset(k, data=replace[k])
            else:
                a.copy(k, b)
        for k, v in (replace or {}).items():
            if k not in a:
                b.create_dataset(k, data=v)
    return dst


def _expect_error(path, member):
    with pytest.raises(SubjectFormatError) as ei:
        read_subject(path)
    msg = str(ei.value)
    assert os.fspath(path) in msg and os.path.basename(path) in msg
    if member is not None:
        assert f"'{member}'" in msg, msg
        assert member in [ln.split("'")[1] for ln in ei.value.problems if "'" in ln]
    assert ei.value.path == os.fspath(path)
    problems = validate_subject_file(path)
    assert problems and all(ln.startswith(os.fspath(path)) for ln in problems)
    return ei.value


# ---------------------------------------------------------------------------------------------
def test_round_trip(good):
    s0 = make_subject()
    s = read_subject(good)
    assert validate_subject_file(good) == []
    assert s.subject_id == s0.subject_id and s.path == os.fspath(good)
    assert s.kspace.dtype == np.complex64 and s.kspace.shape == (T, C, Z, Y, X)
    np.testing.assert_array_equal(s.kspace, s0.kspace)
    assert s.mask.dtype == bool
    np.testing.assert_array_equal(s.mask, s0.mask)
    assert s.protocol == s0.protocol
    assert s.voxel_size_mm.dtype == np.float64
    np.testing.assert_array_equal(s.voxel_size_mm, [2.0, 1.0, 1.5])
    np.testing.assert_array_equal(s.coil_sens, s0.coil_sens)
    np.testing.assert_array_equal(s.b1, s0.b1)
    np.testing.assert_array_equal(s.tissue_mask, s0.tissue_mask)
    assert set(s.reference) == {"T1F", "f", "kF", "I0", "kspace_full", "labels"}
    for k, v in s0.reference.items():
        np.testing.assert_array_equal(s.reference[k], v)
    assert s.reference["labels"].dtype == np.int16 and s.label_names == ["brain"]
    assert s.shape == (Z, Y, X) and s.n_images == T and s.n_coils == C
    assert not any("b1" in n for n in s.notes)
    s2 = read_subject(good, load_reference=False)
    assert s2.reference == {}
    s3 = read_subject(good, load_reference="maps")      # what scoring needs, without the fully sampled k-space
    assert set(s3.reference) == {"T1F", "f", "kF", "I0", "labels"}
    np.testing.assert_array_equal(s3.reference["T1F"], s0.reference["T1F"])


def test_written_dtypes_follow_spec(good):
    with h5py.File(good, "r") as f:
        assert f.attrs["format"] == "refine-more-subject" and int(f.attrs["format_version"]) == 1
        assert f.attrs["sequence"] == "BTS" and isinstance(f.attrs["subject_id"], str)
        assert f["kspace"].dtype == np.complex64 and f["mask"].dtype == np.uint8
        assert f.attrs["saturation"].dtype == np.uint8
        assert f.attrs["flip_angles_deg"].dtype == np.float64
        assert f["tissue_mask"].dtype == bool and f["b1"].dtype == np.float32
        assert f["reference/T1F"].dtype == np.float32 and f["reference/labels"].dtype == np.int16
        assert list(f["reference/labels"].attrs["names"]) == ["brain"]
    leftovers = [p for p in os.listdir(os.path.dirname(good)) if p.endswith(".tmp")]
    assert leftovers == []


def test_foreign_file_plain_h5py(tmp_path):
    """A file written by a plain h5py script following the spec (bool mask, scalar TR_s,
    integer-valued lists, optional members absent)."""
    s0 = make_subject(with_optional=False)
    p = tmp_path / "foreign.h5"
    with h5py.File(p, "w") as f:
        f["kspace"] = s0.kspace
        f["mask"] = s0.mask.astype(bool)
        f.attrs.update({
            "format": "refine-more-subject", "format_version": 1, "subject_id": "foreign1",
            "sequence": "BTS", "flip_angles_deg": [5.0, 10.0, 20.0, 40.0] * 2,
            "saturation": np.array([0, 0, 0, 0, 1, 1, 1, 1], np.uint8), "TR_s": 0.04, "TE_s": 0.012,
            "tau_exc_s": 500e-6, "tau_sat_s": 8e-3, "sat_pulse": "fermi", "sat_b1max_uT": 7.3,
            "sat_offset_hz": 4000.0, "voxel_size_mm": [2.0, 1.0, 1.0]})
    assert validate_subject_file(p) == []
    s = read_subject(p)
    assert s.subject_id == "foreign1" and s.protocol == Protocol.paper_in_vivo()
    assert s.b1 is None and any("b1 absent: taken as 1" in n for n in s.notes)
    assert s.coil_sens is None and s.tissue_mask is None and s.reference == {}
    tm = derive_tissue_mask(s)
    obj, _ = _phantom()
    assert tm.dtype == bool and tm.shape == (Z, Y, X)
    dice = 2 * (tm & (obj > 0)).sum() / (tm.sum() + (obj > 0).sum())
    assert dice > 0.8, dice


def test_fixed_length_strings_and_per_image_TR(tmp_path, good):
    p = _copy_without(good, tmp_path / "fixed.h5", set_attrs={
        "format": np.bytes_(b"refine-more-subject"), "subject_id": np.bytes_(b"abc"),
        "TR_s": np.full(T, 0.04)})
    s = read_subject(p)
    assert s.subject_id == "abc" and s.protocol.TR_s == (0.04,) * T


# --- one test per bad input ------------------------------------------------------------------
def test_missing_required_member(tmp_path, good):
    _expect_error(_copy_without(good, tmp_path / "nokspace.h5", drop_member="kspace"), "kspace")
    _expect_error(_copy_without(good, tmp_path / "nomask.h5", drop_member="mask"), "mask")


def test_missing_attribute(tmp_path, good):
    e = _expect_error(_copy_without(good, tmp_path / "noattr.h5", drop_attr="tau_sat_s"), "tau_sat_s")
    assert "attribute 'tau_sat_s'" in str(e)
    _expect_error(_copy_without(good, tmp_path / "nofmt.h5", drop_attr="format"), "format")


def test_wrong_dtype(tmp_path, good):
    s = make_subject()
    e = _expect_error(_copy_without(good, tmp_path / "k128.h5", replace={"kspace": s.kspace.astype(np.complex128)}),
                      "kspace")
    assert "expected complex64 (T, C, Z, Y, X), got complex128" in str(e)
    e = _expect_error(_copy_without(good, tmp_path / "kfloat.h5", replace={"kspace": s.kspace.real[:, :, :, :, 0]}),
                      "kspace")
    assert f"expected complex64 (T, C, Z, Y, X), got float32 ({T}, {C}, {Z}, {Y})" in str(e)
    _expect_error(_copy_without(good, tmp_path / "b1.h5", replace={"b1": s.b1.astype(np.float64)}), "b1")
    _expect_error(_copy_without(good, tmp_path / "maskf.h5", replace={"mask": s.mask.astype(np.float32)}), "mask")
    _expect_error(_ref_replaced(good, tmp_path / "ref.h5", "T1F", s.reference["T1F"].astype(np.float64)),
                  "reference/T1F")
    _expect_error(_copy_without(good, tmp_path / "fa.h5", set_attrs={"flip_angles_deg": "five"}), "flip_angles_deg")


def _ref_replaced(src, dst, name, data):
    _copy_without(src, dst)
    with h5py.File(dst, "a") as f:
        del f[f"reference/{name}"]
        f[f"reference/{name}"] = data
    return dst


def test_wrong_shape(tmp_path, good):
    s = make_subject()
    _expect_error(_copy_without(good, tmp_path / "m.h5", replace={"mask": s.mask[:, :, :-1]}), "mask")
    _expect_error(_copy_without(good, tmp_path / "cs.h5", replace={"coil_sens": s.coil_sens[:2]}), "coil_sens")
    _expect_error(_copy_without(good, tmp_path / "tm.h5", replace={"tissue_mask": s.tissue_mask[:, :, :-1]}),
                  "tissue_mask")
    _expect_error(_copy_without(good, tmp_path / "vx.h5", set_attrs={"voxel_size_mm": [1.0, 1.0]}), "voxel_size_mm")
    _expect_error(_ref_replaced(good, tmp_path / "kf.h5", "kspace_full", s.kspace[:-1]), "reference/kspace_full")


def test_T_mismatch_flip_angles(tmp_path, good):
    e = _expect_error(_copy_without(good, tmp_path / "fa.h5", set_attrs={"flip_angles_deg": [5.0, 10.0, 20.0]}),
                      "flip_angles_deg")
    assert f"T = {T}" in str(e)
    _expect_error(_copy_without(good, tmp_path / "sat.h5", set_attrs={"saturation": np.zeros(3, np.uint8)}),
                  "saturation")
    _expect_error(_copy_without(good, tmp_path / "tr.h5", set_attrs={"TR_s": np.full(3, 0.04)}), "TR_s")


def test_nan_in_kspace(tmp_path, good):
    k = make_subject().kspace.copy()
    k[1, 0, 2, 12, 3] = np.nan
    e = _expect_error(_copy_without(good, tmp_path / "nan.h5", replace={"kspace": k}), "kspace")
    assert "NaN" in str(e)


def test_inf_in_kspace(tmp_path, good):
    k = make_subject().kspace.copy()
    k[0, 1, 0, 12, 0] = np.inf
    e = _expect_error(_copy_without(good, tmp_path / "inf.h5", replace={"kspace": k}), "kspace")
    assert "Inf" in str(e)


def test_all_zero_mask(tmp_path, good):
    m = make_subject().mask
    _expect_error(_copy_without(good, tmp_path / "zero.h5", replace={"mask": np.zeros_like(m, np.uint8)}), "mask")
    m1 = m.astype(np.uint8)
    m1[3] = 0
    e = _expect_error(_copy_without(good, tmp_path / "zero3.h5", replace={"mask": m1}), "mask")
    assert "[3]" in str(e)


def test_unknown_format_version(tmp_path, good):
    e = _expect_error(_copy_without(good, tmp_path / "v2.h5", set_attrs={"format_version": 2}), "format_version")
    assert "unknown format version 2" in str(e)
    _expect_error(_copy_without(good, tmp_path / "fmt.h5", set_attrs={"format": "something-else"}), "format")


@pytest.mark.parametrize("how", ["truncate", "garbage", "empty", "corrupt_middle"])
def test_truncated_or_corrupt(tmp_path, good, how):
    data = open(good, "rb").read()
    p = tmp_path / f"bad_{how}.h5"
    if how == "truncate":
        p.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        p.write_bytes(b"this is not hdf5 at all" * 100)
    elif how == "empty":
        p.write_bytes(b"")
    else:  # valid superblock, overwritten body
        body = bytearray(data)
        body[2048:] = np.random.default_rng(1).integers(0, 256, len(body) - 2048, dtype=np.uint8).tobytes()
        p.write_bytes(bytes(body))
    with pytest.raises(SubjectFormatError) as ei:
        read_subject(p)
    assert os.fspath(p) in str(ei.value)
    assert validate_subject_file(p)


def test_nonexistent_path(tmp_path):
    p = tmp_path / "nope.h5"
    with pytest.raises(SubjectFormatError) as ei:
        read_subject(p)
    assert "nope.h5" in str(ei.value) and "not found" in str(ei.value)
    assert validate_subject_file(p) == [f"{p}: file not found"]


@pytest.mark.parametrize("sid", ["../evil", "..", ".", "a/b", "", "x y"])
def test_bad_subject_id(tmp_path, good, sid):
    _expect_error(_copy_without(good, tmp_path / "sid.h5", set_attrs={"subject_id": sid}), "subject_id")


def test_write_rejects_bad_subject_id(tmp_path):
    s = make_subject(with_optional=False)
    s.subject_id = "../evil"
    with pytest.raises(SubjectFormatError):
        write_subject(tmp_path / "x.h5", s)
    assert os.listdir(tmp_path) == []


def test_validate_lists_all_problems(tmp_path, good):
    k = make_subject().kspace.copy()
    k[0, 0, 0, 12, 0] = np.nan
    p = _copy_without(good, tmp_path / "many.h5", drop_attr="TE_s", replace={"kspace": k},
                      set_attrs={"subject_id": "../evil", "sequence": "SPGR"})
    problems = validate_subject_file(p)
    names = {ln.split("'")[1] for ln in problems}
    # every header problem at once; the values (the NaN) are read only once the headers pass
    assert {"TE_s", "subject_id", "sequence"} <= names and "kspace" not in names, problems
    with pytest.raises(SubjectFormatError) as ei:
        read_subject(p)
    assert ei.value.problems == problems
    assert validate_subject_file(good) == []
    headers_ok = _copy_without(good, tmp_path / "nan.h5", replace={"kspace": k})
    assert [ln.split("'")[1] for ln in validate_subject_file(headers_ok)] == ["kspace"]


def test_espirit_birdcage():
    import sigpy.mri

    from refine_more.physics.coils import calibration_region, coil_maps_for, estimate_coil_maps

    c, z, y, x = 4, 6, 24, 24
    S = sigpy.mri.birdcage_maps((c, z, y, x)).astype(np.complex64)
    obj, yy = _phantom(z, y, x)
    mask = _mask(np.random.default_rng(3), acs=10, z=z, y=y, t=4)
    assert calibration_region(mask) == (z, 10)
    ks = _kspace(obj, yy, S, mask)
    est = estimate_coil_maps(ks, mask)
    assert est.dtype == np.complex64 and est.shape == (c, z, y, x)
    ss = np.sum(np.abs(est) ** 2, axis=0)
    nz = ss > 0
    np.testing.assert_allclose(ss[nz], 1.0, atol=1e-4)
    St = S / np.sqrt(np.sum(np.abs(S) ** 2, axis=0))
    corr = np.abs(np.sum(est.conj() * St, axis=0))[obj > 0]
    assert np.median(corr) > 0.99 and np.percentile(corr, 5) > 0.95, (np.median(corr), corr.min())
    subj = Subject(subject_id="s", kspace=ks, mask=mask, protocol=Protocol.paper_in_vivo((5.0, 20.0)),
                   voxel_size_mm=np.ones(3))
    np.testing.assert_array_equal(coil_maps_for(subj), est)
    subj.coil_sens = St
    assert coil_maps_for(subj) is St
