"""MATLAB files: one numeric variable in MATLAB's index order, from v5 (scipy) or v7.3 (HDF5).

A v7.3 MAT-file is HDF5 with a 512-byte text header ("MATLAB 7.3 MAT-file ..."); MATLAB stores
arrays column-major, so HDF5 (row-major) holds them with the axes reversed, and complex arrays
as a compound of ``real`` and ``imag``. :func:`read_mat` undoes both: it returns the array with
the shape MATLAB (and ``mat73`` / ``scipy.io.loadmat``) shows, e.g. ``[FE, PE1, PE2, coil, image]``.
The file kind is checked against what the caller expects: the public code reads some files with
``mat73`` (v7.3 only) and others with ``scipy.io.loadmat`` (v5 only), so a file of the other kind
is an error naming the file and the key, as it would be there.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from refine_more.files.interop.common import ForeignFormatError

V5 = "5"
V73 = "7.3"


def mat_kind(path) -> str:
    """'7.3' (HDF5, with or without the MATLAB header), '5' (v5/v6/v7 MAT), or raise."""
    import h5py

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ForeignFormatError(path, None, "file not found")
    with open(path, "rb") as fh:
        head = fh.read(128)
    if head.startswith(b"MATLAB 7.3 MAT-file") or h5py.is_hdf5(path):
        if not h5py.is_hdf5(path):
            raise ForeignFormatError(path, None, "has a MATLAB 7.3 header but no HDF5 body (truncated or corrupt)")
        return V73
    if head.startswith(b"MATLAB 5.0 MAT-file") or (len(head) == 128 and head[126:128] in (b"IM", b"MI")):
        return V5
    raise ForeignFormatError(path, None, "not a MATLAB MAT-file (neither a v5 header nor HDF5)")


def _describe(kind: str) -> str:
    return "MATLAB v7.3 (HDF5)" if kind == V73 else "MATLAB v5"


def read_mat(path, key: str, *, kind: str, rank: int, axes: str) -> np.ndarray:
    """The numeric variable ``key`` of a MAT-file, in MATLAB's index order, checked for its kind
    ('5' or '7.3') and rank; ``axes`` (e.g. "[FE, PE1, PE2, coil, image]") names the expected axes
    in error messages. Returns a float64/complex128/bool array (a view where possible)."""
    path = os.fspath(path)
    found = mat_kind(path)
    if found != kind:
        hint = "save(..., '-v7.3')" if kind == V73 else "save(..., '-v7') or scipy.io.savemat"
        raise ForeignFormatError(path, key, f"expected a {_describe(kind)} file (the public code reads it so), "
                                            f"got {_describe(found)}: re-save it with {hint}")
    arr = _read_v73(path, key) if kind == V73 else _read_v5(path, key)
    if arr.ndim != rank:
        raise ForeignFormatError(path, key, f"expected rank {rank} {axes}, got rank {arr.ndim} {tuple(arr.shape)}")
    if 0 in arr.shape:
        raise ForeignFormatError(path, key, f"is empty, shape {tuple(arr.shape)}")
    if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
        raise ForeignFormatError(path, key, "contains non-finite values (NaN or Inf)")
    return arr


def _read_v5(path: str, key: str) -> np.ndarray:
    import scipy.io

    try:
        data = scipy.io.loadmat(path, variable_names=[key])
    except Exception as exc:
        raise ForeignFormatError(path, key, f"cannot be read as MATLAB v5 ({type(exc).__name__}: {exc})") from None
    if key not in data:
        names = [n for n, *_ in scipy.io.whosmat(path)]
        raise ForeignFormatError(path, key, f"missing (the file holds {names})")
    arr = data[key]
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biufc":
        raise ForeignFormatError(path, key, f"expected a numeric array, got {type(arr).__name__} "
                                            f"{getattr(arr, 'dtype', '')}")
    return _widen(arr)


def _read_v73(path: str, key: str) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise ForeignFormatError(path, None, f"not a readable HDF5 file: truncated or corrupt ({exc})") from None
    with f:
        if key not in f:
            names = sorted(k for k in f.keys() if not k.startswith("#"))
            raise ForeignFormatError(path, key, f"missing (the file holds {names})")
        obj = f[key]
        if not isinstance(obj, h5py.Dataset):
            raise ForeignFormatError(path, key, f"expected a numeric array, got a MATLAB struct or group")
        mclass = obj.attrs.get("MATLAB_class", b"")
        mclass = mclass.decode() if isinstance(mclass, bytes) else str(mclass)
        if mclass in ("cell", "struct", "char", "function_handle") or obj.dtype.kind == "O":
            raise ForeignFormatError(path, key, f"expected a numeric array, got MATLAB class {mclass or obj.dtype}")
        try:
            raw = obj[()]
        except Exception as exc:
            raise ForeignFormatError(path, key, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if raw.dtype.names:
        if set(raw.dtype.names) != {"real", "imag"}:
            raise ForeignFormatError(path, key, f"expected a numeric array, got a compound of {raw.dtype.names}")
        raw = raw["real"].astype(np.float64) + 1j * raw["imag"].astype(np.float64)
    elif raw.dtype.kind not in "biufc":
        raise ForeignFormatError(path, key, f"expected a numeric array, got dtype {raw.dtype}")
    # HDF5 holds MATLAB's column-major array with its axes reversed
    return _widen(np.transpose(np.asarray(raw)))


def _widen(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind == "c":
        return arr.astype(np.complex128, copy=False)
    return arr.astype(np.float64, copy=False)


def require_file(folder, name: str) -> Path:
    path = Path(folder) / name
    if not path.is_file():
        raise ForeignFormatError(path, None, "file not found")
    return path
