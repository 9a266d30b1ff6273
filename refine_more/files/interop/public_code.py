"""The paper's public code data folder (I3Tlab/REFINE-MORE ``./data``) → a subject file (spec v1).

| file | kind | key | MATLAB axes | becomes |
|---|---|---|---|---|
| ``kspace.mat`` | v7.3 | ``kspace`` | [FE, PE1, PE2, coil, image], fully sampled | ``reference/kspace_full``; × mask → ``kspace`` |
| ``Gaussian_2PE_mask.mat`` | v5 | ``mask`` | [PE1, PE2, image] | ``mask`` (T, Z, Y) |
| ``sensitivity_maps.mat`` | v7.3 | ``bart_sensitivity`` | [FE, PE1, PE2, coil] | ``coil_sens``; ``tissue_mask`` = \\|Σ_c S_c\\| ≠ 0 |
| ``B1.mat`` | v5 | ``B1`` | [FE, PE1, PE2], relative | ``b1`` |
| ``BTS_sat.mat`` | v7.3 | ``w0``, ``w`` | [FE, PE1, PE2, 4], [FE, PE1, PE2] (1/s) | compared with our W0, W (report) |

Axes: (T, C, Z, Y, X) = MATLAB's [FE, PE1, PE2, coil, image] reversed (Z = PE2, Y = PE1, X = FE).
FFT: the public code makes images as ``fftshift(ifftn(fftshift(k)))`` over (FE, PE1, PE2),
unnormalised; the spec uses ``fftshift(ifftn(ifftshift(k), norm="ortho"))``. The imported k-space
is the one whose spec image is the public code's image, voxel for voxel (so the coil maps, B1 and
tissue mask, defined on that image grid, stay aligned): k_spec = k_pub / √N on even axes, and
additionally rolled by −1 along odd axes (where fftshift ≠ ifftshift). The first three files are
required (the mask also because the public code applies it); ``B1.mat`` and ``BTS_sat.mat`` are
optional (without B1, the reconstruction estimates it), as is ``sensitivity_maps.mat`` (ESPIRiT).
Protocol: the paper's in-vivo one (5/10/20/40° without, then with, the 8 ms Fermi saturation at
7.3 µT and 4 kHz; TR 40 ms, TE 12 ms; 1.3 × 1.3 × 3.5 mm), each value overridable by ``--protocol``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from refine_more.physics.protocol import Protocol
from refine_more.files.interop.common import ForeignFormatError, build_protocol, load_protocol_file, safe_subject_id, write_validated
from refine_more.files.interop.matlab import V5, V73, read_mat, require_file

KSPACE = ("kspace.mat", "kspace", V73, 5, "[FE, PE1, PE2, coil, image]")
MASK = ("Gaussian_2PE_mask.mat", "mask", V5, 3, "[PE1, PE2, image]")
SENS = ("sensitivity_maps.mat", "bart_sensitivity", V73, 4, "[FE, PE1, PE2, coil]")
B1 = ("B1.mat", "B1", V5, 3, "[FE, PE1, PE2]")
SAT = "BTS_sat.mat"
# the paper's in-vivo voxel size, 1.3 × 1.3 × 3.5 mm (FE × PE1 × PE2), along (z, y, x)
PAPER_VOXEL_MM = (3.5, 1.3, 1.3)


def default_values() -> dict:
    """The paper's in-vivo protocol as spec attribute values (the defaults ``--protocol`` overrides)."""
    p = Protocol.paper_in_vivo()
    values = {f.name: getattr(p, f.name) for f in dataclasses.fields(Protocol)}
    values["TE_s"] = 12e-3
    values["voxel_size_mm"] = PAPER_VOXEL_MM
    return values


def _odd_axis_roll(k: np.ndarray, shift: int) -> np.ndarray:
    for axis in (-3, -2, -1):
        if k.shape[axis] % 2:
            k = np.roll(k, shift, axis=axis)
    return k


def public_to_spec_kspace(k_pub: np.ndarray) -> np.ndarray:
    """(…, Z, Y, X) k-space of the public code's convention → the spec's (complex128)."""
    n = float(np.prod(k_pub.shape[-3:]))
    return _odd_axis_roll(np.asarray(k_pub, dtype=np.complex128), -1) / np.sqrt(n)


def spec_to_public_kspace(k: np.ndarray) -> np.ndarray:
    """Inverse of :func:`public_to_spec_kspace` (complex128)."""
    n = float(np.prod(k.shape[-3:]))
    return _odd_axis_roll(np.asarray(k, dtype=np.complex128), 1) * np.sqrt(n)


def _read(folder: Path, spec, optional: bool = False) -> Optional[np.ndarray]:
    name, key, kind, rank, axes = spec
    path = folder / name
    if optional and not path.exists():
        return None
    return read_mat(require_file(folder, name), key, kind=kind, rank=rank, axes=axes)


def _check_shape(path, key, got, want, what):
    if tuple(got) != tuple(want):
        raise ForeignFormatError(path, key, f"shape {tuple(got)} does not match {what} {tuple(want)}")


def compare_saturation(folder: Path, protocol: Protocol, b1: Optional[np.ndarray], tissue: np.ndarray,
                       grid_zyx: tuple) -> Optional[dict]:
    """``w0``/``w`` of ``BTS_sat.mat`` against our W0, W (protocol.py) at the voxel's B1+:
    ratios (theirs / ours) over the tissue mask, median and 5th/95th percentiles."""
    path = folder / SAT
    if not path.exists():
        return None
    n_fa = len(set(protocol.flip_angles_deg))
    w0 = read_mat(path, "w0", kind=V73, rank=4, axes="[FE, PE1, PE2, flip angle]").real
    w = read_mat(path, "w", kind=V73, rank=3, axes="[FE, PE1, PE2]").real
    _check_shape(path, "w0", w0.shape[:3], grid_zyx[::-1], "the k-space grid [FE, PE1, PE2]")
    _check_shape(path, "w", w.shape, grid_zyx[::-1], "the k-space grid [FE, PE1, PE2]")
    if w0.shape[3] != n_fa:
        raise ForeignFormatError(path, "w0", f"has {w0.shape[3]} flip angles, the protocol {n_fa}")
    b1sq = (np.ones(grid_zyx) if b1 is None else b1.astype(np.float64)) ** 2
    angles = list(dict.fromkeys(protocol.flip_angles_deg))
    ours_w0 = np.pi * (np.deg2rad(np.asarray(angles)) / protocol.tau_exc_s) ** 2 * protocol.G0_s
    stats = lambda r: {"median": float(np.median(r)), "p05": float(np.percentile(r, 5)),
                       "p95": float(np.percentile(r, 95))}
    out = {"w_over_W": stats(w.transpose(2, 1, 0)[tissue] / (protocol.W_sat_nominal * b1sq[tissue])),
           "W_ours_at_b1_1": protocol.W_sat_nominal, "w0_over_W0": {}, "W0_ours_at_b1_1": {}}
    for i, (angle, ours) in enumerate(zip(angles, ours_w0)):
        theirs = w0[..., i].transpose(2, 1, 0)[tissue]
        out["w0_over_W0"][f"{angle:g}"] = stats(theirs / (ours * b1sq[tissue]))
        out["W0_ours_at_b1_1"][f"{angle:g}"] = float(ours)
    return out


def read_public_folder(folder, protocol_file=None, subject_id: Optional[str] = None):
    """Read the public code's data folder into a :class:`Subject` (not written); returns
    ``(subject, report)`` where report holds the shapes, the W/W0 comparison and notes."""
    from refine_more.files.subject import Subject

    folder = Path(folder)
    if not folder.is_dir():
        raise ForeignFormatError(folder, None, "not a folder (expected the public code's ./data folder)")
    values = default_values()
    if protocol_file is not None:
        values.update(load_protocol_file(protocol_file))
    protocol = build_protocol(values, protocol_file or folder)

    k_full = _read(folder, KSPACE).transpose(4, 3, 2, 1, 0)           # (T, C, Z, Y, X)
    T, C, Z, Y, X = k_full.shape
    if T != protocol.n_images:
        raise ForeignFormatError(folder / KSPACE[0], "kspace", f"has {T} images, the protocol {protocol.n_images} "
                                 "(images 1-4 without, 5-8 with saturation; see --protocol)")
    k_full = public_to_spec_kspace(k_full).astype(np.complex64)
    mask = _read(folder, MASK)
    _check_shape(folder / MASK[0], "mask", mask.shape, (Y, Z, T), "kspace's [PE1, PE2, image]")
    if not np.isin(mask, (0, 1)).all():
        raise ForeignFormatError(folder / MASK[0], "mask", "values must be 0 or 1")
    mask = mask.transpose(2, 1, 0).astype(bool)                         # (T, Z, Y)
    notes = []
    sens = _read(folder, SENS, optional=True)
    coil_sens = tissue = None
    if sens is not None:
        _check_shape(folder / SENS[0], SENS[1], sens.shape, (X, Y, Z, C), "kspace's [FE, PE1, PE2, coil]")
        coil_sens = np.ascontiguousarray(sens.transpose(3, 2, 1, 0)).astype(np.complex64)
        tissue = np.abs(coil_sens.sum(axis=0)) != 0                    # the public code's tissue mask
    else:
        notes.append("sensitivity_maps.mat absent: coil maps by ESPIRiT, tissue mask derived from the data")
    b1 = _read(folder, B1, optional=True)
    if b1 is not None:
        _check_shape(folder / B1[0], "B1", b1.shape, (X, Y, Z), "kspace's [FE, PE1, PE2]")
        b1 = np.ascontiguousarray(b1.real.transpose(2, 1, 0)).astype(np.float32)
    else:
        notes.append("B1.mat absent: B1+ is estimated from the Bloch-Siegert phase")
    sid = safe_subject_id(subject_id or values.get("subject_id") or folder.resolve().name)
    subject = Subject(subject_id=sid, kspace=k_full * mask[:, None, :, :, None], mask=mask, protocol=protocol,
                      voxel_size_mm=np.asarray(values["voxel_size_mm"], dtype=np.float64).reshape(3),
                      coil_sens=coil_sens, b1=b1, tissue_mask=tissue, reference={"kspace_full": k_full},
                      notes=notes)
    sat = compare_saturation(folder, protocol, b1, tissue if tissue is not None else np.ones((Z, Y, X), bool),
                             (Z, Y, X))
    if sat is None:
        notes.append("BTS_sat.mat absent: w/w0 not compared")
    report = {"source": str(folder), "subject_id": sid, "shape_TCZYX": [T, C, Z, Y, X],
              "sampled_fraction": float(mask.mean()), "saturation_check": sat, "notes": notes}
    return subject, report


def import_public_folder(folder, out, protocol_file=None, subject_id: Optional[str] = None) -> dict:
    """Import the public code's data folder into the subject file ``out`` (validated on write)."""
    subject, report = read_public_folder(folder, protocol_file, subject_id)
    report["out"] = write_validated(out, subject)
    return report
