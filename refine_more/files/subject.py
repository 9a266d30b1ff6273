"""Subject files (spec `subject-format.md`, version 1): the in-memory :class:`Subject`, reading,
validating and writing.

Every problem with a file is reported as a :class:`SubjectFormatError` (a ``ValueError``) whose
message names the file and the member or attribute at fault, one line per problem::

    subj.h5: member 'kspace': expected complex64 (T, C, Z, Y, X), got float32 (8, 4, 6, 24)

Public API
----------
- :class:`Subject` -- one scan of one subject, in memory.
- :func:`read_subject` -- read and validate a file (raises :class:`SubjectFormatError`).
- :func:`validate_subject_file` -- all problems of a file as a list of lines (empty: valid).
- :func:`validate_subject_headers` -- the problems its headers show, no array read (the cohort driver).
- :func:`write_subject` -- write exactly the spec, atomically.

The checks themselves are tables in :mod:`refine_more.files.subject_rules` (root attributes) and
:mod:`refine_more.files.subject_members` (datasets); a tissue mask for files without one comes from
:func:`refine_more.physics.tissue.derive_tissue_mask`.

Leniencies (all harmless, documented): ``mask`` and ``tissue_mask`` may be bool or uint8 (0/1);
``saturation`` may be any integer/bool dtype holding 0/1; ``flip_angles_deg`` and the scalar float
attributes may be stored as integers; strings may be variable- or fixed-length. Datasets with
other dtypes than the spec's (complex128 k-space, float64 maps, ...) are rejected.
Members the spec does not know (at the root or under ``reference/``) are ignored, as the spec
allows optional extensions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from refine_more.files.atomic import atomic_path
from refine_more.files.names import is_subject_id
from refine_more.physics.protocol import Protocol
from refine_more.files.subject_members import inspect_file
from refine_more.files.subject_rules import FORMAT_NAME, FORMAT_VERSION


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

    def __reduce__(self):
        """Pickled with all its arguments: a Ray task's error reaches the driver as itself."""
        return type(self), (self.path, self.member, str(self), self.problems)


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
    _kspace_shape: Optional[tuple] = field(default=None, init=False, repr=False)   # set by release_kspace

    def release_kspace(self) -> None:
        """Drop the acquired k-space, the largest member (1.9 GiB at 48×176×176, 20 coils, 8 images), once
        a reconstruction's physics holds its own normalised copy. Shape, images and coils still answer;
        `kspace` is then None, so a later read fails loudly instead of seeing zeros."""
        if self.kspace is not None:
            self._kspace_shape, self.kspace = tuple(self.kspace.shape), None

    @property
    def _dims(self) -> tuple:
        return self._kspace_shape if self.kspace is None else self.kspace.shape

    @property
    def shape(self) -> tuple:
        """Image shape (Z, Y, X)."""
        return tuple(int(n) for n in self._dims[2:])

    @property
    def n_images(self) -> int:
        return int(self._dims[0])

    @property
    def n_coils(self) -> int:
        return int(self._dims[1])


def _raise_if_any(P) -> None:
    if P.items:
        member, first = P.items[0]
        message = first if len(P.items) == 1 else "\n".join(P.lines)
        raise SubjectFormatError(P.path, member, message, P.lines)


def validate_subject_file(path) -> list[str]:
    """Every problem of a subject file, one line each (``"file: member 'x': ..."``); [] when valid."""
    P, _ = inspect_file(path, load_reference=True)
    return P.lines


def validate_subject_headers(path) -> list[str]:
    """The problems a file's headers show (attributes, members, dtypes, shapes, declared sizes,
    written storage), one line each; no array value is read, so this costs the same for any size.
    The value checks (finite, not all zero, ...) happen when the file is read (:func:`read_subject`)."""
    P, _ = inspect_file(path, load_reference=True, values=False)
    return P.lines


def read_subject(path, *, load_reference: bool | str = True) -> Subject:
    """Read and completely validate a subject file.

    Raises :class:`SubjectFormatError` listing every problem found. With
    ``load_reference=False`` the ``reference/*`` members are checked (dtype, shape) but not read;
    ``"maps"`` reads the reference maps and labels but not ``kspace_full`` (as large as the k-space).
    A missing ``b1`` is taken as 1 (``subject.b1`` stays ``None``; ``notes`` says so); a missing
    ``tissue_mask`` stays ``None`` (use :func:`refine_more.physics.tissue.derive_tissue_mask`).
    """
    P, fields = inspect_file(path, load_reference=load_reference)
    _raise_if_any(P)
    return Subject(**fields)


def write_subject(path, subject: Subject, *, compression: Optional[str] = None) -> str:
    """Write ``subject`` exactly as the spec says, atomically (temp file + ``os.replace``); returns
    the path.

    ``compression``: None (default, fastest) or 'lzf'.
    """
    import h5py

    path = os.fspath(path)
    sid = str(subject.subject_id)
    if not is_subject_id(sid):
        raise SubjectFormatError(path, "subject_id", f"{path}: attribute 'subject_id': {sid!r} is not a valid id")
    kw = {"compression": compression} if compression else {}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
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
    return path
