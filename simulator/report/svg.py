"""SVG plotting primitives: axes with round ticks, line series, and a line plot drawn as inline
SVG (no plotting dependency, no network)."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def _num(v: float) -> str:
    """A tick label: 1, 2.5, 0.05, 1,000, 20,000."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{round(v, 10):.3g}"


def linear_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round ticks (steps of 1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]: the first
    at or below lo, the last at or above hi."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.floor(lo / step + 1e-9) * step
    last = math.ceil(hi / step - 1e-9) * step
    n = round((last - first) / step)
    return [round(first + i * step, 10) for i in range(n + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks (…, 1, 2, 5, 10, 20, 50, …) covering [lo, hi]: the first at or below lo,
    the last at or above hi."""
    lo, hi = max(lo, 1e-3), max(hi, 1e-3)
    candidates = [
        round(m * 10.0**k, 10)
        for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
        for m in (1, 2, 5)
    ]
    start = max((c for c in candidates if c <= lo * (1 + 1e-9)), default=candidates[0])
    end = min((c for c in candidates if c >= hi * (1 - 1e-9)), default=candidates[-1])
    return [c for c in candidates if start <= c <= end]


def labelled(ticks: list[float], log: bool, length: float, min_gap: float) -> list[float]:
    """The ticks that get a label on an axis `length` pixels long: all of them, unless on a
    log axis the closest two (2 and 5 are 0.3 decade apart) would be under `min_gap` pixels
    apart; then only the powers of ten (the others stay as grid lines)."""
    if not log or len(ticks) < 2:
        return ticks
    per_decade = length / (math.log10(ticks[-1]) - math.log10(ticks[0]))
    if per_decade * math.log10(2) >= min_gap:
        return ticks
    return [t for t in ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9]


@dataclass
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str
    dash: str = ""
    width: float = 2.0
    legend: bool = True
    gap: float | None = None
    """Break the line where two consecutive x values are further apart than this."""


@dataclass
class Axis:
    label: str
    log: bool = False
    lo: float | None = None
    hi: float | None = None
    ticks: Callable[[float, float], list[float]] | None = None
    fmt: Callable[[float], str] = _num


def _fmt_attr(v: float) -> str:
    return f"{v:.1f}"


def svg_plot(
    series: Sequence[Series],
    *,
    title: str,
    x: Axis,
    y: Axis,
    width: int = 640,
    height: int = 320,
    markers: Sequence[tuple[float, str]] = (),
    legend_width: int = 150,
    title_size: int = 14,
) -> str:
    """A line plot as inline SVG. The legend sits right of the plot area, never over it."""
    drawn = [s for s in series if s.points]
    has_legend = any(s.legend for s in drawn)
    # A title of two lines (name, then figures) for narrow plots; the label reads both.
    lines = title.split("\n")
    left, top, bottom = 62, 14 + 16 * len(lines), 44
    right = (legend_width if has_legend else 0) + 16
    w, h = width - left - right, height - top - bottom
    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{esc(": ".join(lines))}">',
        *(
            f'<text x="{width / 2:.1f}" y="{18 + 16 * i}" text-anchor="middle" '
            f'font-size="{title_size}" font-weight="{600 if i == 0 else 400}">{esc(line)}</text>'
            for i, line in enumerate(lines)
        ),
    ]
    xs = [p[0] for s in drawn for p in s.points if not x.log or p[0] > 0]
    ys = [p[1] for s in drawn for p in s.points if not y.log or p[1] > 0]
    if not xs or not ys:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#777">'
            "no data</text></svg>"
        )
        return "".join(out)
    f = _Frame(left, top, w, h, x, y, _axis_ticks(x, xs), _axis_ticks(y, ys))
    out.append(
        f'<rect class="plot" x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" '
        'stroke="#bbb"/>'
    )
    out += _grid(f)
    out += _markers(f, markers)
    out.append(
        f'<text x="{left + w / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="12">'
        f"{esc(x.label)}</text>"
    )
    out.append(
        f'<text x="14" y="{top + h / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {top + h / 2:.1f})">{esc(y.label)}</text>'
    )
    out += _lines(f, drawn)
    out += _legend(f, drawn)
    return "".join(out)


def _axis_ticks(a: Axis, values: list[float]) -> list[float]:
    lo = a.lo if a.lo is not None else min(values)
    hi = a.hi if a.hi is not None else max(values)
    if a.ticks is not None:
        return a.ticks(lo, hi)
    return log_ticks(lo, hi) if a.log else linear_ticks(lo, hi)


@dataclass
class _Frame:
    """The plot area in pixels and the axes drawn on it."""

    left: float
    top: float
    w: float
    h: float
    x: Axis
    y: Axis
    xt: list[float]
    yt: list[float]

    def px(self, v: float) -> float:
        return self.left + _scale(self.x, self.xt, min(max(v, self.xt[0]), self.xt[-1]), self.w)

    def py(self, v: float) -> float:
        return (
            self.top
            + self.h
            - _scale(self.y, self.yt, min(max(v, self.yt[0]), self.yt[-1]), self.h)
        )


def _scale(a: Axis, ticks: list[float], v: float, size: float) -> float:
    lo, hi = ticks[0], ticks[-1]
    if a.log:
        lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, ticks[0]))
    return (v - lo) / ((hi - lo) or 1.0) * size


def _grid(f: _Frame) -> list[str]:
    """Grid lines at every tick; labels where `labelled` leaves room."""
    esc = html.escape
    left, top, w, h = f.left, f.top, f.w, f.h
    out = []
    y_labels = labelled(f.yt, f.y.log, h, 16)
    x_labels = labelled(f.xt, f.x.log, w, 34)
    for v in f.yt:
        yy = _fmt_attr(f.py(v))
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{yy}" y2="{yy}" stroke="#eee"/>')
        if v not in y_labels:
            continue
        out.append(
            f'<text class="ytick" x="{left - 6}" y="{f.py(v) + 4:.1f}" text-anchor="end" '
            'font-size="11">'
            f"{esc(f.y.fmt(v))}</text>"
        )
    for v in f.xt:
        xx = _fmt_attr(f.px(v))
        out.append(f'<line x1="{xx}" x2="{xx}" y1="{top}" y2="{top + h}" stroke="#eee"/>')
        if v not in x_labels:
            continue
        out.append(
            f'<text class="xtick" x="{xx}" y="{top + h + 16}" text-anchor="middle" '
            'font-size="11">'
            f"{esc(f.x.fmt(v))}</text>"
        )
    return out


def _markers(f: _Frame, markers: Sequence[tuple[float, str]]) -> list[str]:
    """Dashed vertical lines with a label (where each step started)."""
    out = []
    for i, (mx, label) in enumerate(markers):
        if not f.xt[0] <= mx <= f.xt[-1]:
            continue
        xx = _fmt_attr(f.px(mx))
        out.append(
            f'<line x1="{xx}" x2="{xx}" y1="{f.top}" y2="{f.top + f.h}" stroke="#999" '
            'stroke-dasharray="3,3"/>'
        )
        out.append(
            f'<text x="{f.px(mx) + 3:.1f}" y="{f.top + 11 + 12 * (i % 2)}" font-size="10" '
            f'fill="#555">{html.escape(label)}</text>'
        )
    return out


def _lines(f: _Frame, drawn: Sequence[Series]) -> list[str]:
    out = []
    for s in drawn:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for run in _runs(s):
            if len(run) == 1:
                out.append(
                    f'<circle cx="{f.px(run[0][0]):.1f}" cy="{f.py(run[0][1]):.1f}" '
                    f'r="{s.width + 0.5}" fill="{s.color}"/>'
                )
                continue
            pts = " ".join(f"{f.px(a):.1f},{f.py(b):.1f}" for a, b in run)
            out.append(
                f'<polyline fill="none" stroke="{s.color}" stroke-width="{s.width}"'
                f'{dash} stroke-linejoin="round" points="{pts}"/>'
            )
    return out


def _legend(f: _Frame, drawn: Sequence[Series]) -> list[str]:
    row = 0
    out = ['<g class="legend">']
    for s in drawn:
        if not s.legend:
            continue
        lx, ly = f.left + f.w + 14, f.top + 8 + 18 * row
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{s.color}" '
            f'stroke-width="{s.width + 1}"{dash}/>'
        )
        out.append(f'<text x="{lx + 28}" y="{ly + 4}" font-size="12">{html.escape(s.name)}</text>')
        row += 1
    out.append("</g></svg>")
    return out


def _runs(s: Series) -> list[list[tuple[float, float]]]:
    """The series' points split where they leave a gap."""
    runs: list[list[tuple[float, float]]] = []
    for p in s.points:
        if runs and (s.gap is None or p[0] - runs[-1][-1][0] <= s.gap):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def percent(v: float) -> str:
    return f"{v * 100:.0f}%"


def share_ticks(lo: float, hi: float) -> list[float]:
    return [0.0, 0.25, 0.5, 0.75, 1.0]
