"""What a report reads, all from a result folder: the file names, the diagnostics written beside
the maps (``diagnostics.json`` and ``diagnostics.safetensors``, from refine_more/reconstruction/diagnostics.py),
the result's record (a cohort's ``done.json`` row or ``recon``'s ``summary.json``) and its QC.

QC (``qc_status`` ∈ {"ok", "flagged"}, ``qc_reasons``: short strings) is read from the record's
top level or from a ``qc`` dict in it (``status``, ``reasons``, ``metrics``, ``thresholds``); numeric
``qc_<name>`` fields are its metrics and ``qc_thresholds`` their thresholds. Absent: "QC not computed".
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from refine_more.files.atomic import atomic_write, atomic_write_text, json_default

REPORT_FILE = "report.html"
DIAGNOSTICS_JSON = "diagnostics.json"
DIAGNOSTICS_ARRAYS = "diagnostics.safetensors"   # safetensors: reading it cannot run code
DONE_FILE = "done.json"          # a cohort subject folder's row (cohort/results.py)
SUMMARY_FILE = "summary.json"    # `refine-more recon`'s record
QC_NOT_COMPUTED = "QC not computed"


def write_diagnostics(folder, diagnostics: dict) -> list:
    """``diagnostics.json`` and ``diagnostics.safetensors`` (atomically); nothing when ``diagnostics`` is empty.
    Returns the paths written."""
    if not diagnostics:
        return []
    folder = Path(folder)
    paths = [atomic_write_text(folder / DIAGNOSTICS_JSON,
                               json.dumps(diagnostics.get("json", {}), indent=1, default=json_default))]
    arrays = diagnostics.get("arrays") or {}
    if arrays:
        paths.append(atomic_write(str(folder / DIAGNOSTICS_ARRAYS), lambda tmp: _save_arrays(tmp, arrays)))
    return paths


def _save_arrays(tmp: str, arrays: dict) -> None:
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp)


def read_json(path) -> Optional[dict]:
    try:
        with open(path) as fh:
            d = json.load(fh)
        return d if isinstance(d, (dict, list)) else None
    except (OSError, ValueError):
        return None


def read_diagnostics(folder) -> tuple:
    """``(json dict, arrays dict)`` of a result folder; empty where a file is absent or unreadable."""
    folder = Path(folder)
    info = read_json(folder / DIAGNOSTICS_JSON)
    arrays = {}
    try:
        arrays = load_file(str(folder / DIAGNOSTICS_ARRAYS))
    except (OSError, ValueError, SafetensorError):   # absent, truncated or not safetensors: no arrays
        pass
    return (info if isinstance(info, dict) else {}), arrays


def read_record(folder) -> dict:
    """The result's record: a cohort folder's ``done.json`` row, else ``recon``'s ``summary.json``."""
    folder = Path(folder)
    for name in (DONE_FILE, SUMMARY_FILE):
        d = read_json(folder / name)
        if isinstance(d, dict):
            return d
    return {}


def missing(v) -> bool:
    """None, NaN, or an empty string."""
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _reasons(v) -> list:
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x) for x in list(v) if not missing(x)]
    if missing(v):
        return []
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                return [str(x) for x in json.loads(s)]
            except ValueError:
                pass
        return [p.strip() for p in s.split(";") if p.strip()]
    return [str(v)]


def _number(v) -> Optional[float]:
    if isinstance(v, (bool, np.bool_)) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def qc_view(record: dict) -> dict:
    """``{"computed", "status", "flagged", "reasons", "metrics", "thresholds", "label"}`` of a record
    (see the module docstring); ``computed`` False when it carries no QC status."""
    nested = record.get("qc") if isinstance(record.get("qc"), dict) else {}
    status = record.get("qc_status", nested.get("status"))
    status = None if missing(status) else str(status)
    reasons = _reasons(record.get("qc_reasons", nested.get("reasons")))
    metrics = {k[3:]: _number(v) for k, v in record.items()
               if k.startswith("qc_") and k not in ("qc_status", "qc_reasons", "qc_thresholds")
               and _number(v) is not None}
    metrics.update({k: _number(v) for k, v in (nested.get("metrics") or {}).items() if _number(v) is not None})
    thresholds = record.get("qc_thresholds", nested.get("thresholds"))
    if isinstance(thresholds, str):
        try:
            thresholds = json.loads(thresholds)
        except ValueError:
            thresholds = None
    thresholds = thresholds if isinstance(thresholds, dict) else {}
    return {"computed": status is not None, "status": status, "flagged": status == "flagged",
            "reasons": reasons, "metrics": metrics, "thresholds": thresholds,
            "label": status if status is not None else QC_NOT_COMPUTED}


def relative_link(target, start_folder) -> str:
    """``target`` relative to ``start_folder``, with '/' separators (an HTML href)."""
    return Path(os.path.relpath(Path(target).resolve(), Path(start_folder).resolve())).as_posix()
