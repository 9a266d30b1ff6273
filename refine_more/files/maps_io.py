"""Reconstruction output, version 1 (spec `subject-format.md`, "Reconstruction output").

Public API
----------
- :func:`write_maps` -- ``maps.h5`` plus ``I0.nii.gz``, ``T1F.nii.gz``, ``f.nii.gz``, ``kF.nii.gz``.
- :func:`read_maps` -- read and validate ``maps.h5``: ``(maps, attrs)``.
- :class:`MapsFormatError` -- a ``ValueError`` naming the file and member.

NIfTI axis convention: arrays are (z, y, x) in memory and in ``maps.h5``; the NIfTI files store
the data transposed to (x, y, z) (NIfTI's i, j, k), with affine ``diag(vx, vy, vz, 1)`` where
``voxel_size_mm = (vz, vy, vx)``: voxel (i, j, k) = array[k, j, i] lies at (i·vx, j·vy, k·vz) mm.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from refine_more.files.atomic import atomic_path, atomic_write  # noqa: F401 (atomic_path: older imports from here)
from refine_more.files.names import MAP_NAMES, is_subject_id

MAPS_FORMAT = "refine-more-maps"
MAPS_FORMAT_VERSION = 1
REQUIRED_ATTRS = ("format", "format_version", "subject_id", "method", "config_hash", "software_version")


class MapsFormatError(ValueError):
    """A maps file does not follow the spec; ``path`` and ``member`` name the culprit."""

    def __init__(self, path, member: Optional[str], message: str):
        self.path = None if path is None else str(path)
        self.member = member
        super().__init__(message)


def _software_version() -> str:
    try:
        from refine_more import __version__  # type: ignore[attr-defined]
        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version
        return version("refine-more")
    except Exception:
        return "0.1.0"


def nifti_affine(voxel_size_mm) -> np.ndarray:
    """Affine for NIfTI data stored as (x, y, z): diag(vx, vy, vz, 1) from (vz, vy, vx)."""
    vz, vy, vx = (float(v) for v in np.asarray(voxel_size_mm, dtype=np.float64).reshape(3))
    return np.diag([vx, vy, vz, 1.0])


def write_maps(out_dir, maps: dict, tissue_mask=None, *, subject_id: str, method: str, config_hash: str,
               voxel_size_mm, software_version: Optional[str] = None, nifti: bool = True) -> str:
    """Write ``out_dir/maps.h5`` (and the four NIfTI maps); returns the ``maps.h5`` path.

    maps: name -> (Z, Y, X) array for I0, T1F, f, kF (all four required; stored float32, 0
    outside ``tissue_mask`` and non-finite values set to 0 there too). tissue_mask: bool (Z, Y, X);
    when None it is taken from ``maps['tissue_mask']``. Every file is written atomically.
    """
    import h5py
    import nibabel as nib

    out_dir = os.fspath(out_dir)
    if tissue_mask is None:
        if "tissue_mask" not in maps:
            raise ValueError("write_maps: tissue_mask missing (argument or maps['tissue_mask'])")
        tissue_mask = maps["tissue_mask"]
    tm = np.asarray(tissue_mask).astype(bool)
    if tm.ndim != 3:
        raise ValueError(f"write_maps: tissue_mask must be (Z, Y, X), got shape {tm.shape}")
    sid = str(subject_id)
    if not is_subject_id(sid):
        raise ValueError(f"write_maps: invalid subject_id {sid!r}")
    vox = np.asarray(voxel_size_mm, dtype=np.float64).reshape(3)
    out = {}
    for name in MAP_NAMES:
        if name not in maps:
            raise ValueError(f"write_maps: map {name!r} missing (need {', '.join(MAP_NAMES)})")
        a = np.asarray(maps[name], dtype=np.float32)
        if a.shape != tm.shape:
            raise ValueError(f"write_maps: map {name!r} has shape {a.shape}, tissue_mask {tm.shape}")
        a = np.where(tm & np.isfinite(a), a, np.float32(0)).astype(np.float32)
        out[name] = a
    version = software_version if software_version is not None else _software_version()

    def _h5(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = MAPS_FORMAT
            f.attrs["format_version"] = np.int64(MAPS_FORMAT_VERSION)
            f.attrs["subject_id"] = sid
            f.attrs["method"] = str(method)
            f.attrs["config_hash"] = str(config_hash)
            f.attrs["software_version"] = str(version)
            f.attrs["voxel_size_mm"] = vox
            for name, a in out.items():
                f.create_dataset(name, data=a)
            f.create_dataset("tissue_mask", data=tm)

    os.makedirs(out_dir, exist_ok=True)
    h5_path = atomic_write(os.path.join(out_dir, "maps.h5"), _h5)
    if nifti:
        affine = nifti_affine(vox)
        for name, a in out.items():
            img = nib.Nifti1Image(np.ascontiguousarray(a.transpose(2, 1, 0)), affine)
            img.header.set_xyzt_units("mm", "sec")
            atomic_write(os.path.join(out_dir, f"{name}.nii.gz"), lambda tmp, img=img: nib.save(img, tmp))
    return h5_path


def _as_str(v):
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(()).item()
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", "replace")
    if isinstance(v, (str, np.str_)):
        return str(v)
    return None


def read_maps(path) -> tuple:
    """Read and validate a ``maps.h5`` (a file or its folder): returns ``(maps, attrs)`` where
    maps holds float32 I0, T1F, f, kF and bool tissue_mask (Z, Y, X). Raises MapsFormatError."""
    import h5py

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "maps.h5")
    if not os.path.isfile(path):
        raise MapsFormatError(path, None, f"{path}: file not found")
    try:
        f = h5py.File(path, "r")
    except Exception as exc:
        raise MapsFormatError(path, None, f"{path}: not a readable HDF5 file: truncated or corrupt ({exc})") from None
    try:
        with f:
            attrs = {}
            for k in f.attrs.keys():
                v = f.attrs[k]
                s = _as_str(v)
                attrs[k] = s if s is not None else (v.item() if isinstance(v, np.generic) else v)
            for k in REQUIRED_ATTRS:
                if k not in attrs:
                    raise MapsFormatError(path, k, f"{path}: attribute '{k}': missing")
            if attrs["format"] != MAPS_FORMAT:
                raise MapsFormatError(path, "format", f"{path}: attribute 'format': expected '{MAPS_FORMAT}', got {attrs['format']!r}")
            fv = np.asarray(attrs["format_version"])
            if fv.size != 1 or fv.dtype.kind not in "iu" or int(fv.reshape(())) != MAPS_FORMAT_VERSION:
                raise MapsFormatError(path, "format_version",
                                      f"{path}: attribute 'format_version': unknown version {attrs['format_version']!r} "
                                      f"(this reader knows {MAPS_FORMAT_VERSION})")
            attrs["format_version"] = int(fv.reshape(()))
            for k in ("subject_id", "method", "config_hash", "software_version"):
                if not isinstance(attrs[k], str):
                    raise MapsFormatError(path, k, f"{path}: attribute '{k}': expected a string, got {attrs[k]!r}")
            maps = {}
            shape = None
            for name in MAP_NAMES + ("tissue_mask",):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise MapsFormatError(path, name, f"{path}: member '{name}': missing")
                ds = f[name]
                want = np.bool_ if name == "tissue_mask" else np.float32
                if ds.dtype != want or ds.ndim != 3 or (shape is not None and tuple(ds.shape) != shape):
                    raise MapsFormatError(
                        path, name, f"{path}: member '{name}': expected {np.dtype(want).name} "
                        f"{shape if shape else '(Z, Y, X)'}, got {ds.dtype.name} {tuple(ds.shape)}")
                shape = tuple(ds.shape)
                try:
                    maps[name] = ds[()]
                except Exception as exc:
                    raise MapsFormatError(path, name, f"{path}: member '{name}': cannot be read ({exc})") from None
            return maps, attrs
    except MapsFormatError:
        raise
    except Exception as exc:
        raise MapsFormatError(path, None, f"{path}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
