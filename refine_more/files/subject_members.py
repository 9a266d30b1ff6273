"""The subject-file validator, part 2: the datasets, and :func:`inspect_file` for a whole file.

Each required member (``kspace``, ``mask``) and each optional one (:data:`MEMBERS`: dtype,
dimensions, the shape the k-space implies; then checks of the values), the protocol the root
attributes make, and the ``reference`` group. :func:`inspect_file` returns every problem and, when
there is none, the fields of a :class:`refine_more.files.subject.Subject`.

A file is checked in two passes. The first reads headers only: attributes, members, dtypes,
shapes, declared sizes against a cap (:func:`max_member_bytes`) and whether each dataset's data
was written (its allocated storage and chunks, from the file's index); the cohort driver stops
there (``values=False``), so it costs the same for a 2 GB subject as for a tiny one. Only a file
whose headers pass is read, once, for the checks of its values (finite, not all zero, masks 0/1).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from refine_more.files.subject_rules import Problems, as_str, check_attrs, check_protocol, describe_exc

REFERENCE_MAPS = ("T1F", "f", "kF", "I0")
MAX_MEMBER_GIB_ENV = "REFINE_MORE_MAX_MEMBER_GIB"
DEFAULT_MAX_MEMBER_GIB = 16.0    # the paper's k-space is 1.9 GB; 8× that and more is refused unread


def max_member_bytes() -> int:
    """The largest dataset a subject file may declare (``REFINE_MORE_MAX_MEMBER_GIB``, default 16)."""
    return int(float(os.environ.get(MAX_MEMBER_GIB_ENV) or DEFAULT_MAX_MEMBER_GIB) * 2**30)


# ------------------------------------------------------------------------------------------------
# datasets
# ------------------------------------------------------------------------------------------------
def _desc(ds) -> str:
    return f"{np.dtype(ds.dtype).name} {tuple(int(n) for n in ds.shape)}"


def _is_mask_dtype(dtype) -> bool:
    return np.dtype(dtype) in (np.bool_, np.uint8)


def _dataset(h5, name: str, P: Problems, required: bool):
    import h5py

    try:
        if name not in h5:
            if required:
                P.member(name, "missing (required)")
            return None
        obj = h5[name]
    except Exception as exc:  # corrupt object headers
        P.member(name, f"cannot be opened ({describe_exc(exc)})")
        return None
    if not isinstance(obj, h5py.Dataset):
        P.member(name, f"expected a dataset, got {type(obj).__name__}")
        return None
    return obj


def _stored(ds, name: str, P: Problems) -> bool:
    """The declared size is under the cap and the data were written; nothing is read.

    An unwritten dataset has no storage; a contiguous one must hold all its bytes; a chunked one
    (compressed or not: its storage may be far below the declared size) all its chunks."""
    nbytes = int(np.prod(ds.shape, dtype=np.int64)) * np.dtype(ds.dtype).itemsize
    cap = max_member_bytes()
    if nbytes > cap:
        P.member(name, f"declares {_desc(ds)} = {nbytes / 2**30:.1f} GiB, above the {cap / 2**30:g} GiB "
                       f"a member may have (${MAX_MEMBER_GIB_ENV} raises it)")
        return False
    if nbytes == 0:
        return True
    stored = ds.id.get_storage_size()
    if stored == 0:
        P.member(name, f"declares {_desc(ds)} but holds no data: it was never written")
        return False
    if ds.chunks is None and stored < nbytes:
        P.member(name, f"holds {stored} of its {nbytes} bytes: partly written")
        return False
    if ds.chunks is not None:
        expected = int(np.prod([-(-n // c) for n, c in zip(ds.shape, ds.chunks)], dtype=np.int64))
        written = ds.id.get_num_chunks()
        if written < expected:
            P.member(name, f"{written} of its {expected} chunks were written: partly written")
            return False
    return True


def _read(ds, name: str, P: Problems) -> Optional[np.ndarray]:
    """Read a whole dataset once; corrupt data becomes a problem."""
    try:
        return ds[()]
    except Exception as exc:
        P.member(name, f"cannot be read ({describe_exc(exc)})")
        return None


def _bool_mask(arr: np.ndarray, name: str, P: Problems) -> Optional[np.ndarray]:
    if arr.dtype == np.uint8 and arr.size and arr.max() > 1:
        P.member(name, f"uint8 values must be 0 or 1, got values up to {int(arr.max())}")
        return None
    return arr.astype(bool, copy=False)


@dataclass(frozen=True)
class Member:
    """An optional image-space member: its dtype test, the spec's name for it, dimensions."""
    dtype_ok: Callable[[Any], bool]
    dtype_name: str
    dims: str                       # the shape in words when the kspace gives none
    leading: str = ""               # "C": one more leading axis, the coils


#: optional members of the root, in the order they are checked (b1 after tissue_mask: it uses it)
MEMBERS = {
    "coil_sens": Member(lambda d: d == np.complex64, "complex64", "(C, Z, Y, X)", leading="C"),
    "tissue_mask": Member(_is_mask_dtype, "bool", "(Z, Y, X)"),
    "b1": Member(lambda d: d == np.float32, "float32", "(Z, Y, X)"),
}


def _member(h5, name: str, shape: Optional[tuple], P: Problems, read: bool) -> Optional[np.ndarray]:
    """An optional member after checking its dtype, shape and storage against :data:`MEMBERS`;
    read when ``read``, else None."""
    rule = MEMBERS[name]
    ds = _dataset(h5, name, P, required=False)
    if ds is None:
        return None
    ndim = 4 if rule.leading else 3
    if not rule.dtype_ok(ds.dtype) or ds.ndim != ndim or (shape is not None and tuple(ds.shape) != shape):
        P.member(name, f"expected {rule.dtype_name} {shape if shape else rule.dims}, got {_desc(ds)}")
        return None
    if not _stored(ds, name, P) or not read:
        return None
    return _read(ds, name, P)


def _kspace_values(kspace: np.ndarray, P: Problems) -> None:
    """Finite and not all zero, one image at a time (no temporary the size of the k-space)."""
    n_nan = n_inf = 0
    zero = []
    for t in range(kspace.shape[0]):
        n_nan += int(np.isnan(kspace[t]).sum())
        n_inf += int(np.isinf(kspace[t]).sum())
        if not kspace[t].any():
            zero.append(t)
    if n_nan or n_inf:
        P.member("kspace", f"contains non-finite values ({n_nan} NaN, {n_inf} Inf entries)")
    if len(zero) == kspace.shape[0]:
        P.member("kspace", "is all zero: no signal was recorded")
    elif zero:
        P.member("kspace", f"image(s) {zero} are all zero: no signal was recorded for them")


def _check_kspace(h5, P: Problems, read: bool):
    """(kspace, T, C, zyx) of the required k-space; Nones where it fails (kspace None unless ``read``)."""
    ds = _dataset(h5, "kspace", P, required=True)
    if ds is None:
        return None, None, None, None
    if ds.dtype != np.complex64 or ds.ndim != 5:
        P.member("kspace", f"expected complex64 (T, C, Z, Y, X), got {_desc(ds)}")
        return None, None, None, None
    if 0 in ds.shape:
        P.member("kspace", f"is empty, shape {tuple(ds.shape)}")
        return None, None, None, None
    T, C, zyx = int(ds.shape[0]), int(ds.shape[1]), tuple(int(n) for n in ds.shape[2:])
    if not _stored(ds, "kspace", P):
        return None, None, None, None
    kspace = _read(ds, "kspace", P) if read else None
    if kspace is not None:
        _kspace_values(kspace, P)
    return kspace, T, C, zyx


def _check_mask(h5, T, C, zyx, P: Problems, read: bool) -> Optional[np.ndarray]:
    ds = _dataset(h5, "mask", P, required=True)
    if ds is None:
        return None
    expect = f"({T}, {zyx[0]}, {zyx[1]})" if T is not None else "(T, Z, Y)"
    if not _is_mask_dtype(ds.dtype) or ds.ndim != 3:
        P.member("mask", f"expected uint8 or bool {expect}, got {_desc(ds)}")
        return None
    if T is not None and tuple(ds.shape) != (T, zyx[0], zyx[1]):
        P.member("mask", f"expected shape {expect} to match kspace {(T, C) + zyx}, got {tuple(ds.shape)}")
        return None
    if not _stored(ds, "mask", P) or not read:
        return None
    raw = _read(ds, "mask", P)
    mask = None if raw is None else _bool_mask(raw, "mask", P)
    if mask is None:
        return None
    if not mask.any():
        P.member("mask", "is all zero: no phase-encode line was sampled")
        return None
    empty = np.flatnonzero(~mask.reshape(mask.shape[0], -1).any(axis=1))
    if empty.size:
        P.member("mask", f"image(s) {empty.tolist()} have no sampled line")
        return None
    return mask


def _check_optional(h5, C, zyx, P: Problems, notes: list, read: bool) -> dict:
    """coil_sens, tissue_mask and b1 (each None when absent, bad or not ``read``)."""
    coil_sens = _member(h5, "coil_sens", (C,) + zyx if zyx is not None else None, P, read)
    if coil_sens is not None and not np.isfinite(coil_sens).all():
        P.member("coil_sens", "contains non-finite values")
        coil_sens = None
    if coil_sens is not None and not coil_sens.any():
        P.member("coil_sens", "is all zero: no coil sees the object")
        coil_sens = None
    raw = _member(h5, "tissue_mask", zyx, P, read)
    tissue = None if raw is None else _bool_mask(raw, "tissue_mask", P)
    if tissue is not None and not tissue.any():
        P.member("tissue_mask", "is all false: no voxel to reconstruct")
        tissue = None
    b1 = _member(h5, "b1", zyx, P, read)
    problem = None if b1 is None else (
        "contains non-finite values" if not np.isfinite(b1).all()
        else f"must be positive (relative B1+), minimum is {float(b1.min())}" if (b1 < 0).any()
        else "must be positive inside tissue_mask" if tissue is not None and (b1[tissue] <= 0).any()
        else "is zero everywhere" if tissue is None and not (b1 > 0).any() else None)
    if problem:
        P.member("b1", problem)
        b1 = None
    if "b1" not in h5:
        notes.append("b1 absent: taken as 1")
    return {"coil_sens": coil_sens, "tissue_mask": tissue, "b1": b1}


def _label_names(ds, full: str, P: Problems, notes: list):
    if "names" not in ds.attrs:
        notes.append("reference/labels: attribute 'names' absent")
        return None
    raw = np.atleast_1d(np.asarray(ds.attrs["names"], dtype=object))
    names = [as_str(v) for v in raw]
    if raw.ndim != 1 or any(n is None for n in names):
        P.member(full, f"attribute 'names': expected str[], got {ds.attrs['names']!r}")
        return None
    return names


def _reference_value(arr, name: str, full: str, label_names, P: Problems) -> bool:
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        P.member(full, "contains non-finite values")
        return False
    if name == "labels" and arr.min() < 0:
        P.member(full, f"labels must be >= 0, got {int(arr.min())}")
        return False
    if name == "labels" and label_names is not None and int(arr.max()) > len(label_names):
        P.member(full, f"label {int(arr.max())} has no name (attribute 'names' has {len(label_names)})")
        return False
    return True


def _check_reference(h5, T, C, zyx, P: Problems, notes: list, load, read: bool) -> tuple:
    """(reference dict, label names) of the optional ``reference`` group. ``load``: True, False, or
    "maps" (all but ``kspace_full``)."""
    import h5py

    reference: dict[str, np.ndarray] = {}
    label_names = None
    if "reference" not in h5:
        return reference, label_names
    grp = h5["reference"]
    if not isinstance(grp, h5py.Group):
        P.member("reference", f"expected a group, got {type(grp).__name__}")
        return reference, label_names
    specs = {n: (np.float32, zyx, "float32") for n in REFERENCE_MAPS}
    specs["kspace_full"] = (np.complex64, (T, C) + zyx if zyx is not None else None, "complex64")
    specs["labels"] = (np.int16, zyx, "int16")
    for name in grp.keys():
        full = f"reference/{name}"
        if name not in specs:
            notes.append(f"{full}: not in format version 1, ignored")
            continue
        dtype, shape, dname = specs[name]
        ds = _dataset(h5, full, P, required=False)
        if ds is None:
            continue
        ndim = 5 if name == "kspace_full" else 3
        if ds.dtype != dtype or ds.ndim != ndim or (shape is not None and tuple(ds.shape) != shape):
            want = shape if shape is not None else ("(T, C, Z, Y, X)" if ndim == 5 else "(Z, Y, X)")
            P.member(full, f"expected {dname} {want}, got {_desc(ds)}")
            continue
        if name == "labels":
            label_names = _label_names(ds, full, P, notes)
        if not _stored(ds, full, P) or not (load and read) or (load == "maps" and name == "kspace_full"):
            continue        # "maps": what scoring needs, not the fully sampled k-space (as large as the data)
        arr = _read(ds, full, P)
        if arr is not None and _reference_value(arr, name, full, label_names, P):
            reference[name] = arr
    return reference, label_names


# ------------------------------------------------------------------------------------------------
# a whole file
# ------------------------------------------------------------------------------------------------
def _missing(spath: str) -> str:
    """Why an existing name cannot be opened: a symlink loop or a dangling link; else not found."""
    try:
        os.stat(spath)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop: the path never reaches a file"
        if os.path.islink(spath):
            return f"dangling symbolic link to {os.readlink(spath)!r}"
    return "file not found"


def _open(spath: str, P: Problems):
    """The open h5py.File, or None with the file-level problem recorded."""
    import h5py

    if not os.path.exists(spath):
        P.file(_missing(spath))
        return None
    if os.path.isdir(spath):
        P.file("is a directory, not a subject file")
        return None
    try:
        is_h5 = h5py.is_hdf5(spath)
    except Exception as exc:
        P.file(f"cannot be read ({describe_exc(exc)})")
        return None
    if not is_h5:
        P.file("not an HDF5 file (no HDF5 signature)")
        return None
    try:
        return h5py.File(spath, "r")
    except Exception as exc:
        P.file(f"not a readable HDF5 file: truncated or corrupt ({describe_exc(exc)})")
        return None


def inspect_file(path, load_reference: bool = True, values: bool = True) -> tuple:
    """Validate a subject file: ``(problems, fields)``, ``fields`` the keyword arguments of a
    ``Subject`` when there is no problem, else None. ``values=False``: headers only (the first
    pass, see the module docstring; ``fields`` is then None)."""
    spath = os.fspath(path)
    P = Problems(spath)
    h5 = _open(spath, P)
    if h5 is None:
        return P, None
    try:
        with h5:
            return P, _inspect_open(h5, spath, P, load_reference, values)
    except Exception as exc:  # anything h5py/numpy raise on a damaged file
        P.file(f"truncated or corrupt ({type(exc).__name__}: {describe_exc(exc)})")
        return P, None


def _members(h5, a: dict, spath: str, P: Problems, notes: list, load_reference: bool, read: bool) -> tuple:
    kspace, T, C, zyx = _check_kspace(h5, P, read)
    mask = _check_mask(h5, T, C, zyx, P, read)
    protocol = check_protocol(a, T, spath, P)
    optional = _check_optional(h5, C, zyx, P, notes, read)
    reference, label_names = _check_reference(h5, T, C, zyx, P, notes, load_reference, read)
    return kspace, mask, protocol, optional, reference, label_names


def _inspect_open(h5, spath: str, P: Problems, load_reference: bool, values: bool) -> Optional[dict]:
    try:
        attrs = {k: h5.attrs[k] for k in h5.attrs.keys()}
    except Exception as exc:
        P.file(f"root attributes cannot be read: truncated or corrupt ({describe_exc(exc)})")
        return None
    a = check_attrs(attrs, P)
    if a is None:
        return None   # not this format or not this version: nothing else is meaningful
    _members(h5, dict(a), spath, P, [], load_reference, read=False)
    if P.items or not values:
        return None   # headers first: nothing is read from a file whose headers fail
    notes: list[str] = []
    kspace, mask, protocol, optional, reference, label_names = _members(h5, a, spath, P, notes, load_reference,
                                                                         read=True)
    if P.items:
        return None
    # mask is authoritative: unsampled entries are zeros
    outside = np.broadcast_to(~mask[:, None, :, :, None], kspace.shape)
    n_out = int(np.count_nonzero(outside & (kspace != 0)))
    if n_out:
        kspace[outside] = 0
        notes.append(f"kspace: {n_out} nonzero entries outside mask set to 0 (mask is authoritative)")
    if optional["tissue_mask"] is None:
        notes.append("tissue_mask absent: derive_tissue_mask() derives it from the data")
    if optional["coil_sens"] is None:
        notes.append("coil_sens absent: estimate from the k-space centre (refine_more.physics.coils)")
    return dict(subject_id=a["subject_id"], kspace=kspace, mask=mask, protocol=protocol,
                voxel_size_mm=np.asarray(a["voxel_size_mm"], dtype=np.float64), reference=reference,
                label_names=label_names, path=spath, notes=notes, **optional)
