"""Small charts written as SVG by hand: lines, bars and dots on numeric or categorical x, linear
or log y. What matplotlib would take ~0.3 s to draw per chart takes a millisecond, and every dot
can carry a tooltip (``<title>``) and a link, as MRIQC's group plots do (click an outlier, open
its report).

A series: ``{"kind": "line" | "bars" | "dots", "label", "color", "points": [...]}``; a point is
``(x, y)`` or a dict ``{"x", "y", "tip", "href", "flagged"}``; ``x`` is a category's index when
the chart has ``categories``. Bars take ``offset`` and ``width`` (in x units).
"""
from __future__ import annotations

import math

from markupsafe import Markup, escape

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
FLAG = "#c62828"


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _point(p) -> dict:
    return dict(p) if isinstance(p, dict) else {"x": p[0], "y": p[1]}


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


def nice_ticks(lo: float, hi: float, log: bool = False) -> list:
    """Ticks covering [lo, hi]: steps of 1, 2 or 5 × 10^k (linear), or 1, 2, 5 × 10^k values (log)."""
    if log:
        lo, hi = max(lo, 1e-300), max(hi, 1e-300)
        ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
        if len(ticks) < 3:       # less than a decade: plain steps, still on the log axis
            ticks = [v for v in nice_ticks(lo, hi) if v > 0] or [lo, hi]
        return ticks
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / 5
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    n = int(math.ceil((hi - start) / step - 1e-9))
    return [round(start + i * step, 12) for i in range(n + 1)]


class _Frame:
    """The mapping of data to pixels of one chart."""

    def __init__(self, width, height, xr, yr, ylog, margins):
        self.w, self.h, (self.l, self.r, self.t, self.b) = width, height, margins
        self.xr, self.yr, self.ylog = xr, yr, ylog

    def x(self, v) -> float:
        x0, x1 = self.xr
        return self.l + (float(v) - x0) / ((x1 - x0) or 1.0) * (self.w - self.l - self.r)

    def y(self, v) -> float:
        y0, y1 = self.yr
        f = (lambda u: math.log10(max(float(u), 1e-300))) if self.ylog else float
        return self.h - self.b - (f(v) - f(y0)) / ((f(y1) - f(y0)) or 1.0) * (self.h - self.t - self.b)


def _ranges(series, hlines, ylog, categories):
    ys = [float(p["y"]) for s in series for p in map(_point, s["points"]) if _finite(p["y"])]
    ys += [float(v) for v, _ in hlines if _finite(v)]
    if ylog:
        ys = [v for v in ys if v > 0]
    if not ys:
        return None
    lo, hi = min(ys), max(ys)
    if any(s["kind"] == "bars" for s in series) and not ylog:
        lo = min(lo, 0.0)
    ticks = nice_ticks(lo / 1.15 if ylog else lo, hi * 1.15 if ylog else hi, ylog)
    yr = (min(ticks[0], lo), max(ticks[-1], hi))
    if categories is not None:
        return (-0.6, len(categories) - 0.4), yr, ticks
    xs = [float(p["x"]) for s in series for p in map(_point, s["points"]) if _finite(p["x"])]
    return (min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1), yr, ticks


def _axes(fr: _Frame, ticks, categories, title, xlabel, ylabel) -> list:
    out = [f'<rect x="{fr.l}" y="{fr.t}" width="{fr.w - fr.l - fr.r}" height="{fr.h - fr.t - fr.b}" '
           'fill="none" stroke="#888" stroke-width="0.8"/>']
    for v in ticks:
        if fr.yr[0] <= v <= fr.yr[1]:
            y = fr.y(v)
            out.append(f'<line x1="{fr.l}" x2="{fr.w - fr.r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                       f'<text x="{fr.l - 4}" y="{y + 3:.1f}" text-anchor="end">{_fmt(v)}</text>')
    if categories is not None:
        for i, c in enumerate(categories):
            out.append(f'<text x="{fr.x(i):.1f}" y="{fr.h - fr.b + 13}" text-anchor="middle">{escape(c)}</text>')
    else:
        for v in nice_ticks(*fr.xr):
            if fr.xr[0] <= v <= fr.xr[1]:
                out.append(f'<text x="{fr.x(v):.1f}" y="{fr.h - fr.b + 13}" text-anchor="middle">{_fmt(v)}</text>')
    out.append(f'<text x="{fr.w / 2:.0f}" y="14" text-anchor="middle" font-weight="600">{escape(title)}</text>')
    if xlabel:
        out.append(f'<text x="{(fr.l + fr.w - fr.r) / 2:.0f}" y="{fr.h - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        cy = (fr.t + fr.h - fr.b) / 2
        out.append(f'<text transform="translate(12 {cy:.0f}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>')
    return out


def _series(fr: _Frame, s: dict, color: str) -> list:
    pts = [p for p in map(_point, s["points"]) if _finite(p["y"]) and _finite(p["x"]) and (not fr.ylog or p["y"] > 0)]
    if s["kind"] == "line":
        path = " ".join(f"{fr.x(p['x']):.1f},{fr.y(p['y']):.1f}" for p in pts)
        return [f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{s.get("lw", 1.4)}"/>']
    out = []
    for p in pts:
        tip = f"<title>{escape(p.get('tip') or _fmt(float(p['y'])))}</title>"
        if s["kind"] == "bars":
            half = s.get("width", 0.8) / 2
            x0, x1 = fr.x(p["x"] + s.get("offset", 0) - half), fr.x(p["x"] + s.get("offset", 0) + half)
            y0, y1 = fr.y(max(fr.yr[0], 0) if not fr.ylog else fr.yr[0]), fr.y(p["y"])
            out.append(f'<rect x="{x0:.1f}" y="{min(y0, y1):.1f}" width="{x1 - x0:.1f}" height="{abs(y1 - y0):.1f}" '
                       f'fill="{color}">{tip}</rect>')
            continue
        flagged = bool(p.get("flagged"))
        dot = (f'<circle cx="{fr.x(p["x"]):.1f}" cy="{fr.y(p["y"]):.1f}" r="{5.5 if flagged else 4}" '
               f'fill="{color}" fill-opacity="0.8" stroke="{FLAG if flagged else "#fff"}" '
               f'stroke-width="{2.2 if flagged else 0.8}" class="dot{" flagged" if flagged else ""}">{tip}</circle>')
        out.append(f'<a href="{escape(p["href"])}">{dot}</a>' if p.get("href") else dot)
    return out


def chart(series: list, *, title: str = "", xlabel: str = "", ylabel: str = "", ylog: bool = False,
          categories=None, hlines=(), width: int = 420, height: int = 250, legend: bool = True) -> Markup:
    """An inline ``<svg>`` chart of ``series`` (see the module docstring); ``hlines``: (y, label)."""
    ranges = _ranges(series, list(hlines), ylog, categories)
    if ranges is None:
        return Markup(f'<p class="note">{escape(title)}: no data</p>')
    xr, yr, ticks = ranges
    fr = _Frame(width, height, xr, yr, ylog, (56, 10, 38 if legend else 24, 40 if xlabel else 26))
    parts = _axes(fr, ticks, categories, title, xlabel, ylabel)
    for v, label in hlines:
        if _finite(v):
            y = fr.y(v)
            parts.append(f'<line x1="{fr.l}" x2="{fr.w - fr.r}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444" '
                         f'stroke-dasharray="4 3"><title>{escape(label)}</title></line>')
    labels = []
    for i, s in enumerate(series):
        color = s.get("color") or PALETTE[i % len(PALETTE)]
        parts += _series(fr, s, color)
        if s.get("label") and s["label"] not in [lab for lab, _ in labels]:
            labels.append((s["label"], color))
    if legend and labels:
        x = fr.l + 6
        for label, color in labels:
            parts.append(f'<rect x="{x}" y="{fr.t - 14}" width="9" height="9" fill="{color}"/>'
                         f'<text x="{x + 12}" y="{fr.t - 6}">{escape(label)}</text>')
            x += 22 + 6.2 * len(label)
    return Markup(f'<svg class="fig chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
                  f'width="{width}" height="{height}" font-size="10" font-family="sans-serif" role="img">'
                  + "".join(parts) + "</svg>")
