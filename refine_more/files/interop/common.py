"""What the importers share: the error type, ``--protocol`` files, and a validated atomic write.

Every problem with a foreign file is one :class:`ForeignFormatError` whose message is one line
naming the file and the key (variable, XML element, user parameter) at fault::

    data/kspace.mat: key 'kspace': expected rank 5 [FE, PE1, PE2, coil, image], got rank 4 (16, 12, 6, 8)
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from refine_more.physics.protocol import Protocol

# Keys a --protocol file may set: every Protocol field, plus the file-level attributes an importer
# cannot always read from the foreign file.
EXTRA_KEYS = ("voxel_size_mm", "subject_id")


class ForeignFormatError(ValueError):
    """A foreign file (or a --protocol file) cannot be imported; ``path`` and ``key`` name the culprit."""

    def __init__(self, path, key: Optional[str], detail: str):
        self.path = None if path is None else os.fspath(path)
        self.key = key
        where = f"{self.path}: key '{key}': " if key else f"{self.path}: "
        super().__init__(where + " ".join(str(detail).split()))


def protocol_keys() -> tuple:
    return tuple(f.name for f in dataclasses.fields(Protocol)) + EXTRA_KEYS


def load_protocol_file(path) -> dict:
    """Read a ``--protocol`` file (JSON, TOML or YAML, chosen by suffix): a flat mapping whose keys
    are spec attribute names (``flip_angles_deg``, ``saturation``, ``TR_s``, ``TE_s``, ...,
    ``voxel_size_mm``, ``subject_id``). Unknown keys are an error naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ForeignFormatError(path, None, "protocol file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            raise ForeignFormatError(path, None, "protocol file must be .json, .toml, .yaml or .yml")
    except ForeignFormatError:
        raise
    except Exception as exc:
        raise ForeignFormatError(path, None, f"cannot be parsed ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ForeignFormatError(path, None, "expected a mapping of spec attribute names to values")
    known = protocol_keys()
    for key in data:
        if key not in known:
            raise ForeignFormatError(path, key, f"unknown protocol key (known: {', '.join(known)})")
    return data


def build_protocol(values: dict, source) -> Protocol:
    """A :class:`Protocol` from spec attribute values; a bad value is an error naming ``source``."""
    names = {f.name for f in dataclasses.fields(Protocol)}
    kwargs = {k: v for k, v in values.items() if k in names}
    try:
        return Protocol(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ForeignFormatError(source, "protocol", str(exc)) from None


def safe_subject_id(text: str, fallback: str = "subject") -> str:
    """A spec-valid subject id from free text (letters, digits, '-', '_', '.'); never '.' or '..'."""
    sid = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")
    return sid or fallback


def write_validated(out, subject) -> str:
    """Write ``subject`` (spec v1) to ``out``, read it back through the validator, and only then put
    it in place (temp file + ``os.replace``); on any problem ``out`` is untouched and the error
    lists the validator's lines."""
    from refine_more.files.subject import SubjectFormatError, validate_subject_file, write_subject

    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(out)}.{os.getpid()}.import.tmp")
    try:
        write_subject(tmp, subject)
        problems = validate_subject_file(tmp)
        if problems:
            lines = [p.replace(tmp, out) for p in problems]
            raise SubjectFormatError(out, None, "\n".join(lines), lines)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def as_float_list(value, n: int, key: str, source) -> list:
    """A scalar or a list of n floats as a list of n floats (scalars are repeated)."""
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        arr = np.full(n, arr.item())
    if arr.size != n:
        raise ForeignFormatError(source, key, f"expected 1 or {n} values (one per image), got {arr.size}")
    return arr.tolist()
