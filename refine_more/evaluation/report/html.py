"""The machinery of the HTML reports: jinja2 templates (package data beside this module), number
filters, atomic writes. The figures (figures.py, svg.py) are embedded: PNG panels as base64
``data:`` URIs, charts as inline SVG.

A report is one self-contained file: no script, style sheet, font or image is fetched from
anywhere, so it opens offline and can be mailed or logged as one MLflow artifact; the only links
that leave it are relative links to neighbouring files of the result folder.
"""
from __future__ import annotations

import math
from pathlib import Path

from refine_more.files.atomic import atomic_write_text

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _plain(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def fmt_num(v, digits: int = 3) -> str:
    """A number with ``digits`` significant digits; '–' when missing or not finite."""
    f = _plain(v)
    if f is None:
        return "–"
    if f == 0:
        return "0"
    if abs(f) >= 10 ** digits or abs(f) < 1e-3:
        return f"{f:.{max(1, digits - 1)}e}"
    return f"{f:.{digits}g}" if abs(f) >= 1 else f"{f:.{digits}f}".rstrip("0").rstrip(".")


def fmt_s(v) -> str:
    """Seconds: '12.3 s', '–' when missing."""
    f = _plain(v)
    return "–" if f is None else (f"{f:.1f} s" if f < 100 else f"{f:.0f} s")


def sort_key(v) -> str:
    """The value a table cell sorts by (``data-sort``): the number, or '' when missing."""
    f = _plain(v)
    return "" if f is None else repr(f)


def environment(*extra_dirs):
    """A jinja2 environment over ``extra_dirs`` then this package's templates (autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader([str(d) for d in extra_dirs] + [str(TEMPLATES)]),
                             autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(num=fmt_num, secs=fmt_s, sortkey=sort_key)
    return env


def render(template: str, context: dict, *extra_dirs) -> str:
    return environment(*extra_dirs).get_template(template).render(**context)


def write_html(path, text: str) -> str:
    """Write a report atomically (a reader never sees half a page)."""
    return atomic_write_text(path, text)
