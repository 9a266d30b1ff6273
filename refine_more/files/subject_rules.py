"""The subject-file validator, part 1: the root attributes, checked by the rows of a table, and the
protocol they make (:func:`check_protocol`: one entry per image, and enough images to fit).

:data:`ATTRIBUTES` lists each attribute of format version 1 (spec `subject-format.md`) with
whether it is required, what to say when it is missing and the check that parses it; the
datasets are checked in :mod:`refine_more.files.subject_members`. Problems are collected, never raised,
so a file's every problem is reported at once (one line each, naming the file and the attribute).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from refine_more.files.names import SUBJECT_ID_RE
from refine_more.physics.protocol import Protocol

FORMAT_NAME = "refine-more-subject"
FORMAT_VERSION = 1


def describe_exc(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class Problems:
    """Problems of one file, in the order found: ``(member or None, line)``."""

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


# ------------------------------------------------------------------------------------------------
# attribute values
# ------------------------------------------------------------------------------------------------
def as_str(value) -> Optional[str]:
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


def _real(value) -> Optional[np.ndarray]:
    """An attribute as a float64 array if it is numeric real (bool excluded), else None."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf":
        return None
    return arr.astype(np.float64)


# A check takes the raw value and returns (parsed value, None) or (None, problem). A parsed value
# of None with no problem means "valid, nothing to keep".
Check = Callable[[Any], tuple]


def _subject_id(v):
    sid = as_str(v)
    if sid is None:
        return None, f"expected a string, got {v!r}"
    if not SUBJECT_ID_RE.match(sid) or sid in (".", ".."):
        return None, f"{sid!r} is not a valid id (letters, digits, '-', '_', '.'; not '.' or '..')"
    return sid, None


def _one_of(expected: str, what: str, keep: bool) -> Check:
    def check(v):
        s = as_str(v)
        if s != expected:
            return None, f"expected '{expected}' (the only {what} of version 1), got {v!r}"
        return (s if keep else None), None
    return check


def _positive_floats(expected: str, one_d: bool, upper: float, unit: str) -> Check:
    def check(v):
        a = _real(v)
        if a is None or a.ndim > 1:
            return None, f"expected {expected}, got {v!r}"
        a = np.atleast_1d(a) if one_d else a
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            return None, f"must be finite and positive, got {a.tolist()}"
        if np.any(a > upper):
            return None, f"must be at most {upper:g} {unit} ({_UPPER_WHY}), got {a.tolist()}"
        return a, None
    return check


def _saturation(v):
    sat = np.atleast_1d(np.asarray(v))
    if sat.ndim != 1 or sat.dtype.kind not in "iub":
        return None, f"expected uint8[T], got {v!r}"
    if not np.all(np.isin(sat.astype(np.int64), (0, 1))):
        return None, f"values must be 0 or 1, got {sat.tolist()}"
    return sat.astype(np.uint8), None


_RULES = {"pos": ("finite and positive", lambda x: x > 0), "nonneg": ("finite and >= 0", lambda x: x >= 0),
          "nonzero": ("finite and nonzero", lambda x: x != 0)}
# Upper bounds (on |value|) far outside any BTS/MT protocol, so that a wrong unit or a typo (flip
# angles of 1e9°, 1e6 µT) is refused instead of giving plausible but wrong maps.
_UPPER_WHY = "beyond any BTS protocol: a wrong unit?"


def _scalar(rule: str, upper: float = np.inf, unit: str = "", lower_abs: float = 0.0) -> Check:
    what, ok = _RULES[rule]

    def check(v):
        a = _real(v)
        if a is None or a.size != 1:
            return None, f"expected a float, got {v!r}"
        x = float(a.reshape(()))
        if not np.isfinite(x) or not ok(x):
            return None, f"must be {what}, got {x}"
        if not lower_abs <= abs(x) <= upper:
            return None, f"|value| must be within [{lower_abs:g}, {upper:g}] {unit} ({_UPPER_WHY}), got {x:g}"
        return x, None
    return check


def _voxel_size(v):
    a = _real(v)
    if a is None or a.shape != (3,):
        return None, f"expected float[3] along (z, y, x), got {v!r}"
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        return None, f"must be 3 finite positive sizes, got {a.tolist()}"
    return a, None


@dataclass(frozen=True)
class Attribute:
    name: str
    required: bool
    check: Check
    missing: str = "missing"


#: the root attributes after ``format`` and ``format_version``, in the order they are reported
ATTRIBUTES = (
    Attribute("subject_id", True, _subject_id),
    Attribute("sequence", True, _one_of("BTS", "signal model", keep=False), "missing (expected 'BTS')"),
    Attribute("sat_pulse", True, _one_of("fermi", "pulse shape", keep=True), "missing (expected 'fermi')"),
    Attribute("flip_angles_deg", True, _positive_floats("float[T]", one_d=True, upper=90.0, unit="degrees")),
    Attribute("saturation", True, _saturation),
    Attribute("TR_s", True, _positive_floats("float or float[T]", one_d=False, upper=10.0, unit="s")),
    Attribute("TE_s", True, _scalar("nonneg", 1.0, "s")),
    Attribute("tau_exc_s", True, _scalar("pos", 0.01, "s")),
    Attribute("tau_sat_s", True, _scalar("pos", 0.1, "s")),
    Attribute("sat_b1max_uT", True, _scalar("nonneg", 50.0, "µT")),
    Attribute("sat_offset_hz", True, _scalar("nonzero", 1e5, "Hz", lower_abs=100.0)),
    Attribute("T2R_s", False, _scalar("pos", 1e-3, "s")),
    Attribute("T1R_s", False, _scalar("pos", 10.0, "s")),
    Attribute("sat_fermi_t0_s", False, _scalar("pos", 0.1, "s")),
    Attribute("sat_fermi_a_s", False, _scalar("pos", 0.1, "s")),
    Attribute("G0_s", False, _scalar("pos", 1e-3, "s")),
    Attribute("voxel_size_mm", True, _voxel_size),
)


def _check_version(attrs: dict, P: Problems) -> bool:
    """``format`` and ``format_version`` first: with an unknown format nothing else is meaningful."""
    if "format" not in attrs:
        P.attr("format", f"missing (expected '{FORMAT_NAME}')")
        return False
    if as_str(attrs["format"]) != FORMAT_NAME:
        P.attr("format", f"expected '{FORMAT_NAME}', got {attrs['format']!r}")
        return False
    if "format_version" not in attrs:
        P.attr("format_version", f"missing (expected {FORMAT_VERSION})")
        return False
    ver = np.asarray(attrs["format_version"])
    if ver.size != 1 or np.dtype(ver.dtype).kind not in "iu":
        P.attr("format_version", f"expected an integer, got {attrs['format_version']!r}")
        return False
    ver = int(ver.reshape(()))
    if ver != FORMAT_VERSION:
        P.attr("format_version", f"unknown format version {ver}: this reader knows version {FORMAT_VERSION} only")
        return False
    return True


def check_attrs(attrs: dict, P: Problems) -> Optional[dict]:
    """The parsed root attributes that passed; None when the format or its version is not ours."""
    if not _check_version(attrs, P):
        return None
    out: dict[str, Any] = {}
    for rule in ATTRIBUTES:
        if rule.name not in attrs:
            if rule.required:
                P.attr(rule.name, rule.missing)
            continue
        value, problem = rule.check(attrs[rule.name])
        if problem is not None:
            P.attr(rule.name, problem)
        elif value is not None:
            out[rule.name] = value
    return out


def _identifiable(a: dict, P: Problems) -> bool:
    """The protocol determines I0, T1F and f: images with the saturation pulse off and on, and
    two distinct flip angles among those without it (T1F by variable flip angle)."""
    sat, fa = np.asarray(a["saturation"]), np.asarray(a["flip_angles_deg"])
    if not (sat == 0).any() or not (sat == 1).any():
        P.attr("saturation", f"needs images with the saturation pulse off and on to determine f, got {sat.tolist()}")
        return False
    if np.unique(fa[sat == 0]).size < 2:
        P.attr("flip_angles_deg", "the images without saturation need 2 distinct flip angles to determine T1F, "
                                  f"got {fa[sat == 0].tolist()}")
        return False
    return True


def check_protocol(a: dict, T, spath: str, P: Problems) -> Optional[Protocol]:
    """Per-image attributes against the kspace's T, then the :class:`Protocol` they make."""
    if T is not None:
        for name in ("flip_angles_deg", "saturation"):
            if name in a and len(a[name]) != T:
                P.attr(name, f"has {len(a[name])} entries, but kspace has T = {T} images")
                a.pop(name)
        if "TR_s" in a and a["TR_s"].ndim == 1 and a["TR_s"].size not in (1, T):
            P.attr("TR_s", f"has {a['TR_s'].size} entries, but kspace has T = {T} images")
            a.pop("TR_s")
    needed = ("flip_angles_deg", "saturation", "TR_s", "TE_s", "tau_exc_s", "tau_sat_s", "sat_pulse",
              "sat_b1max_uT", "sat_offset_hz")
    if not all(n in a for n in needed):
        return None
    if not _identifiable(a, P):
        return None
    names = {f.name for f in dataclasses.fields(Protocol)}
    try:
        return Protocol.from_attrs({k: v for k, v in a.items() if k in names})
    except Exception as exc:
        P.items.append(("protocol", f"{spath}: protocol attributes: {describe_exc(exc)}"))
        return None
