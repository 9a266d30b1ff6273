"""Subject files: reading, complete validation and writing (spec `subject-format.md`, version 1).

Every problem with a file is reported as a :class:`SubjectFormatError` (a ``ValueError``) whose
message names the file and the member or attribute at fault, one line per problem::

    subj.h5: member 'kspace': expected complex64 (T, C, Z, Y, X), got float32 (8, 4, 6, 24)

Public API
----------
- :class:`Subject` -- one scan of one subject, in memory.
- :func:`read_subject` -- read and validate a file (raises :class:`SubjectFormatError`).
- :func:`validate_subject_file` -- all problems of a file as a list of lines (empty: valid).
- :func:`write_subject` -- write exactly the spec, atomically.
- :func:`derive_tissue_mask` -- a tissue mask from the data, for files without ``tissue_mask``.

Leniencies (all harmless, documented): ``mask`` and ``tissue_mask`` may be bool or uint8 (0/1);
``saturation`` may be any integer/bool dtype holding 0/1; ``flip_angles_deg`` and the scalar float
attributes may be stored as integers; strings may be variable- or fixed-length. Datasets with
other dtypes than the spec's (complex128 k-space, float64 maps, ...) are rejected.
Members the spec does not know (at the root or under ``reference/``) are ignored, as the spec
allows optional extensions.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .protocol import Protocol

FORMAT_NAME = "refine-more-subject"
FORMAT_VERSION = 1
SUBJECT_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")

REFERENCE_MAPS = ("T1F", "f", "kF", "I0")
# float attributes of the protocol: name -> (required, constraint)
_SCALAR_ATTRS = {
    "TE_s": (True, "nonneg"),
    "tau_exc_s": (True, "pos"),
    "tau_sat_s": (True, "pos"),
    "sat_b1max_uT": (True, "nonneg"),
    "sat_offset_hz": (True, "nonzero"),
    "T2R_s": (False, "pos"),
    "T1R_s": (False, "pos"),
    "sat_fermi_t0_s": (False, "pos"),
    "sat_fermi_a_s": (False, "pos"),
    "G0_s": (False, "pos"),
}


class SubjectFormatError(ValueError):
    """A subject file does not follow the spec.

    Attributes: ``path`` (the file), ``member`` (member or attribute name of the first problem,
    ``None`` for file-level problems) and ``problems`` (every problem, one line each, each line
    starting with the file name).
    """

    def __init__(self, path, member: Optional[str], message: str, problems: Optional[list] = None):
        self.path = None if path is None else str(path)
        self.member = member
        self.problems = list(problems) if problems else [message]
        super().__init__(message)


@dataclass
class Subject:
    """One scan of one subject (spec axis order: t, c, z, y, x)."""

    subject_id: str
    kspace: np.ndarray                       # complex64 (T, C, Z, Y, X), zeros where not sampled
    mask: np.ndarray                         # bool (T, Z, Y)
    protocol: Protocol
    voxel_size_mm: np.ndarray                # float64 (3,), along (z, y, x)
    coil_sens: Optional[np.ndarray] = None   # complex64 (C, Z, Y, X)
    b1: Optional[np.ndarray] = None          # float32 (Z, Y, X)
    tissue_mask: Optional[np.ndarray] = None  # bool (Z, Y, X)
    reference: dict = field(default_factory=dict)  # name -> array ('T1F', 'f', 'kF', 'I0', 'kspace_full', 'labels')
    label_names: Optional[list] = None
    path: Optional[str] = None
    notes: list = field(default_factory=list)

    @property
    def shape(self) -> tuple:
        """Image shape (Z, Y, X)."""
        return tuple(int(n) for n in self.kspace.shape[2:])

    @property
    def n_images(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _desc(arr_or_ds) -> str:
    return f"{np.dtype(arr_or_ds.dtype).name} {tuple(int(n) for n in arr_or_ds.shape)}"


def _as_str(value) -> Optional[str]:
    """An attribute value as str, or None when it is not a (single) string."""
    if isinstance(value, np.ndarray):
        if value.size != 1 or value.dtype.kind not in "SUO":
            return None
        value = value.reshape(()).item()
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, (str, np.str_)):
        return str(value)
    return None


def _as_real_array(value) -> Optional[np.ndarray]:
    """An attribute as a float64 array if it is numeric real (bool excluded), else None."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        return None
    return arr.astype(np.float64)


def _is_int_dtype(dtype) -> bool:
    return np.dtype(dtype).kind in "iu"


class _Problems:
    def __init__(self, path: str):
        self.path = path
        self.items: list[tuple[Optional[str], str]] = []

    def member(self, name: str, detail: str):
        self.items.append((name, f"{self.path}: member '{name}': {detail}"))

    def attr(self, name: str, detail: str):
        self.items.append((name, f"{self.path}: attribute '{name}': {detail}"))

    def file(self, detail: str):
        self.items.append((None, f"{self.path}: {detail}"))

    @property
    def lines(self) -> list[str]:
        return [line for _, line in self.items]

    def raise_if_any(self):
        if self.items:
            member, first = self.items[0]
            message = first if len(self.items) == 1 else "\n".join(self.lines)
            raise SubjectFormatError(self.path, member, message, self.lines)


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ------------------------------------------------------------------------------------------------
# reading and validation
# ------------------------------------------------------------------------------------------------
def _check_attrs(attrs: dict, P: _Problems) -> dict:
    """Check root attributes; returns the parsed values that passed."""
    out: dict[str, Any] = {}

    # format / version first: with an unknown format nothing else is meaningful
    if "format" not in attrs:
        P.attr("format", f"missing (expected '{FORMAT_NAME}')")
        return out
    fmt = _as_str(attrs["format"])
    if fmt != FORMAT_NAME:
        P.attr("format", f"expected '{FORMAT_NAME}', got {attrs['format']!r}")
        return out
    if "format_version" not in attrs:
        P.attr("format_version", f"missing (expected {FORMAT_VERSION})")
        return out
    ver = np.asarray(attrs["format_version"])
    if ver.size != 1 or not _is_int_dtype(ver.dtype):
        P.attr("format_version", f"expected an integer, got {attrs['format_version']!r}")
        return out
    ver = int(ver.reshape(()))
    if ver != FORMAT_VERSION:
        P.attr("format_version", f"unknown format version {ver}: this reader knows version {FORMAT_VERSION} only")
        return out

    # identity
    if "subject_id" not in attrs:
        P.attr("subject_id", "missing")
    else:
        sid = _as_str(attrs["subject_id"])
        if sid is None:
            P.attr("subject_id", f"expected a string, got {attrs['subject_id']!r}")
        elif not SUBJECT_ID_RE.match(sid) or sid in (".", ".."):
            P.attr("subject_id", f"{sid!r} is not a valid id (letters, digits, '-', '_', '.'; not '.' or '..')")
        else:
            out["subject_id"] = sid
    if "sequence" not in attrs:
        P.attr("sequence", "missing (expected 'BTS')")
    else:
        seq = _as_str(attrs["sequence"])
        if seq != "BTS":
            P.attr("sequence", f"expected 'BTS' (the only signal model of version 1), got {attrs['sequence']!r}")
    if "sat_pulse" not in attrs:
        P.attr("sat_pulse", "missing (expected 'fermi')")
    else:
        sp_ = _as_str(attrs["sat_pulse"])
        if sp_ != "fermi":
            P.attr("sat_pulse", f"expected 'fermi' (the only pulse shape of version 1), got {attrs['sat_pulse']!r}")
        else:
            out["sat_pulse"] = sp_

    # per-image arrays
    if "flip_angles_deg" not in attrs:
        P.attr("flip_angles_deg", "missing")
    else:
        fa = _as_real_array(attrs["flip_angles_deg"])
        if fa is None or fa.ndim > 1:
            P.attr("flip_angles_deg", f"expected float[T], got {attrs['flip_angles_deg']!r}")
        else:
            fa = np.atleast_1d(fa)
            if not np.all(np.isfinite(fa)) or np.any(fa <= 0):
                P.attr("flip_angles_deg", f"must be finite and positive, got {fa.tolist()}")
            else:
                out["flip_angles_deg"] = fa
    if "saturation" not in attrs:
        P.attr("saturation", "missing")
    else:
        sat = np.atleast_1d(np.asarray(attrs["saturation"]))
        if sat.ndim != 1 or sat.dtype.kind not in "iub":
            P.attr("saturation", f"expected uint8[T], got {attrs['saturation']!r}")
        elif not np.all(np.isin(sat.astype(np.int64), (0, 1))):
            P.attr("saturation", f"values must be 0 or 1, got {sat.tolist()}")
        else:
            out["saturation"] = sat.astype(np.uint8)
    if "TR_s" not in attrs:
        P.attr("TR_s", "missing")
    else:
        tr = _as_real_array(attrs["TR_s"])
        if tr is None or tr.ndim > 1:
            P.attr("TR_s", f"expected float or float[T], got {attrs['TR_s']!r}")
        elif not np.all(np.isfinite(tr)) or np.any(tr <= 0):
            P.attr("TR_s", f"must be finite and positive, got {tr.tolist()}")
        else:
            out["TR_s"] = tr

    # scalar floats
    for name, (required, rule) in _SCALAR_ATTRS.items():
        if name not in attrs:
            if required:
                P.attr(name, "missing")
            continue
        v = _as_real_array(attrs[name])
        if v is None or v.size != 1:
            P.attr(name, f"expected a float, got {attrs[name]!r}")
            continue
        v = float(v.reshape(()))
        bad = (not np.isfinite(v) or (rule == "pos" and v <= 0) or (rule == "nonneg" and v < 0)
               or (rule == "nonzero" and v == 0))
        if bad:
            what = {"pos": "finite and positive", "nonneg": "finite and >= 0", "nonzero": "finite and nonzero"}[rule]
            P.attr(name, f"must be {what}, got {v}")
        else:
            out[name] = v

    if "voxel_size_mm" not in attrs:
        P.attr("voxel_size_mm", "missing")
    else:
        vx = _as_real_array(attrs["voxel_size_mm"])
        if vx is None or vx.shape != (3,):
            P.attr("voxel_size_mm", f"expected float[3] along (z, y, x), got {attrs['voxel_size_mm']!r}")
        elif not np.all(np.isfinite(vx)) or np.any(vx <= 0):
            P.attr("voxel_size_mm", f"must be 3 finite positive sizes, got {vx.tolist()}")
        else:
            out["voxel_size_mm"] = vx
    return out


def _get_dataset(h5, name: str, P: _Problems, required: bool):
    import h5py

    try:
        if name not in h5:
            if required:
                P.member(name, "missing (required)")
            return None
        obj = h5[name]
    except Exception as exc:  # corrupt object headers
        P.member(name, f"cannot be opened ({_describe_exc(exc)})")
        return None
    if not isinstance(obj, h5py.Dataset):
        P.member(name, f"expected a dataset, got {type(obj).__name__}")
        return None
    return obj


def _read(ds, name: str, P: _Problems) -> Optional[np.ndarray]:
    """Read a whole dataset once; corrupt data becomes a problem."""
    try:
        return ds[()]
    except Exception as exc:
        P.member(name, f"cannot be read ({_describe_exc(exc)})")
        return None


def _is_mask_dtype(dtype) -> bool:
    dtype = np.dtype(dtype)
    return dtype == np.bool_ or dtype == np.uint8


def _to_bool_mask(arr: np.ndarray, name: str, P: _Problems) -> Optional[np.ndarray]:
    if arr.dtype == np.uint8 and arr.size and arr.max() > 1:
        P.member(name, f"uint8 values must be 0 or 1, got values up to {int(arr.max())}")
        return None
    return arr.astype(bool, copy=False)


def _inspect(path, load_reference: bool = True):
    """Validate the file completely; returns (problems, subject-or-None)."""
    import h5py

    spath = os.fspath(path)
    P = _Problems(spath)
    if not os.path.exists(spath):
        P.file("file not found")
        return P, None
    if os.path.isdir(spath):
        P.file("is a directory, not a subject file")
        return P, None
    try:
        is_h5 = h5py.is_hdf5(spath)
    except Exception as exc:
        P.file(f"cannot be read ({_describe_exc(exc)})")
        return P, None
    if not is_h5:
        P.file("not an HDF5 file (no HDF5 signature)")
        return P, None
    try:
        h5 = h5py.File(spath, "r")
    except Exception as exc:
        P.file(f"not a readable HDF5 file: truncated or corrupt ({_describe_exc(exc)})")
        return P, None

    try:
        with h5:
            return _inspect_open(h5, spath, P, load_reference)
    except SubjectFormatError:
        raise
    except Exception as exc:  # anything h5py/numpy raise on a damaged file
        P.file(f"truncated or corrupt ({type(exc).__name__}: {_describe_exc(exc)})")
        return P, None


def _inspect_open(h5, spath: str, P: _Problems, load_reference: bool):
    import h5py

    try:
        attrs = {k: h5.attrs[k] for k in h5.attrs.keys()}
    except Exception as exc:
        P.file(f"root attributes cannot be read: truncated or corrupt ({_describe_exc(exc)})")
        return P, None
    a = _check_attrs(attrs, P)
    if any(name in ("format", "format_version") for name, _ in P.items):
        return P, None   # not this format or not this version: nothing else is meaningful
    notes: list[str] = []

    # --- required datasets --------------------------------------------------------------------
    T = C = None
    zyx = None
    kspace = mask = None
    ds = _get_dataset(h5, "kspace", P, required=True)
    if ds is not None:
        if ds.dtype != np.complex64 or ds.ndim != 5:
            P.member("kspace", f"expected complex64 (T, C, Z, Y, X), got {_desc(ds)}")
        elif 0 in ds.shape:
            P.member("kspace", f"is empty, shape {tuple(ds.shape)}")
        else:
            T, C = int(ds.shape[0]), int(ds.shape[1])
            zyx = tuple(int(n) for n in ds.shape[2:])
            kspace = _read(ds, "kspace", P)
            if kspace is not None:
                finite = np.isfinite(kspace)
                if not finite.all():
                    n_nan = int(np.isnan(kspace).sum())
                    n_inf = int(np.isinf(kspace).sum())
                    P.member("kspace", f"contains non-finite values ({n_nan} NaN, {n_inf} Inf entries)")
                del finite
    ds = _get_dataset(h5, "mask", P, required=True)
    if ds is not None:
        expect = f"({T}, {zyx[0]}, {zyx[1]})" if T is not None else "(T, Z, Y)"
        if not _is_mask_dtype(ds.dtype) or ds.ndim != 3:
            P.member("mask", f"expected uint8 or bool {expect}, got {_desc(ds)}")
        elif T is not None and tuple(ds.shape) != (T, zyx[0], zyx[1]):
            P.member("mask", f"expected shape {expect} to match kspace {(T, C) + zyx}, got {tuple(ds.shape)}")
        else:
            raw = _read(ds, "mask", P)
            if raw is not None:
                mask = _to_bool_mask(raw, "mask", P)
            if mask is not None:
                if not mask.any():
                    P.member("mask", "is all zero: no phase-encode line was sampled")
                    mask = None
                else:
                    empty = np.flatnonzero(~mask.reshape(mask.shape[0], -1).any(axis=1))
                    if empty.size:
                        P.member("mask", f"image(s) {empty.tolist()} have no sampled line")
                        mask = None

    # --- T consistency of per-image attributes -------------------------------------------------
    if T is not None:
        for name in ("flip_angles_deg", "saturation"):
            if name in a and len(a[name]) != T:
                P.attr(name, f"has {len(a[name])} entries, but kspace has T = {T} images")
                a.pop(name)
        if "TR_s" in a and a["TR_s"].ndim == 1 and a["TR_s"].size not in (1, T):
            P.attr("TR_s", f"has {a['TR_s'].size} entries, but kspace has T = {T} images")
            a.pop("TR_s")

    protocol = None
    proto_names = {f.name for f in dataclasses.fields(Protocol)}
    if all(n in a for n in ("flip_angles_deg", "saturation", "TR_s", "TE_s", "tau_exc_s", "tau_sat_s",
                            "sat_pulse", "sat_b1max_uT", "sat_offset_hz")):
        proto_attrs = {k: v for k, v in a.items() if k in proto_names}
        try:
            protocol = Protocol.from_attrs(proto_attrs)
        except Exception as exc:
            P.items.append(("protocol", f"{spath}: protocol attributes: {_describe_exc(exc)}"))

    # --- optional members ----------------------------------------------------------------------
    coil_sens = b1 = tissue_mask = None
    ds = _get_dataset(h5, "coil_sens", P, required=False)
    if ds is not None:
        exp = (C,) + zyx if zyx is not None else None
        if ds.dtype != np.complex64 or ds.ndim != 4 or (exp is not None and tuple(ds.shape) != exp):
            P.member("coil_sens", f"expected complex64 {exp if exp else '(C, Z, Y, X)'}, got {_desc(ds)}")
        else:
            coil_sens = _read(ds, "coil_sens", P)
            if coil_sens is not None and not np.isfinite(coil_sens).all():
                P.member("coil_sens", "contains non-finite values")
                coil_sens = None
    ds = _get_dataset(h5, "tissue_mask", P, required=False)
    if ds is not None:
        if not _is_mask_dtype(ds.dtype) or ds.ndim != 3 or (zyx is not None and tuple(ds.shape) != zyx):
            P.member("tissue_mask", f"expected bool {zyx if zyx else '(Z, Y, X)'}, got {_desc(ds)}")
        else:
            raw = _read(ds, "tissue_mask", P)
            if raw is not None:
                tissue_mask = _to_bool_mask(raw, "tissue_mask", P)
            if tissue_mask is not None and not tissue_mask.any():
                P.member("tissue_mask", "is all false: no voxel to reconstruct")
                tissue_mask = None
    ds = _get_dataset(h5, "b1", P, required=False)
    if ds is not None:
        if ds.dtype != np.float32 or ds.ndim != 3 or (zyx is not None and tuple(ds.shape) != zyx):
            P.member("b1", f"expected float32 {zyx if zyx else '(Z, Y, X)'}, got {_desc(ds)}")
        else:
            b1 = _read(ds, "b1", P)
            if b1 is not None:
                if not np.isfinite(b1).all():
                    P.member("b1", "contains non-finite values")
                    b1 = None
                elif (b1 < 0).any():
                    P.member("b1", f"must be positive (relative B1+), minimum is {float(b1.min())}")
                    b1 = None
                elif tissue_mask is not None and (b1[tissue_mask] <= 0).any():
                    P.member("b1", "must be positive inside tissue_mask")
                    b1 = None
                elif tissue_mask is None and not (b1 > 0).any():
                    P.member("b1", "is zero everywhere")
                    b1 = None
    elif "b1" not in h5:
        notes.append("b1 absent: taken as 1")

    # --- reference -----------------------------------------------------------------------------
    reference: dict[str, np.ndarray] = {}
    label_names = None
    if "reference" in h5:
        grp = h5["reference"]
        if not isinstance(grp, h5py.Group):
            P.member("reference", f"expected a group, got {type(grp).__name__}")
        else:
            specs = {n: (np.float32, zyx, "float32") for n in REFERENCE_MAPS}
            specs["kspace_full"] = (np.complex64, (T, C) + zyx if zyx is not None else None, "complex64")
            specs["labels"] = (np.int16, zyx, "int16")
            for name in grp.keys():
                full = f"reference/{name}"
                if name not in specs:
                    notes.append(f"{full}: not in format version 1, ignored")
                    continue
                dtype, shape, dname = specs[name]
                ds = _get_dataset(h5, full, P, required=False)
                if ds is None:
                    continue
                ndim = 5 if name == "kspace_full" else 3
                if ds.dtype != dtype or ds.ndim != ndim or (shape is not None and tuple(ds.shape) != shape):
                    want = shape if shape is not None else ("(T, C, Z, Y, X)" if ndim == 5 else "(Z, Y, X)")
                    P.member(full, f"expected {dname} {want}, got {_desc(ds)}")
                    continue
                if name == "labels":
                    if "names" in ds.attrs:
                        raw = np.atleast_1d(np.asarray(ds.attrs["names"], dtype=object))
                        names = [_as_str(v) for v in raw]
                        if raw.ndim != 1 or any(n is None for n in names):
                            P.member(full, f"attribute 'names': expected str[], got {ds.attrs['names']!r}")
                        else:
                            label_names = names
                    else:
                        notes.append("reference/labels: attribute 'names' absent")
                if not load_reference:
                    continue
                arr = _read(ds, full, P)
                if arr is None:
                    continue
                if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
                    P.member(full, "contains non-finite values")
                    continue
                if name == "labels":
                    if arr.min() < 0:
                        P.member(full, f"labels must be >= 0, got {int(arr.min())}")
                        continue
                    if label_names is not None and int(arr.max()) > len(label_names):
                        P.member(full, f"label {int(arr.max())} has no name (attribute 'names' has {len(label_names)})")
                        continue
                reference[name] = arr

    if P.items:
        return P, None

    # mask is authoritative: unsampled entries are zeros
    outside = ~mask[:, None, :, :, None]
    n_out = int(np.count_nonzero(np.broadcast_to(outside, kspace.shape) & (kspace != 0)))
    if n_out:
        kspace[np.broadcast_to(outside, kspace.shape)] = 0
        notes.append(f"kspace: {n_out} nonzero entries outside mask set to 0 (mask is authoritative)")
    if tissue_mask is None:
        notes.append("tissue_mask absent: derive_tissue_mask() derives it from the data")
    if coil_sens is None:
        notes.append("coil_sens absent: estimate from the k-space centre (refine_more.coils)")

    subject = Subject(
        subject_id=a["subject_id"], kspace=kspace, mask=mask, protocol=protocol,
        voxel_size_mm=np.asarray(a["voxel_size_mm"], dtype=np.float64),
        coil_sens=coil_sens, b1=b1, tissue_mask=tissue_mask, reference=reference,
        label_names=label_names, path=spath, notes=notes)
    return P, subject


def validate_subject_file(path) -> list[str]:
    """Every problem of a subject file, one line each (``"file: member 'x': ..."``); [] when valid."""
    P, _ = _inspect(path, load_reference=True)
    return P.lines


def read_subject(path, *, load_reference: bool = True) -> Subject:
    """Read and completely validate a subject file.

    Raises :class:`SubjectFormatError` listing every problem found. With
    ``load_reference=False`` the ``reference/*`` members are checked (dtype, shape) but not read.
    A missing ``b1`` is taken as 1 (``subject.b1`` stays ``None``; ``notes`` says so); a missing
    ``tissue_mask`` stays ``None`` (use :func:`derive_tissue_mask`).
    """
    P, subject = _inspect(path, load_reference=load_reference)
    P.raise_if_any()
    return subject


# ------------------------------------------------------------------------------------------------
# derived tissue mask
# ------------------------------------------------------------------------------------------------
def lowres_images(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over coils and images of the calibration (low-pass) images, (Z, Y, X).

    Uses the centred fully sampled phase-encode region common to all images (with a Hann window,
    so no ringing), which is alias-free whatever the undersampling pattern.
    """
    from .coils import calibration_window

    T, C, Z, Y, X = kspace.shape
    win = calibration_window(mask)
    out = np.zeros((Z, Y, X), dtype=np.float64)
    axes = (-3, -2, -1)
    for t in range(T):
        k = kspace[t] * win[None, :, :, None]
        img = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"), axes=axes)
        out += np.sum(np.abs(img) ** 2, axis=0)
    return np.sqrt(out)


def zero_filled_rss(kspace: np.ndarray) -> np.ndarray:
    """Root-sum-of-squares over coils and images of the zero-filled images, (Z, Y, X)."""
    out = np.zeros(kspace.shape[2:], dtype=np.float64)
    axes = (-3, -2, -1)
    for t in range(kspace.shape[0]):
        img = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(kspace[t], axes=axes), axes=axes, norm="ortho"), axes=axes)
        out += np.sum(np.abs(img) ** 2, axis=0)
    return np.sqrt(out)


def derive_tissue_mask(subject: Subject, threshold: float = 0.25, lowres_threshold: float = 0.05) -> np.ndarray:
    """A tissue mask (bool (Z, Y, X)) derived from the data, for files without ``tissue_mask``.

    The full-resolution zero-filled RSS image (over coils and images; lightly smoothed) above
    ``threshold`` × its robust maximum, gated by the alias-free low-pass calibration image above
    ``lowres_threshold`` × its maximum (this removes undersampling ghosts away from the object),
    then closed, hole-filled (3-D and per slice) and stripped of components smaller than 1% of the
    largest. Returns ``subject.tissue_mask`` unchanged when the file has one.
    """
    from scipy import ndimage

    if subject.tissue_mask is not None:
        return subject.tissue_mask
    zf = ndimage.gaussian_filter(zero_filled_rss(subject.kspace), 0.5)
    low = lowres_images(subject.kspace, subject.mask)
    top = float(np.percentile(zf, 99.5)) if zf.size > 200 else float(zf.max())
    if top <= 0:
        return np.zeros(zf.shape, dtype=bool)
    m = zf > threshold * top
    if low.max() > 0:  # no common calibration region: no gate
        m &= low > lowres_threshold * low.max()
    st = ndimage.generate_binary_structure(3, 1)
    m = ndimage.binary_closing(m, structure=st, iterations=1, border_value=0) | m
    m = ndimage.binary_fill_holes(m, structure=st)
    for z in range(m.shape[0]):  # fill in-plane holes too (thin slabs)
        m[z] = ndimage.binary_fill_holes(m[z])
    lab, n = ndimage.label(m, structure=st)
    if n > 1:
        sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= 0.01 * sizes.max()) + 1
        m = np.isin(lab, keep)
    return m


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _atomic_tmp(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    return tmp


def write_subject(path, subject: Subject, *, compression: Optional[str] = None) -> None:
    """Write ``subject`` exactly as the spec says, atomically (temp file + ``os.replace``).

    ``compression``: None (default, fastest) or 'lzf'.
    """
    import h5py

    path = os.fspath(path)
    sid = str(subject.subject_id)
    if not SUBJECT_ID_RE.match(sid) or sid in (".", ".."):
        raise SubjectFormatError(path, "subject_id", f"{path}: attribute 'subject_id': {sid!r} is not a valid id")
    kw = {"compression": compression} if compression else {}
    tmp = _atomic_tmp(path)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT_NAME
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["subject_id"] = sid
            f.attrs["sequence"] = "BTS"
            for k, v in subject.protocol.to_attrs().items():
                if isinstance(v, str):
                    f.attrs[k] = v
                elif isinstance(v, np.ndarray):
                    f.attrs[k] = v
                else:
                    f.attrs[k] = np.float64(v)
            f.attrs["voxel_size_mm"] = np.asarray(subject.voxel_size_mm, dtype=np.float64).reshape(3)
            f.create_dataset("kspace", data=np.asarray(subject.kspace, dtype=np.complex64), **kw)
            f.create_dataset("mask", data=np.asarray(subject.mask).astype(np.uint8), **kw)
            if subject.coil_sens is not None:
                f.create_dataset("coil_sens", data=np.asarray(subject.coil_sens, dtype=np.complex64), **kw)
            if subject.b1 is not None:
                f.create_dataset("b1", data=np.asarray(subject.b1, dtype=np.float32), **kw)
            if subject.tissue_mask is not None:
                f.create_dataset("tissue_mask", data=np.asarray(subject.tissue_mask).astype(bool), **kw)
            if subject.reference:
                g = f.create_group("reference")
                for name, arr in subject.reference.items():
                    if name == "kspace_full":
                        g.create_dataset(name, data=np.asarray(arr, dtype=np.complex64), **kw)
                    elif name == "labels":
                        d = g.create_dataset(name, data=np.asarray(arr).astype(np.int16), **kw)
                        if subject.label_names is not None:
                            d.attrs["names"] = [str(n) for n in subject.label_names]
                    else:
                        g.create_dataset(name, data=np.asarray(arr, dtype=np.float32), **kw)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
