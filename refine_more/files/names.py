"""Names every layer shares: the maps of a result and the rule for subject ids.

One home, so the tuple of map names and the id pattern are written once
(``docs/conventions.md`` says what the maps are and in which units).
"""
from __future__ import annotations

import re

#: the four maps of a reconstruction, in this order (files, tables, plots)
MAP_NAMES = ("I0", "T1F", "f", "kF")
#: the maps the paper scores (I0 is a scale, not a tissue property)
SCORED_MAPS = ("T1F", "f", "kF")
#: a subject id is a safe folder name: letters, digits, '.', '_' and '-'
SUBJECT_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def is_subject_id(text) -> bool:
    """True when ``text`` is a str matching :data:`SUBJECT_ID_RE` and not '.' or '..'."""
    return isinstance(text, str) and bool(SUBJECT_ID_RE.match(text)) and text not in (".", "..")
