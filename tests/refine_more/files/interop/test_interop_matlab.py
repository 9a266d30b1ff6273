"""The paper's public code data folder → subject file (refine_more/files/interop/public_code.py).

The folder is written with the foreign formats' own libraries: MATLAB v7.3 files by
``hdf5storage`` (HDF5 with MATLAB's 512-byte header, column-major, complex as real/imag
compound), v5 files by ``scipy.io.savemat``; the public code's FFT convention and axes are
applied by :func:`spec_to_public_kspace` and transposes written out here.
"""
import json

import h5py
import numpy as np
import pytest
import scipy.io

import hdf5storage  # test extra: a missing one must fail, not skip

from refine_more.files.interop.common import ForeignFormatError  # noqa: E402
from refine_more.files.interop.public_code import (import_public_folder, public_to_spec_kspace,  # noqa: E402
                                             spec_to_public_kspace)
from refine_more.physics.protocol import Protocol  # noqa: E402
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject  # noqa: E402
from refine_more.files.subject import Subject, read_subject, write_subject  # noqa: E402


def save73(path, **arrays):
    hdf5storage.savemat(str(path), arrays, format="7.3", matlab_compatible=True, store_python_metadata=False,
                        truncate_existing=True)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A simulated subject as the public code would hold it: coil maps zero outside the tissue
    (BART's), the tissue mask their support, k-space and the rest as simulated."""
    s = simulate_subject("sub-mat01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=5)
    s.coil_sens = (s.coil_sens * s.tissue_mask[None]).astype(np.complex64)
    s.reference = {"kspace_full": s.reference["kspace_full"]}
    path = tmp_path_factory.mktemp("orig") / "sub-mat01.h5"
    write_subject(path, s)
    return read_subject(path)


def write_public_folder(folder, s, *, w_scale=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    k_pub = spec_to_public_kspace(s.reference["kspace_full"])             # (T, C, Z, Y, X), complex128
    save73(folder / "kspace.mat", kspace=k_pub.transpose(4, 3, 2, 1, 0))  # [FE, PE1, PE2, coil, image]
    save73(folder / "sensitivity_maps.mat", bart_sensitivity=s.coil_sens.transpose(3, 2, 1, 0))
    scipy.io.savemat(folder / "Gaussian_2PE_mask.mat", {"mask": s.mask.transpose(2, 1, 0).astype(np.uint8)})
    scipy.io.savemat(folder / "B1.mat", {"B1": s.b1.transpose(2, 1, 0).astype(np.float64)})
    p = s.protocol
    b1sq = s.b1.astype(np.float64).transpose(2, 1, 0) ** 2
    w0 = np.stack([v * b1sq for v in p.W0_nominal()[:4]], -1) * w_scale
    save73(folder / "BTS_sat.mat", w0=w0, w=p.W_sat_nominal * b1sq * w_scale)
    (folder / "protocol.json").write_text(json.dumps({"voxel_size_mm": s.voxel_size_mm.tolist(),
                                                      "subject_id": s.subject_id}))
    return folder


@pytest.fixture(scope="module")
def imported(original, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pub")
    folder = write_public_folder(tmp / "data", original)
    report = import_public_folder(folder, tmp / "imported.h5", protocol_file=folder / "protocol.json")
    return read_subject(tmp / "imported.h5"), report, folder


def test_v73_files_are_hdf5_with_the_matlab_header(imported):
    _, _, folder = imported
    head = (folder / "kspace.mat").read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    with h5py.File(folder / "kspace.mat", "r") as f:
        assert f.userblock_size == 512
        assert f["kspace"].shape == (8, 4, 6, 24, 24)        # HDF5 holds MATLAB's axes reversed


def test_round_trip_identical_kspace_mask_protocol(original, imported):
    s, report, _ = imported
    np.testing.assert_array_equal(s.kspace, original.kspace)
    np.testing.assert_array_equal(s.reference["kspace_full"], original.reference["kspace_full"])
    np.testing.assert_array_equal(s.mask, original.mask)
    assert s.protocol == original.protocol
    np.testing.assert_array_equal(s.voxel_size_mm, original.voxel_size_mm)
    np.testing.assert_array_equal(s.coil_sens, original.coil_sens)
    np.testing.assert_array_equal(s.b1, original.b1)
    np.testing.assert_array_equal(s.tissue_mask, original.tissue_mask)
    assert s.subject_id == "sub-mat01" and report["shape_TCZYX"] == [8, 4, 6, 24, 24]


def test_w_and_w0_agree_with_ours_when_computed_alike(imported):
    sat = imported[1]["saturation_check"]
    assert sat["w_over_W"]["median"] == pytest.approx(1.0, rel=1e-9)
    for angle in ("5", "10", "20", "40"):
        assert sat["w0_over_W0"][angle]["p05"] == pytest.approx(1.0, rel=1e-9)
        assert sat["w0_over_W0"][angle]["p95"] == pytest.approx(1.0, rel=1e-9)


def test_tiny_recon_of_the_imported_file_equals_the_original(original, imported):
    from refine_more.config import preset
    from refine_more.reconstruction.recon import reconstruct

    a = reconstruct(original, preset("tiny"))
    b = reconstruct(imported[0], preset("tiny"))
    for name in ("I0", "T1F", "f", "kF"):
        np.testing.assert_array_equal(a.maps[name], b.maps[name])


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 9), (3, 6, 5)])
def test_fft_convention_even_and_odd(shape):
    """The imported k-space's spec image is the image the public code computes from the file."""
    rng = np.random.default_rng(0)
    k_pub = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    axes = (0, 1, 2)
    # the public code (recon_demo.py): images = fftshift(ifftn(fftshift(k)))
    theirs = np.fft.fftshift(np.fft.ifftn(np.fft.fftshift(k_pub, axes=axes), axes=axes), axes=axes)
    k = public_to_spec_kspace(k_pub)
    ours = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(spec_to_public_kspace(k), k_pub, rtol=1e-12, atol=1e-12)


# -- malformed folders: one line naming file and key ----------------------------------------------
def _broken(original, tmp_path, fn):
    folder = write_public_folder(tmp_path / "data", original)
    fn(folder)
    with pytest.raises(ForeignFormatError) as info:
        import_public_folder(folder, tmp_path / "out.h5", protocol_file=folder / "protocol.json")
    assert not (tmp_path / "out.h5").exists()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key(original, tmp_path):
    msg = _broken(original, tmp_path, lambda d: save73(d / "kspace.mat", ksp=np.zeros((2, 2, 2, 2, 8))))
    assert msg.startswith(f"{tmp_path / 'data' / 'kspace.mat'}: key 'kspace': missing")


def test_wrong_rank(original, tmp_path):
    msg = _broken(original, tmp_path, lambda d: save73(
        d / "kspace.mat", kspace=np.ones((24, 24, 6, 8), np.complex64)))
    assert "kspace.mat: key 'kspace': expected rank 5 [FE, PE1, PE2, coil, image], got rank 4" in msg


def test_v5_where_v73_expected(original, tmp_path):
    msg = _broken(original, tmp_path, lambda d: scipy.io.savemat(
        d / "sensitivity_maps.mat", {"bart_sensitivity": original.coil_sens.transpose(3, 2, 1, 0)}))
    assert "sensitivity_maps.mat: key 'bart_sensitivity': expected a MATLAB v7.3 (HDF5) file" in msg
    assert "got MATLAB v5" in msg


def test_v73_where_v5_expected_and_mismatched_mask(original, tmp_path):
    msg = _broken(original, tmp_path, lambda d: save73(d / "Gaussian_2PE_mask.mat", mask=np.ones((24, 6, 8))))
    assert "Gaussian_2PE_mask.mat: key 'mask': expected a MATLAB v5 file" in msg
    msg = _broken(original, tmp_path / "b", lambda d: scipy.io.savemat(d / "Gaussian_2PE_mask.mat",
                                                                        {"mask": np.ones((24, 6, 7))}))
    assert "Gaussian_2PE_mask.mat: key 'mask': shape (24, 6, 7) does not match" in msg


def test_missing_file_and_bad_protocol_key(original, tmp_path):
    msg = _broken(original, tmp_path, lambda d: (d / "kspace.mat").unlink())
    assert msg == f"{tmp_path / 'data' / 'kspace.mat'}: file not found"
    msg = _broken(original, tmp_path / "p", lambda d: (d / "protocol.json").write_text('{"TR": 0.04}'))
    assert msg.startswith(f"{tmp_path / 'p' / 'data' / 'protocol.json'}: key 'TR': unknown protocol key")


def test_protocol_file_overrides_defaults(original, tmp_path):
    folder = write_public_folder(tmp_path / "data", original)
    (folder / "p.yaml").write_text("TR_s: 0.05\nsat_b1max_uT: 9.0\nvoxel_size_mm: [3, 1, 1]\n")
    report = import_public_folder(folder, tmp_path / "o.h5", protocol_file=folder / "p.yaml", subject_id="x1")
    s = read_subject(tmp_path / "o.h5", load_reference=False)
    assert s.protocol.TR_s == (0.05,) * 8 and s.protocol.sat_b1max_uT == 9.0 and s.subject_id == "x1"
    # w was computed for 7.3 uT: ours at 9 uT is (9/7.3)^2 larger
    assert report["saturation_check"]["w_over_W"]["median"] == pytest.approx((7.3 / 9.0) ** 2, rel=1e-6)
