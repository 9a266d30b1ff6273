"""Cohort manifests (spec `subject-format.md`, "A cohort"): reading, id and path checks.

A manifest is a Parquet (or CSV) table with ``subject_id``, ``path`` (absolute or relative to the
manifest's folder) and an optional ``role`` (``seed`` marks the subject reconstructed in full first).

Problems with the manifest *itself* (unreadable, missing columns, duplicate, missing or unsafe ids,
two seed rows, unknown roles) raise :class:`ManifestError`: nothing sensible can run. Problems with
a *subject file* (missing, corrupt, not following the spec) are not errors here:
:func:`validate_entries` marks those entries invalid so the driver can record them as failed rows
and go on with the rest. It reads headers only (:func:`refine_more.files.subject.validate_subject_headers`):
a file whose values are bad (NaN, all zero) fails in its task, which reads it anyway.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SUBJECT_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


class ManifestError(ValueError):
    """The manifest cannot be used (names the file and the problem)."""


@dataclass
class Entry:
    subject_id: str
    path: str                    # absolute, resolved against the manifest's folder
    role: str = ""
    row: int = 0                 # position in the manifest
    problems: list = field(default_factory=list)   # empty: the subject file is valid

    @property
    def valid(self) -> bool:
        return not self.problems


def check_subject_id(subject_id, out_dir: Optional[os.PathLike] = None) -> str:
    """Return ``subject_id`` as str if it is safe as a folder name (and stays inside ``out_dir``)."""
    missing = subject_id is None or (isinstance(subject_id, float) and subject_id != subject_id)
    if missing or isinstance(subject_id, float):   # a float id: NaN (an empty Parquet cell) or 1.0
        raise ManifestError(f"subject_id {subject_id!r}: missing or not text (Parquet null/NaN, or a float)")
    sid = str(subject_id)
    if not SUBJECT_ID_RE.match(sid) or sid in (".", ".."):
        raise ManifestError(f"invalid subject_id {sid!r}: use letters, digits, '.', '_' and '-' "
                            "(not '.' or '..')")
    if out_dir is not None:
        root = Path(out_dir).resolve()
        target = (root / sid).resolve()
        if target == root or root not in target.parents:
            raise ManifestError(f"subject_id {sid!r} would write outside the output folder {root}")
    return sid


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path, out_dir: Optional[os.PathLike] = None) -> list[Entry]:
    """Read a manifest; return one :class:`Entry` per row, paths made absolute.

    Raises :class:`ManifestError` for an unreadable table, missing columns, empty or duplicate
    subject ids and ids that are not safe folder names.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        if path.suffix.lower() in (".csv", ".tsv"):
            df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str,
                             keep_default_na=False)
        else:
            df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow/pandas raise many types for a corrupt table
        raise ManifestError(f"manifest {path}: not a readable Parquet/CSV table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("subject_id", "path") if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {path}: missing column(s) {', '.join(missing)} "
                            f"(has {', '.join(map(str, df.columns))})")
    if len(df) == 0:
        raise ManifestError(f"manifest {path}: no rows")
    base = path.resolve().parent
    entries, seen = [], {}
    for i, rec in enumerate(df.to_dict("records")):
        try:
            sid = check_subject_id(rec["subject_id"], out_dir)
        except ManifestError as exc:
            raise ManifestError(f"manifest {path}, row {i}: {exc}") from None
        if sid in seen:
            raise ManifestError(f"manifest {path}: subject_id {sid!r} appears in rows {seen[sid]} and {i}")
        seen[sid] = i
        p = rec["path"]
        if p is None or (isinstance(p, float)) or str(p).strip() == "":
            raise ManifestError(f"manifest {path}, row {i} ({sid}): empty path")
        p = Path(os.path.expanduser(str(p)))
        if not p.is_absolute():
            p = base / p
        entries.append(Entry(subject_id=sid, path=str(p), role=_role(rec.get("role"), path, i), row=i))
    seeds = [e.row for e in entries if e.role == "seed"]
    if len(seeds) > 1:
        raise ManifestError(f"manifest {path}: rows {seeds} all have role 'seed': mark one seed per cohort")
    return entries


def _role(role, path, i: int) -> str:
    role = "" if role is None or (isinstance(role, float)) else str(role).strip().lower()
    if role not in ("", "seed"):
        raise ManifestError(f"manifest {path}, row {i}: unknown role {role!r} (known: 'seed', or empty)")
    return role


def validate_entries(entries: list[Entry], progress: bool = False) -> list[Entry]:
    """Fill ``entry.problems`` from :func:`refine_more.files.subject.validate_subject_headers` (in
    place): headers only, no array value is read (see the module docstring)."""
    from tqdm import tqdm

    from refine_more.files.subject import validate_subject_headers

    for e in tqdm(entries, desc="validate", disable=not progress, leave=False):
        if not os.path.lexists(e.path):
            e.problems = [f"{e.path}: file does not exist"]
            continue
        try:
            e.problems = list(validate_subject_headers(e.path))
        except Exception as exc:  # the validator should report, not raise; be safe anyway
            e.problems = [f"{e.path}: {type(exc).__name__}: {exc}"]
    return entries


def choose_seed(entries: list[Entry]) -> Optional[Entry]:
    """The valid entry with role 'seed' (the first such), else the first valid entry, else None.

    A 'seed' row whose file is invalid is passed over (with the next valid row as seed): the
    cohort still runs, and the bad file is reported as failed like any other.
    """
    valid = [e for e in entries if e.valid]
    for e in valid:
        if e.role == "seed":
            return e
    return valid[0] if valid else None
