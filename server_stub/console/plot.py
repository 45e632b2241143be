"""The add-in page's timeline: its device counts over time as an inline SVG (no script, no
image request), with the audit log's changes of that add-in as marks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from server_stub.console.fleet import COUNT_NAMES

COLOURS = {
    "entitled": "#6b7280",
    "notified": "#2563eb",
    "cached": "#9333ea",
    "applied": "#16a34a",
    "failed": "#dc2626",
    "stale": "#d97706",
}
W, H, LEFT, BOTTOM, TOP, RIGHT = 720, 240, 48, 28, 30, 12


def timeline_svg(
    points: Sequence[tuple[float, tuple[int, ...]]],
    marks: Sequence[tuple[float, str]],
    now: float,
) -> str:
    """Step lines of each count from `points` ((time, counts in `COUNT_NAMES` order)) up to
    `now`, and a dashed line per mark ((time, label))."""
    if not points:
        return '<p class="muted">No counts yet.</p>'
    t0 = min([points[0][0], *(t for t, _ in marks if t >= points[0][0] - 3600)])
    t1 = max(now, t0 + 1.0)
    top = max(1, max(max(c) for _, c in points))

    def x(t: float) -> float:
        return LEFT + (t - t0) / (t1 - t0) * (W - LEFT - RIGHT)

    def y(v: float) -> float:
        return H - BOTTOM - v / top * (H - BOTTOM - TOP)

    out = [
        f'<svg class="timeline" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="device counts over time">',
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#999"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#999"/>',
        f'<text x="{LEFT - 6}" y="{y(top) + 4:.1f}" text-anchor="end" font-size="11">{top}</text>',
        f'<text x="{LEFT - 6}" y="{H - BOTTOM + 4}" text-anchor="end" font-size="11">0</text>',
        f'<text x="{LEFT}" y="{H - 8}" font-size="11">{_clock(t0)}</text>',
        f'<text x="{W - RIGHT}" y="{H - 8}" text-anchor="end" font-size="11">{_clock(t1)}</text>',
    ]
    for t, label in marks:
        if t0 <= t <= t1:
            out.append(
                f'<line x1="{x(t):.1f}" y1="{TOP}" x2="{x(t):.1f}" y2="{H - BOTTOM}" '
                f'stroke="#555" stroke-dasharray="3 3"><title>{escape(label)}</title></line>'
            )
    for i, name in enumerate(COUNT_NAMES):
        if name == "stale" and not any(c[i] for _, c in points):
            continue
        coords: list[str] = []
        for j, (t, c) in enumerate(points):
            if j:
                coords.append(f"{x(t):.1f},{y(points[j - 1][1][i]):.1f}")
            coords.append(f"{x(t):.1f},{y(c[i]):.1f}")
        coords.append(f"{x(t1):.1f},{y(points[-1][1][i]):.1f}")
        out.append(
            f'<polyline fill="none" stroke="{COLOURS[name]}" stroke-width="2" '
            f'points="{" ".join(coords)}"><title>{name}</title></polyline>'
        )
    for i, name in enumerate(COUNT_NAMES):
        lx = LEFT + 8 + i * 100
        out.append(f'<rect x="{lx}" y="6" width="10" height="10" fill="{COLOURS[name]}"/>')
        out.append(f'<text x="{lx + 14}" y="15" font-size="11">{name}</text>')
    out.append("</svg>")
    return "".join(out)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))
