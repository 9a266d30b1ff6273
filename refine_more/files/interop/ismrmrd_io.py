"""ISMRMRD HDF5 ↔ subject files, through the ``ismrmrd`` package (its Dataset, XML header and
Acquisition types).

Import (:func:`read_ismrmrd`): Cartesian acquisitions, noise/navigator/phase-correction/dummy/
feedback scans skipped; ``idx.kspace_encode_step_1`` → y and ``idx.kspace_encode_step_2`` → z,
placed so that the header's ``encodingLimits`` centre lands at index n // 2 (the spec's centre);
the readout's ``center_sample`` lands at X // 2; ``idx.contrast`` (or ``idx.repetition`` when
every contrast is 0, or as ``image_index`` says) → image t; repeated lines are averaged. The
matrix and field of view come from ``encoding[0].encodedSpace`` (voxel size = FOV / matrix),
flip angles, TR and TE from ``sequenceParameters`` (ms in ISMRMRD, s in the spec), the rest of
the protocol from ``userParameters`` under the spec's attribute names (docs/interop.md); a
``--protocol`` file overrides any of them, and a value found in neither is an error naming it.
The k-space is taken as stored: its convention is the spec's (centred, orthonormal FFT).

Export (:func:`write_ismrmrd`): one acquisition per sampled (t, z, y) line, the header as above,
and the optional members the format has no place for as named NDArrays (``coil_sens``, ``b1``,
``tissue_mask``), which the importer reads back when present.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np

from refine_more.physics.protocol import Protocol
from refine_more.files.interop.common import (ForeignFormatError, as_float_list, build_protocol, load_protocol_file, safe_subject_id,
                     write_validated)

# userParameters: spec attribute name -> kind (docs/interop.md)
USER_DOUBLES = ("tau_exc_s", "tau_sat_s", "sat_b1max_uT", "sat_offset_hz", "T2R_s", "T1R_s",
                "sat_fermi_t0_s", "sat_fermi_a_s", "G0_s")
USER_STRINGS = ("sat_pulse", "sequence")
SATURATION_LONG = "saturation_{t}"      # one userParameterLong per image, 0 or 1
ARRAYS = {"coil_sens": np.complex64, "b1": np.float32, "tissue_mask": np.uint16}
SKIP_FLAGS = ("ACQ_IS_NOISE_MEASUREMENT", "ACQ_IS_NAVIGATION_DATA", "ACQ_IS_PHASECORR_DATA",
              "ACQ_IS_DUMMYSCAN_DATA", "ACQ_IS_RTFEEDBACK_DATA", "ACQ_IS_HPFEEDBACK_DATA",
              "ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA", "ACQ_IS_PHASE_STABILIZATION_REFERENCE",
              "ACQ_IS_PHASE_STABILIZATION")
H1_3T_HZ = 127_740_000  # the XML schema requires a resonance frequency; spec v1 has none (3 T assumed)


# -- export ----------------------------------------------------------------------------------------
def _header(subject):
    from ismrmrd import xsd

    T, C, Z, Y, X = subject.kspace.shape
    p = subject.protocol
    vz, vy, vx = (float(v) for v in subject.voxel_size_mm)
    space = lambda: xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=X, y=Y, z=Z),
                                          fieldOfView_mm=xsd.fieldOfViewMm(x=X * vx, y=Y * vy, z=Z * vz))
    lim = lambda n, c: xsd.limitType(minimum=0, maximum=n - 1, center=c)
    limits = xsd.encodingLimitsType(kspace_encoding_step_0=lim(X, X // 2), kspace_encoding_step_1=lim(Y, Y // 2),
                                    kspace_encoding_step_2=lim(Z, Z // 2), contrast=lim(T, 0))
    encoding = xsd.encodingType(encodedSpace=space(), reconSpace=space(), encodingLimits=limits,
                                trajectory=xsd.trajectoryType.CARTESIAN)
    user = xsd.userParametersType(
        userParameterDouble=[xsd.userParameterDoubleType(name=n, value=float(getattr(p, n))) for n in USER_DOUBLES],
        userParameterLong=[xsd.userParameterLongType(name=SATURATION_LONG.format(t=t), value=int(s))
                           for t, s in enumerate(p.saturation)],
        userParameterString=[xsd.userParameterStringType(name="sat_pulse", value=p.sat_pulse),
                             xsd.userParameterStringType(name="sequence", value="BTS")])
    seq = xsd.sequenceParametersType(TR=[v * 1e3 for v in p.TR_s], TE=[p.TE_s * 1e3],
                                     flipAngle_deg=list(p.flip_angles_deg), sequence_type="BTS")
    return xsd.ismrmrdHeader(
        subjectInformation=xsd.subjectInformationType(patientID=subject.subject_id),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(receiverChannels=C),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=H1_3T_HZ),
        encoding=[encoding], sequenceParameters=seq, userParameters=user)


def write_ismrmrd(subject, out, dataset: str = "dataset") -> str:
    """Write a :class:`Subject` (or a subject file's path) as an ISMRMRD HDF5 file ``out``."""
    import ismrmrd
    from ismrmrd import xsd

    from refine_more.files.maps_io import atomic_path
    from refine_more.files.subject import read_subject

    if isinstance(subject, (str, os.PathLike)):
        subject = read_subject(subject, load_reference=False)
    T, C, Z, Y, X = subject.kspace.shape
    with atomic_path(out) as tmp:
        os.unlink(tmp)
        with ismrmrd.Dataset(tmp, dataset, create_if_needed=True) as dset:
            dset.write_xml_header(xsd.ToXML(_header(subject)))
            counter = 0
            for t, z, y in zip(*np.nonzero(subject.mask)):
                acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(subject.kspace[t, :, z, y, :]),
                                                     center_sample=X // 2, scan_counter=counter)
                acq.idx.kspace_encode_step_1, acq.idx.kspace_encode_step_2, acq.idx.contrast = int(y), int(z), int(t)
                dset.append_acquisition(acq)
                counter += 1
            for name, dtype in ARRAYS.items():
                value = getattr(subject, name)
                if value is not None:
                    dset.append_array(name, np.ascontiguousarray(np.asarray(value).astype(dtype)))
    return os.fspath(out)


# -- import ----------------------------------------------------------------------------------------
def _header_values(header, path, T: int) -> dict:
    """Spec attribute values found in the XML header (only those present)."""
    values = {}
    seq = header.sequenceParameters
    if seq is not None:
        if seq.flipAngle_deg:
            values["flip_angles_deg"] = as_float_list(seq.flipAngle_deg, T, "sequenceParameters/flipAngle_deg", path)
        if seq.TR:
            values["TR_s"] = [v * 1e-3 for v in as_float_list(seq.TR, T, "sequenceParameters/TR", path)]
        if seq.TE:
            values["TE_s"] = float(seq.TE[0]) * 1e-3
    user = header.userParameters
    if user is not None:
        doubles = {u.name: u.value for u in user.userParameterDouble}
        longs = {u.name: u.value for u in user.userParameterLong}
        strings = {u.name: u.value for u in user.userParameterString}
        values.update({n: float(doubles[n]) for n in USER_DOUBLES if n in doubles})
        if "sat_pulse" in strings:
            values["sat_pulse"] = strings["sat_pulse"]
        if "sequence" in strings and strings["sequence"] != "BTS":
            raise ForeignFormatError(path, "userParameterString sequence",
                                     f"expected 'BTS' (the only signal model of format version 1), got {strings['sequence']!r}")
        sat = [longs.get(SATURATION_LONG.format(t=t)) for t in range(T)]
        if all(s is not None for s in sat):
            values["saturation"] = [int(s) for s in sat]
    return values


def _required_missing(values: dict) -> list:
    optional = {"T2R_s", "T1R_s", "sat_fermi_t0_s", "sat_fermi_a_s", "G0_s", "subject_id"}
    names = [f.name for f in dataclasses.fields(Protocol)] + ["voxel_size_mm"]
    return [n for n in names if n not in values and n not in optional]


def _limits(enc, step: str, n: int) -> int:
    lim = getattr(enc.encodingLimits, step, None) if enc.encodingLimits is not None else None
    return int(lim.center) if lim is not None else n // 2


def _read_lines(dset, path, shape_zyx, centres, image_index: str):
    """Place the imaging acquisitions; returns (kspace (T, C, Z, Y, X) complex64, mask, notes)."""
    import ismrmrd

    Z, Y, X = shape_zyx
    c1, c2 = centres
    skip = [getattr(ismrmrd, f) for f in SKIP_FLAGS]
    try:
        n_acq = dset.number_of_acquisitions()
    except LookupError:
        raise ForeignFormatError(path, "data", "no acquisitions in the dataset") from None
    lines, n_skipped = [], 0
    for i in range(n_acq):
        acq = dset.read_acquisition(i)
        if any(acq.is_flag_set(f) for f in skip):
            n_skipped += 1
            continue
        lines.append(acq)
    if not lines:
        raise ForeignFormatError(path, "data", f"no imaging acquisitions ({n_skipped} noise or other scans skipped)")
    if image_index == "auto":
        image_index = "contrast" if any(a.idx.contrast for a in lines) or not any(a.idx.repetition for a in lines) \
            else "repetition"
    C = int(lines[0].active_channels)
    T = 1 + max(int(getattr(a.idx, image_index)) for a in lines)
    acc = np.zeros((T, C, Z, Y, X), np.complex128)
    count = np.zeros((T, Z, Y), np.int64)
    for a in lines:
        t, y, z = int(getattr(a.idx, image_index)), a.idx.kspace_encode_step_1 - c1 + Y // 2, \
            a.idx.kspace_encode_step_2 - c2 + Z // 2
        x0 = X // 2 - int(a.center_sample)
        where = f"acquisition {a.scan_counter} (step_1 {a.idx.kspace_encode_step_1}, step_2 {a.idx.kspace_encode_step_2})"
        if a.active_channels != C:
            raise ForeignFormatError(path, "data", f"{where} has {a.active_channels} channels, the first {C}")
        if a.trajectory_dimensions:
            raise ForeignFormatError(path, "data", f"{where} carries a trajectory: only Cartesian data is supported")
        if not (0 <= y < Y and 0 <= z < Z and 0 <= x0 and x0 + a.number_of_samples <= X):
            raise ForeignFormatError(path, "data", f"{where} falls outside the encoded matrix {(Z, Y, X)} "
                                     f"({a.number_of_samples} samples, centre sample {a.center_sample}; "
                                     "oversampled readouts must be cropped first)")
        acc[t, :, z, y, x0:x0 + a.number_of_samples] += a.data
        count[t, z, y] += 1
    notes = [f"{n_skipped} non-imaging acquisitions skipped"] if n_skipped else []
    if (count > 1).any():
        notes.append(f"{int((count > 1).sum())} lines acquired more than once: averaged")
    kspace = (acc / np.maximum(count, 1)[:, None, :, :, None]).astype(np.complex64)
    return kspace, count > 0, notes, image_index


def read_ismrmrd(path, protocol_file=None, subject_id: Optional[str] = None, *, dataset: str = "dataset",
                 image_index: str = "auto"):
    """Read an ISMRMRD file into a :class:`Subject` (not written): ``(subject, report)``."""
    import ismrmrd
    from ismrmrd import xsd

    from refine_more.files.subject import Subject

    path = Path(path)
    if not path.is_file():
        raise ForeignFormatError(path, None, "file not found")
    try:
        dset = ismrmrd.Dataset(str(path), dataset, mode="r")
    except Exception as exc:
        raise ForeignFormatError(path, None, f"not a readable HDF5 file ({type(exc).__name__}: {exc})") from None
    with dset:
        if dataset not in dset._file:
            raise ForeignFormatError(path, dataset, f"no ISMRMRD dataset group (the file holds {sorted(dset._file.keys())})")
        try:
            header = xsd.CreateFromDocument(dset.read_xml_header())
        except LookupError:
            raise ForeignFormatError(path, f"{dataset}/xml", "missing XML header") from None
        except Exception as exc:
            raise ForeignFormatError(path, f"{dataset}/xml", f"invalid ISMRMRD header ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not header.encoding:
            raise ForeignFormatError(path, "encoding", "the header has no encoding")
        enc = header.encoding[0]
        m, fov = enc.encodedSpace.matrixSize, enc.encodedSpace.fieldOfView_mm
        shape = (int(m.z), int(m.y), int(m.x))
        centres = (_limits(enc, "kspace_encoding_step_1", shape[1]), _limits(enc, "kspace_encoding_step_2", shape[0]))
        kspace, mask, notes, index_used = _read_lines(dset, path, shape, centres, image_index)
        arrays = {n: dset.read_array(n, 0) for n in ARRAYS if n in dset._dataset}
    T = kspace.shape[0]
    values = _header_values(header, path, T)
    if fov is not None and min(fov.x, fov.y, fov.z) > 0:
        values["voxel_size_mm"] = [fov.z / shape[0], fov.y / shape[1], fov.x / shape[2]]
    if protocol_file is not None:
        values.update(load_protocol_file(protocol_file))
    missing = _required_missing(values)
    if missing:
        raise ForeignFormatError(path, "userParameters", f"protocol value(s) {', '.join(missing)} found neither in "
                                 "the header nor in --protocol FILE (names: docs/interop.md)")
    protocol = build_protocol(values, protocol_file or path)
    patient = header.subjectInformation.patientID if header.subjectInformation is not None else None
    sid = safe_subject_id(subject_id or values.get("subject_id") or patient or path.stem)
    subject = Subject(subject_id=sid, kspace=kspace, mask=mask, protocol=protocol,
                      voxel_size_mm=np.asarray(values["voxel_size_mm"], dtype=np.float64).reshape(3),
                      coil_sens=arrays.get("coil_sens"), b1=arrays.get("b1"),
                      tissue_mask=arrays["tissue_mask"].astype(bool) if "tissue_mask" in arrays else None,
                      notes=notes)
    report = {"source": str(path), "subject_id": sid, "shape_TCZYX": list(kspace.shape), "image_index": index_used,
              "sampled_fraction": float(mask.mean()), "carried_arrays": sorted(arrays), "notes": notes}
    return subject, report


def import_ismrmrd(path, out, protocol_file=None, subject_id: Optional[str] = None, **kw) -> dict:
    """Import an ISMRMRD file into the subject file ``out`` (validated on write)."""
    subject, report = read_ismrmrd(path, protocol_file, subject_id, **kw)
    report["out"] = write_validated(out, subject)
    return report
