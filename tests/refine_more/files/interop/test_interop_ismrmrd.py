"""ISMRMRD HDF5 ↔ subject files (refine_more/files/interop/ismrmrd_io.py).

Round trip through the ``ismrmrd`` package's own writer and reader; a file written here with
that library directly (the way a scanner converter writes one: noise scans, readout centre,
encoding centre off n // 2, repeated lines) checks the placement rules independently.
"""
import json

import numpy as np
import pytest

import ismrmrd  # a main dependency: a missing one must fail, not skip

from ismrmrd import xsd  # noqa: E402

from refine_more.files.interop.common import ForeignFormatError  # noqa: E402
from refine_more.files.interop.ismrmrd_io import import_ismrmrd, write_ismrmrd  # noqa: E402
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject  # noqa: E402
from refine_more.files.subject import read_subject, write_subject  # noqa: E402


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    s = simulate_subject("sub-mrd01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=7)
    s.reference = {}
    path = tmp_path_factory.mktemp("orig") / "sub-mrd01.h5"
    write_subject(path, s)
    return read_subject(path)


@pytest.fixture(scope="module")
def round_trip(original, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mrd")
    write_ismrmrd(original.path, tmp / "sub.mrd.h5")
    report = import_ismrmrd(tmp / "sub.mrd.h5", tmp / "back.h5")
    return read_subject(tmp / "back.h5"), report, tmp / "sub.mrd.h5"


def test_round_trip_identical(original, round_trip):
    s, report, _ = round_trip
    np.testing.assert_array_equal(s.kspace, original.kspace)
    np.testing.assert_array_equal(s.mask, original.mask)
    assert s.protocol == original.protocol
    np.testing.assert_allclose(s.voxel_size_mm, original.voxel_size_mm, rtol=1e-12)
    np.testing.assert_array_equal(s.coil_sens, original.coil_sens)
    np.testing.assert_array_equal(s.b1, original.b1)
    np.testing.assert_array_equal(s.tissue_mask, original.tissue_mask)
    assert s.subject_id == "sub-mrd01"
    assert report["image_index"] == "contrast" and report["carried_arrays"] == ["b1", "coil_sens", "tissue_mask"]


def test_the_file_is_what_ismrmrd_reads(original, round_trip):
    with ismrmrd.Dataset(str(round_trip[2]), "dataset", mode="r") as d:
        header = xsd.CreateFromDocument(d.read_xml_header())
        assert d.number_of_acquisitions() == int(original.mask.sum())
        acq = d.read_acquisition(0)
    assert header.sequenceParameters.TR == [40.0] * 8            # ms in ISMRMRD
    assert header.sequenceParameters.flipAngle_deg == [5.0, 10.0, 20.0, 40.0] * 2
    assert [u.value for u in header.userParameters.userParameterLong] == [0] * 4 + [1] * 4
    assert (header.encoding[0].encodedSpace.matrixSize.z, header.encoding[0].encodedSpace.matrixSize.y) == (6, 24)
    assert acq.data.shape == (4, 24)


def test_tiny_recon_of_the_imported_file_equals_the_original(original, round_trip):
    from refine_more.config import preset
    from refine_more.reconstruction.recon import reconstruct

    a = reconstruct(original, preset("tiny"))
    b = reconstruct(round_trip[0], preset("tiny"))
    for name in ("I0", "T1F", "f", "kF"):
        np.testing.assert_array_equal(a.maps[name], b.maps[name])


def _scanner_like_file(path, *, user=True, T=3, C=2, shape=(4, 6, 8), noise=True, repeat=True):
    """A file written line by line with ismrmrd, as a converter would: centre at index 2 on an
    axis of 6 (step_1), noise scan first, readout centre at sample 4 of 8, repetitions for images."""
    Z, Y, X = shape
    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_740_000),
        encoding=[xsd.encodingType(
            encodedSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=X, y=Y, z=Z),
                                               fieldOfView_mm=xsd.fieldOfViewMm(x=8.0, y=12.0, z=12.0)),
            reconSpace=xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=X, y=Y, z=Z),
                                             fieldOfView_mm=xsd.fieldOfViewMm(x=8.0, y=12.0, z=12.0)),
            encodingLimits=xsd.encodingLimitsType(
                kspace_encoding_step_1=xsd.limitType(minimum=0, maximum=Y - 1, center=2),
                kspace_encoding_step_2=xsd.limitType(minimum=0, maximum=Z - 1, center=Z // 2)),
            trajectory=xsd.trajectoryType.CARTESIAN)],
        sequenceParameters=xsd.sequenceParametersType(TR=[30.0], TE=[5.0], flipAngle_deg=[10.0, 20.0, 20.0]),
        userParameters=xsd.userParametersType(
            userParameterDouble=[xsd.userParameterDoubleType(name=n, value=v) for n, v in
                                 (("tau_exc_s", 5e-4), ("tau_sat_s", 8e-3), ("sat_b1max_uT", 7.3),
                                  ("sat_offset_hz", 4000.0))] if user else [],
            userParameterLong=[xsd.userParameterLongType(name=f"saturation_{t}", value=t % 2) for t in range(T)],
            userParameterString=[xsd.userParameterStringType(name="sat_pulse", value="fermi")] if user else []))
    rng = np.random.default_rng(0)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as d:
        d.write_xml_header(xsd.ToXML(hdr))
        if noise:
            a = ismrmrd.Acquisition.from_array(np.ones((C, X), np.complex64) * 99)
            a.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
            d.append_acquisition(a)
        lines = {}
        for t in range(T):
            for z in range(Z):
                for step1 in range(0, Y, 2):
                    data = (rng.standard_normal((C, X)) + 1j * rng.standard_normal((C, X))).astype(np.complex64)
                    reps = 2 if (repeat and step1 == 2) else 1
                    for r in range(reps):
                        a = ismrmrd.Acquisition.from_array(data + r, center_sample=4)
                        a.idx.kspace_encode_step_1, a.idx.kspace_encode_step_2, a.idx.repetition = step1, z, t
                        d.append_acquisition(a)
                    lines[(t, z, step1)] = data + (0.5 if reps == 2 else 0)
    return lines


def test_scanner_like_file_placement(tmp_path):
    lines = _scanner_like_file(tmp_path / "raw.h5")
    report = import_ismrmrd(tmp_path / "raw.h5", tmp_path / "s.h5", subject_id="p01")
    s = read_subject(tmp_path / "s.h5")
    assert report["image_index"] == "repetition" and "1 non-imaging acquisitions skipped" in report["notes"]
    assert s.kspace.shape == (3, 2, 4, 6, 8)   # 3 images: the fewest that determine the maps
    for (t, z, step1), data in lines.items():
        y = step1 - 2 + 6 // 2                                # the encoding centre (2) lands at Y // 2
        np.testing.assert_allclose(s.kspace[t, :, z, y, :], data, rtol=1e-6)
        assert s.mask[t, z, y]
    assert s.mask.sum() == 3 * 4 * 3
    assert s.protocol.TR_s == (0.03,) * 3 and s.protocol.TE_s == pytest.approx(5e-3)
    assert s.protocol.saturation == (0, 1, 0)
    np.testing.assert_allclose(s.voxel_size_mm, [3.0, 2.0, 1.0])


def test_missing_protocol_values_name_them_or_come_from_protocol_file(tmp_path):
    _scanner_like_file(tmp_path / "raw.h5", user=False)
    with pytest.raises(ForeignFormatError) as info:
        import_ismrmrd(tmp_path / "raw.h5", tmp_path / "s.h5")
    msg = str(info.value)
    assert msg == (f"{tmp_path / 'raw.h5'}: key 'userParameters': protocol value(s) tau_exc_s, tau_sat_s, "
                   "sat_pulse, sat_b1max_uT, sat_offset_hz found neither in the header nor in --protocol FILE "
                   "(names: docs/interop.md)")
    assert not (tmp_path / "s.h5").exists()
    (tmp_path / "p.json").write_text(json.dumps({"tau_exc_s": 5e-4, "tau_sat_s": 8e-3, "sat_b1max_uT": 7.3,
                                                 "sat_offset_hz": 4000.0, "sat_pulse": "fermi"}))
    import_ismrmrd(tmp_path / "raw.h5", tmp_path / "s.h5", protocol_file=tmp_path / "p.json")
    assert read_subject(tmp_path / "s.h5").protocol.sat_b1max_uT == 7.3


def test_malformed_files(tmp_path):
    import h5py

    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("other")
    with pytest.raises(ForeignFormatError, match=r"empty.h5: key 'dataset': no ISMRMRD dataset group"):
        import_ismrmrd(tmp_path / "empty.h5", tmp_path / "s.h5")
    with h5py.File(tmp_path / "noxml.h5", "w") as f:
        f.create_group("dataset")
    with pytest.raises(ForeignFormatError, match=r"noxml.h5: key 'dataset/xml': missing XML header"):
        import_ismrmrd(tmp_path / "noxml.h5", tmp_path / "s.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ForeignFormatError, match=r"text.h5: not a readable HDF5 file"):
        import_ismrmrd(tmp_path / "text.h5", tmp_path / "s.h5")
