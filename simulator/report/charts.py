"""The report's charts: latency CDF, convergence per step, rates and latency over time, each
drawn from report.json with the SVG primitives."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from simulator.fleetstats import MANIFEST_FAILED_SERIES, MANIFEST_SERIES
from simulator.metrics import STAGES
from simulator.report.svg import Axis, Series, percent, share_ticks, svg_plot

_COLORS = {
    "notified": "#1f77b4",
    "cached": "#ff7f0e",
    "applied": "#2ca02c",
    "baseline": "#555555",
    MANIFEST_SERIES: "#9467bd",
    MANIFEST_FAILED_SERIES: "#d62728",
}

_LABELS = {
    "notified": "notified",
    "cached": "cached",
    "applied": "applied",
    "baseline": "bare MQTT fan-out",
    MANIFEST_SERIES: "manifest GET",
    MANIFEST_FAILED_SERIES: "manifest GET failed",
}


def cdf_svg(report: dict[str, Any]) -> str:
    cdf = report.get("cdf") or {}
    series = [
        Series(_LABELS[s], [(ms, f) for ms, f in cdf.get(s, []) if ms > 0], _COLORS[s])
        for s in STAGES
    ]
    base = [(ms, f) for ms, f in cdf.get("baseline", []) if ms > 0]
    if base:
        series.append(Series(_LABELS["baseline"], base, _COLORS["baseline"], dash="6,4"))
    return svg_plot(
        series,
        title="Latency CDF per stage (all changes) and the bare fan-out",
        x=Axis("ms after commit (log scale)", log=True),
        y=Axis("share of deliveries", lo=0, hi=1, ticks=share_ticks, fmt=percent),
        width=700,
        height=330,
        legend_width=140,
    )


def convergence_panels(report: dict[str, Any]) -> str:
    panels = []
    for s in report["steps"]:
        curve = s.get("reached_convergence") or []
        reached = s.get("reached", 0)
        if not reached or len(curve) < 2:
            continue
        end = curve[-1][0]
        in_seconds = end >= 2.0
        pts = _staircase([(t if in_seconds else t * 1000, f) for t, f in curve])
        took = f"{end:.1f} s" if end >= 1 else f"{end * 1000:.0f} ms"
        done = (
            f"all in sync in {took}" if not s["unconverged"] else f"{s['unconverged']} not in sync"
        )
        panels.append(
            svg_plot(
                [Series(s["name"], pts, "#d62728", legend=False)],
                title=f"{s['name']}\n{reached:,} reached, {done}",
                x=Axis(
                    "seconds after the step started" if in_seconds else "ms after the step started",
                    lo=0,
                ),
                y=Axis("converged", lo=0, hi=1, ticks=share_ticks, fmt=percent),
                width=326,
                height=240,
                title_size=13,
            )
        )
    if not panels:
        return "<p>No step changed any client.</p>"
    return '<div class="grid">' + "".join(panels) + "</div>"


def _staircase(points: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """A sampled cumulative curve drawn as steps: it stays at a value until the next sample,
    instead of a slope that suggests clients converged in between."""
    out: list[tuple[float, float]] = []
    for x, y in points:
        if out:
            out.append((x, out[-1][1]))
        out.append((x, y))
    return out


def _timeline_series(report: dict[str, Any]) -> tuple[dict[str, list[list[float]]], float]:
    tl = report.get("timeline") or {}
    return tl.get("series") or {}, float(tl.get("bucket_s") or 1.0)


def _step_markers(report: dict[str, Any]) -> list[tuple[float, str]]:
    return [(float(s["started_s"]), s["name"]) for s in report["steps"] if "started_s" in s]


def rate_svg(report: dict[str, Any]) -> str:
    data, width = _timeline_series(report)
    duration = float(report["duration_s"])
    n = max(1, math.ceil(duration / width))
    series = []
    for name in (*STAGES, MANIFEST_SERIES, MANIFEST_FAILED_SERIES):
        rows = data.get(name)
        if not rows:
            continue
        per = [0.0] * n
        for t, count, _p50, _p99 in rows:
            i = min(n - 1, max(0, round(t / width)))
            per[i] += count / width
        series.append(
            Series(
                _LABELS[name],
                [(i * width + width / 2, v) for i, v in enumerate(per)],
                _COLORS[name],
                width=1.6,
            )
        )
    return svg_plot(
        series,
        title=f"Deliveries and manifest requests per second ({width:g} s buckets)",
        x=Axis("seconds since the run started", lo=0, hi=duration),
        y=Axis("per second", lo=0),
        width=1180,
        height=300,
        markers=_step_markers(report),
    )


def latency_over_time_svg(report: dict[str, Any]) -> str:
    data, width = _timeline_series(report)
    series = []
    for name in (*STAGES, MANIFEST_SERIES):
        rows = data.get(name)
        if not rows:
            continue
        mid = [(t + width / 2, p50, p99) for t, _n, p50, p99 in rows]
        series.append(
            Series(f"{_LABELS[name]} p99", [(t, p99) for t, _, p99 in mid], _COLORS[name],
                   gap=width * 1.5)
        )  # fmt: skip
        series.append(
            Series(f"{_LABELS[name]} p50", [(t, p50) for t, p50, _ in mid], _COLORS[name],
                   dash="4,3", width=1.2, gap=width * 1.5)
        )  # fmt: skip
    return svg_plot(
        series,
        title=f"Latency over time: p99 (solid) and p50 (dashed) per {width:g} s",
        x=Axis("seconds since the run started", lo=0, hi=float(report["duration_s"])),
        y=Axis("ms (log scale)", log=True),
        width=1180,
        height=320,
        markers=_step_markers(report),
        legend_width=170,
    )
