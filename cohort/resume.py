"""Whether a finished result on disk may be resumed: its outputs are there, it has a quality control
(rows written before QC are redone) and its input is the same file (:func:`check_done`, the check
:func:`cohort.plan.plan_cohort` applies to every ``done.json`` whose config and seed already match).

The input digest (:func:`input_digest`, computed by the task and stored in ``done.json``) is the
subject file's sha256 plus its size and mtime. On a rerun the driver first compares size and, for
the same path, mtime: unchanged means unchanged, with no read (the common case costs a ``stat``; a
paper-size subject is ~2 GB and the driver reads only headers). Anything else (another path in
the manifest row, a copy with a new mtime) is settled by the sha256 of the file now: a moved or
copied file resumes, a different file is redone. What it misses: a file rewritten in place to the
same size with its mtime set back.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .manifest import file_sha256
from .results import subject_dir

#: outputs named in done.json that a resumed row must still have
OUTPUT_KEYS = ("maps_path", "montage_path", "loss_png_path", "history_path")


def input_digest(path) -> dict:
    """The columns identifying the input file: ``input_sha256``, ``input_size``, ``input_mtime_ns``."""
    st = os.stat(path)
    return {"input_sha256": file_sha256(path), "input_size": int(st.st_size), "input_mtime_ns": int(st.st_mtime_ns)}


def missing_output(row: dict, out_dir, subject_id: str, mode: str) -> Optional[str]:
    """Why the outputs named in ``row`` are not all in the subject folder (None when they are)."""
    folder = subject_dir(out_dir, subject_id, mode)
    for key in OUTPUT_KEYS:
        if not row.get(key):
            return f"done.json names no {key}"
        if not (folder / Path(row[key]).name).is_file():
            return f"{Path(row[key]).name} is missing from {folder}"
    return None


def changed_input(row: dict, path) -> Optional[str]:
    """Why ``path`` is not the file ``row`` was reconstructed from (None when it is)."""
    sha = row.get("input_sha256")
    if not sha:
        return "done.json records no input digest (written before digests were recorded)"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"input {path}: {exc.strerror}"
    same_path = str(path) == str(row.get("subject_path"))
    if st.st_size != row.get("input_size"):
        what = f"its size differs ({row.get('input_size')} -> {st.st_size} bytes)"
    elif same_path and st.st_mtime_ns == row.get("input_mtime_ns"):
        return None
    elif file_sha256(path) == sha:
        return None
    else:
        what = "its sha256 differs"
    was = "" if same_path else f" (the row pointed at {row.get('subject_path')})"
    return f"input {path} is not the file that was reconstructed{was}: {what}"


def check_done(out_dir):
    """The ``check`` of :func:`cohort.plan.plan_cohort` for ``out_dir``: ``(entry, mode, row)`` ->
    ``(reason, input_changed)`` when the stored result must be redone, else None."""
    def check(entry, mode: str, row: dict):
        changed = changed_input(row, entry.path)
        if changed:
            return changed, True
        if not row.get("qc_status"):     # written before QC (docs/decisions/017): never resumed unchecked
            return "done.json has no quality control (written before QC)", False
        missing = missing_output(row, out_dir, entry.subject_id, mode)
        return (missing, False) if missing else None
    return check
