"""The run's report: a terminal summary, `report.json` (documented in docs/simulator.md) and
a self-contained `report.html` with inline SVG plots (no plotting dependency, no network).

`report.html` is drawn from `report.json` alone, so a report can be re-rendered or inspected
without the run."""

from __future__ import annotations

import html
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.fleetstats import MANIFEST_FAILED_SERIES, MANIFEST_SERIES
from simulator.metrics import STAGES, convergence_curve
from simulator.results import RunResult, curve_of

MAX_LISTED_MISMATCHES = 1000

TIMELINE_BUCKETS = 150
"""About this many buckets across the run in the over-time charts."""

_NICE_WIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _ratio(a: Any, b: Any) -> float | None:
    if not a or not b:
        return None
    return round(float(a) / float(b), 3)


def bucket_width(duration_s: float) -> float:
    """The over-time charts' bucket: the smallest round width giving at most
    `TIMELINE_BUCKETS` buckets over the run."""
    for w in _NICE_WIDTHS:
        if duration_s / w <= TIMELINE_BUCKETS:
            return w
    return _NICE_WIDTHS[-1]


def build_report(r: RunResult) -> dict[str, Any]:
    stages = r.stages.summary()
    steps = []
    for s in r.steps:
        # A client whose convergence time is after the step started accepted a message of the
        # step (or started during it); the others already matched the oracle.
        reached = [o for o in s.offsets if o > 0]
        steps.append(
            {
                "name": s.name,
                "revisions": s.revisions,
                "started_s": round(s.started_at - r.started_at, 3),
                "duration_s": round(s.duration_s, 3),
                "online_clients": s.online,
                "converged": len(s.offsets),
                "unconverged": s.unconverged,
                "reached": len(reached) + s.unconverged,
                "converged_p99_s": round(sorted(s.offsets)[int(0.99 * (len(s.offsets) - 1))], 3)
                if s.offsets
                else None,
                "notes": s.notes,
                "stages": s.stages.summary(),
                "convergence": [[t, round(f, 4)] for t, f in curve_of(s)],
                "reached_convergence": [
                    [t, round(f, 4)]
                    for t, f in convergence_curve(reached, len(reached) + s.unconverged)
                ],
            }
        )
    notified = stages.get("notified", {})
    fleet = r.fleet
    deliveries = sum(int(v.get("count", 0)) for v in stages.values())
    width = bucket_width(r.duration_s)
    series = [*STAGES, MANIFEST_SERIES, MANIFEST_FAILED_SERIES]
    return {
        "clients": r.options.clients,
        "scenario": r.scenario.name,
        "description": r.scenario.description.strip(),
        "seed": r.options.seed,
        "workers": r.workers,
        "agent_cache": r.options.cache or r.scenario.cache,
        "mismatches": len(r.mismatches),
        "mismatch_list": r.mismatches[:MAX_LISTED_MISMATCHES],
        "server_disagreements": r.server_disagreements,
        "stages": stages,
        "cdf": {
            **{
                s: [[round(ms, 3), share] for ms, share in h.cdf()]
                for s, h in r.stages.stages.items()
                if h.count
            },
            "baseline": [[round(ms, 3), share] for ms, share in r.baseline.get("cdf", [])],
        },
        "baseline": {
            "clients": r.baseline.get("clients"),
            "received": r.baseline.get("received"),
            "p50_ms": r.baseline.get("p50_ms"),
            "p95_ms": r.baseline.get("p95_ms"),
            "p99_ms": r.baseline.get("p99_ms"),
            "max_ms": r.baseline.get("max_ms"),
            "notified_p99_ratio": _ratio(notified.get("p99_ms"), r.baseline.get("p99_ms")),
        },
        "throughput": {
            "deliveries": deliveries,
            "deliveries_per_s": round(deliveries / max(r.duration_s, 1e-9), 1),
            "peak_deliveries_per_s": fleet.timeline.peak_rate(*STAGES),
            "messages_accepted": fleet.messages.get("accepted", 0),
        },
        "manifest_requests": {
            # Latency of the answered requests: a refused connection says nothing of it.
            **fleet.requests.summary(),
            "count": fleet.all_requests,
            "answered": fleet.requests.count,
            "failed": fleet.failed_requests,
            "answers": dict(sorted(fleet.answers.items())),
            "peak_per_s": fleet.timeline.peak_rate(MANIFEST_SERIES, MANIFEST_FAILED_SERIES),
        },
        "errors": {
            "manifest_requests_failed": fleet.failed_requests,
            "fetch_rounds_failed": fleet.events.get("fetch_failed", 0),
            "connection_failures": fleet.events.get("disconnected", 0),
            "reconnects": fleet.reconnects,
            "messages_stale": fleet.messages.get("stale", 0),
            "messages_invalid": fleet.messages.get("invalid", 0),
            "admin_retries": r.admin_retries,
            "unconverged": sum(s.unconverged for s in r.steps),
        },
        "timeline": {
            "bucket_s": width,
            "series": {
                s: fleet.timeline.buckets(s, r.started_at, width)
                for s in series
                if fleet.timeline.count(s)
            },
        },
        "processes": r.processes,
        "rss_per_client_kb": round(
            sum(p["rss_max_kb"] for p in r.processes if "worker" in p["role"])
            / max(1, r.options.clients),
            1,
        ),
        "steps": steps,
        "started_at": r.started_at,
        "duration_s": round(r.duration_s, 3),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }


# -- terminal --------------------------------------------------------------------------------


def deliveries_per_client_at_connect(report: dict[str, Any]) -> float | None:
    """Retained revisions each client received at its start, on average (the connect row's
    notified n over its clients)."""
    for s in report["steps"]:
        if s["name"] == "connect" and s["online_clients"]:
            n = (s["stages"].get("notified") or {}).get("count", 0)
            return round(n / s["online_clients"], 1)
    return None


def n_explained(report: dict[str, Any], short: bool = False) -> str:
    """What the n of a stage counts, in one paragraph (terminal and HTML say the same)."""
    per_client = deliveries_per_client_at_connect(report)
    if short:
        return (
            "n: deliveries, one per client and change; cached and applied only where the "
            "client had to download and install (clients that already held the manifest "
            "count nothing)"
            + (
                f"; connect: from each client's start, one per retained revision "
                f"({per_client:g} per client)"
                if per_client is not None
                else ""
            )
            + ". in sync: online clients matching the oracle when the step ended."
        )
    text = (
        "n counts deliveries, one per client and change: notified = the client accepted the "
        "change's message; cached = it downloaded and verified a manifest the change made it "
        "need (clients that already held it from an earlier step, or whose change needs "
        "none, count nothing); applied = a launch installed or removed it."
    )
    if per_client is not None:
        text += (
            " connect is measured from each client's start, once per retained revision it "
            f"received ({per_client:g} per client here)."
        )
    return text


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{report['scenario']}: {_run_size(report)}")
    t.add_column("step")
    t.add_column("in sync", justify="right")
    for stage in STAGES:
        t.add_column(f"{stage}\np50/p99 ms", justify="right")

    def cell(st: dict[str, Any], stage: str) -> str:
        v = st.get(stage) or {}
        if not v.get("count"):
            return "-"
        return f"{v['p50_ms']:.0f} / {v['p99_ms']:.0f}\nn={v['count']}"

    for s in report["steps"]:
        t.add_row(
            s["name"],
            f"{s['converged']}/{s['online_clients']}",
            *(cell(s["stages"], st) for st in STAGES),
        )
    t.add_section()
    t.add_row(
        "all changes",
        "",
        *(cell(report["stages"], st) for st in STAGES),
    )
    console.print(t)
    # Faults and the like, below the table: a column of them would squeeze the figures.
    for s in report["steps"]:
        if s["notes"]:
            console.print(f"{s['name']}: {', '.join(s['notes'])}")
    console.print(n_explained(report, short=True))
    b = report["baseline"]
    if b.get("p99_ms") is not None:
        console.print(
            f"bare MQTT fan-out to {b['clients']} subscribers: p99 {b['p99_ms']:.0f} ms, "
            f"max {b['max_ms']:.0f} ms; notified p99 / baseline p99 = {b['notified_p99_ratio']}"
        )
    m = report.get("manifest_requests")
    if m and m["count"]:
        console.print(
            f"manifest GET: {m['count']} requests, {m['failed']} failed, busiest second "
            f"{m['peak_per_s']:.0f}; p50 {_ms(m['p50_ms'])} ms, p95 {_ms(m['p95_ms'])} ms, "
            f"p99 {_ms(m['p99_ms'])} ms"
        )
    e = report.get("errors")
    if e:
        console.print(
            f"errors and retries: {e['manifest_requests_failed']} failed manifest requests, "
            f"{e['fetch_rounds_failed']} failed fetch rounds, {e['connection_failures']} MQTT "
            f"connection failures, {e['reconnects']} reconnects, {e['messages_stale']} stale "
            f"or duplicate and {e['messages_invalid']} invalid messages ignored, "
            f"{e['admin_retries']} admin calls retried"
        )
    tp = report["throughput"]
    machine = report.get("machine") or {}
    console.print(
        f"run: {report['duration_s']:.1f} s, {tp['deliveries']} deliveries "
        f"({tp['deliveries_per_s']:.0f}/s, busiest second "
        f"{tp.get('peak_deliveries_per_s', 0):.0f}); seed {report['seed']}, agent cache "
        f"{report.get('agent_cache', 'memory')}; Python {machine.get('python', '?')} on "
        f"{machine.get('cpus', '?')} CPUs"
    )
    procs = ", ".join(
        f"{p['role']} {p['cpu_s']:.1f} s CPU {p['rss_max_kb'] // 1024} MiB"
        for p in report["processes"]
    )
    console.print(f"processes: {procs}")
    console.print(
        f"agent cache {report.get('agent_cache', 'memory')}: peak worker RSS per client "
        f"{report['rss_per_client_kb']:.0f} KB"
    )
    if report["mismatches"]:
        console.print(f"[bold red]{report['mismatches']} mismatches with the oracle[/]")
        for mm in report["mismatch_list"][:20]:
            console.print(
                f"  {mm['checkpoint']}: {mm['client']} ({mm['user']}): {'; '.join(mm['diff'])}"
            )
    else:
        console.print("[bold green]0 mismatches:[/] every client matches the oracle")
    for d in report["server_disagreements"]:
        console.print(f"[yellow]server and oracle disagree:[/] {d}")


def _run_size(report: dict[str, Any]) -> str:
    workers = report["workers"]
    return f"{report['clients']} clients, {workers} worker{'' if workers == 1 else 's'}"


def _machine(report: dict[str, Any]) -> str:
    m = report.get("machine") or {}
    return f"Python {m.get('python', '?')}, {m.get('cpus', '?')} CPUs, {m.get('platform', '?')}"


def _ms(value: Any) -> str:
    """A latency as people read it: 2,152 / 57.3 / 4.21."""
    if value is None:
        return "–"
    v = float(value)
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# -- axes and plots --------------------------------------------------------------------------


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

    def axis_ticks(a: Axis, values: list[float]) -> list[float]:
        lo = a.lo if a.lo is not None else min(values)
        hi = a.hi if a.hi is not None else max(values)
        if a.ticks is not None:
            return a.ticks(lo, hi)
        return log_ticks(lo, hi) if a.log else linear_ticks(lo, hi)

    xt, yt = axis_ticks(x, xs), axis_ticks(y, ys)

    def scale(a: Axis, ticks: list[float], v: float, size: float) -> float:
        lo, hi = ticks[0], ticks[-1]
        if a.log:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, ticks[0]))
        return (v - lo) / ((hi - lo) or 1.0) * size

    def px(v: float) -> float:
        return left + scale(x, xt, min(max(v, xt[0]), xt[-1]), w)

    def py(v: float) -> float:
        return top + h - scale(y, yt, min(max(v, yt[0]), yt[-1]), h)

    out.append(
        f'<rect class="plot" x="{left}" y="{top}" width="{w}" height="{h}" fill="#fff" '
        'stroke="#bbb"/>'
    )
    y_labels = labelled(yt, y.log, h, 16)
    x_labels = labelled(xt, x.log, w, 34)
    for v in yt:
        yy = _fmt_attr(py(v))
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{yy}" y2="{yy}" stroke="#eee"/>')
        if v not in y_labels:
            continue
        out.append(
            f'<text class="ytick" x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end" '
            'font-size="11">'
            f"{esc(y.fmt(v))}</text>"
        )
    for v in xt:
        xx = _fmt_attr(px(v))
        out.append(f'<line x1="{xx}" x2="{xx}" y1="{top}" y2="{top + h}" stroke="#eee"/>')
        if v not in x_labels:
            continue
        out.append(
            f'<text class="xtick" x="{xx}" y="{top + h + 16}" text-anchor="middle" '
            'font-size="11">'
            f"{esc(x.fmt(v))}</text>"
        )
    for i, (mx, label) in enumerate(markers):
        if not xt[0] <= mx <= xt[-1]:
            continue
        xx = _fmt_attr(px(mx))
        out.append(
            f'<line x1="{xx}" x2="{xx}" y1="{top}" y2="{top + h}" stroke="#999" '
            'stroke-dasharray="3,3"/>'
        )
        out.append(
            f'<text x="{px(mx) + 3:.1f}" y="{top + 11 + 12 * (i % 2)}" font-size="10" '
            f'fill="#555">{esc(label)}</text>'
        )
    out.append(
        f'<text x="{left + w / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="12">'
        f"{esc(x.label)}</text>"
    )
    out.append(
        f'<text x="14" y="{top + h / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {top + h / 2:.1f})">{esc(y.label)}</text>'
    )
    for s in drawn:
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        for run in _runs(s):
            if len(run) == 1:
                out.append(
                    f'<circle cx="{px(run[0][0]):.1f}" cy="{py(run[0][1]):.1f}" '
                    f'r="{s.width + 0.5}" fill="{s.color}"/>'
                )
                continue
            pts = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in run)
            out.append(
                f'<polyline fill="none" stroke="{s.color}" stroke-width="{s.width}"'
                f'{dash} stroke-linejoin="round" points="{pts}"/>'
            )
    row = 0
    out.append('<g class="legend">')
    for s in drawn:
        if not s.legend:
            continue
        lx, ly = left + w + 14, top + 8 + 18 * row
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{ly}" y2="{ly}" stroke="{s.color}" '
            f'stroke-width="{s.width + 1}"{dash}/>'
        )
        out.append(f'<text x="{lx + 28}" y="{ly + 4}" font-size="12">{esc(s.name)}</text>')
        row += 1
    out.append("</g></svg>")
    return "".join(out)


def _runs(s: Series) -> list[list[tuple[float, float]]]:
    """The series' points split where they leave a gap."""
    runs: list[list[tuple[float, float]]] = []
    for p in s.points:
        if runs and (s.gap is None or p[0] - runs[-1][-1][0] <= s.gap):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _percent(v: float) -> str:
    return f"{v * 100:.0f}%"


def _share_ticks(lo: float, hi: float) -> list[float]:
    return [0.0, 0.25, 0.5, 0.75, 1.0]


# -- HTML sections ---------------------------------------------------------------------------


def _cdf_svg(report: dict[str, Any]) -> str:
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
        y=Axis("share of deliveries", lo=0, hi=1, ticks=_share_ticks, fmt=_percent),
        width=700,
        height=330,
        legend_width=140,
    )


def _convergence_panels(report: dict[str, Any]) -> str:
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
                y=Axis("converged", lo=0, hi=1, ticks=_share_ticks, fmt=_percent),
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


def _rate_svg(report: dict[str, Any]) -> str:
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


def _latency_over_time_svg(report: dict[str, Any]) -> str:
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


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}">' + (f"<tr>{th}</tr>" if head else "") + f"{body}</table>"


def _latency_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in STAGES:
        v = report["stages"].get(s) or {}
        if v.get("count"):
            rows.append(
                [s, *(_ms(v.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
                 f"{v['count']:,}"]
            )  # fmt: skip
        else:
            rows.append([s, "–", "–", "–", "–", "0"])
    b = report["baseline"]
    if b.get("p99_ms") is not None:
        rows.append(
            ["bare MQTT fan-out",
             *(_ms(b.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
             f"{b['received']:,}"]
        )  # fmt: skip
    m = report.get("manifest_requests") or {}
    if m.get("count"):
        rows.append(
            ["manifest GET",
             *(_ms(m.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
             f"{m.get('answered', m['count']):,}"]
        )  # fmt: skip
    return rows


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    tp = report["throughput"]
    m = report.get("manifest_requests") or {}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report["started_at"]))
    rows = [
        ["scenario", report["scenario"]],
        ["clients / workers", f"{report['clients']:,} / {report['workers']}"],
        ["seed", str(report["seed"])],
        ["agent cache", str(report.get("agent_cache", "memory"))],
        ["started", started],
        ["duration", f"{report['duration_s']:.1f} s"],
        [
            "deliveries",
            f"{tp['deliveries']:,} ({tp['deliveries_per_s']:,.0f}/s over the run, "
            f"{tp.get('peak_deliveries_per_s', 0):,.0f} in the busiest second)",
        ],
        ["state messages accepted", f"{tp.get('messages_accepted', 0):,}"],
    ]
    if m:
        rows.append(
            [
                "manifest requests",
                f"{m.get('count', 0):,} ({m.get('failed', 0):,} failed, "
                f"{m.get('peak_per_s', 0):,.0f} in the busiest second)",
            ]
        )
    rows.append(["machine", _machine(report)])
    return rows


def _errors_rows(report: dict[str, Any]) -> list[list[str]]:
    e = report.get("errors") or {}
    m = report.get("manifest_requests") or {}
    answers = ", ".join(f"{k}: {v:,}" for k, v in (m.get("answers") or {}).items() if k != "200")
    rows = [
        ["manifest requests failed", e.get("manifest_requests_failed", 0),
         f"answers other than 200: {answers or 'none'}; the agent retries with backoff"],
        ["fetch rounds failed", e.get("fetch_rounds_failed", 0),
         "all attempts of a round failed; the agent tries again 5–60 s later"],
        ["MQTT connection failures", e.get("connection_failures", 0),
         "connect refused or dropped, or the link lost (not agents stopped on purpose)"],
        ["MQTT reconnects", e.get("reconnects", 0), "connected again after a failure"],
        ["stale or duplicate messages ignored", e.get("messages_stale", 0),
         "older or equal revision than held (re-sent, reordered, or re-delivered)"],
        ["invalid messages refused", e.get("messages_invalid", 0), "failed to parse or validate"],
        ["admin API calls retried", e.get("admin_retries", 0),
         "server unreachable (e.g. while it restarts)"],
        ["clients not in sync at a step's end", e.get("unconverged", 0),
         "summed over steps; see the step table"],
        ["mismatches with the oracle", report["mismatches"], "at checkpoints"],
    ]  # fmt: skip
    return [[str(c) if not isinstance(c, int) else f"{c:,}" for c in r] for r in rows]


def _step_rows(report: dict[str, Any]) -> str:
    rows = []
    for s in report["steps"]:
        cells = [
            s["name"],
            f"{s.get('started_s', 0):.1f}",
            f"{s['duration_s']:.1f}",
            f"{s['reached']:,}" if "reached" in s else "",
            f"{s['converged']:,}/{s['online_clients']:,}",
        ]
        for st in STAGES:
            v = s["stages"].get(st) or {}
            if v.get("count"):
                cells += [_ms(v.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
                cells.append(f"{v['count']:,}")
            else:
                cells += ["–", "–", "–", "–", "0"]
        cells.append(", ".join(s["notes"]))
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    stage_head = "".join(f'<th class="stage" colspan="5">{st}</th>' for st in STAGES)
    sub = "".join(
        '<th class="stage">p50</th><th>p95</th><th>p99</th><th>max</th><th>n</th>' for _ in STAGES
    )
    return (
        '<table class="steps"><tr><th rowspan="2">step</th><th rowspan="2">started s</th>'
        '<th rowspan="2">duration s</th><th rowspan="2">reached</th>'
        f'<th rowspan="2">in sync</th>{stage_head}<th rowspan="2">notes</th></tr>'
        f"<tr>{sub}</tr>{''.join(rows)}</table>"
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1340px; }
h1 { margin-bottom: 0.2em; } h2 { margin: 1.2em 0 0.4em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; text-align: center; white-space: nowrap; }
td:first-child { text-align: left; white-space: nowrap; }
table.steps td:nth-child(5n+6), table.steps th.stage { border-left: 2px solid #999; }
table.kv td:nth-child(2) { text-align: left; }
table.errors td:last-child, table.errors th:last-child { text-align: left; width: 24em; }
table.steps td, table.steps th { padding: 3px 5px; }
table.steps td:last-child { text-align: left; min-width: 10em; }
.ok { color: #2a7; font-weight: bold; } .bad { color: #c22; font-weight: bold; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.col { max-width: 560px; }
.grid { display: flex; flex-wrap: wrap; gap: 0.5em; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
svg { max-width: 100%; height: auto; }
"""


def render_html(report: dict[str, Any]) -> str:
    esc = html.escape
    mism = "".join(
        f"<li>{esc(m['checkpoint'])}: {esc(m['client'])} ({esc(m['user'])}): "
        f"{esc('; '.join(m['diff']))}</li>"
        for m in report["mismatch_list"][:200]
    )
    verdict = (
        '<p class="ok">0 mismatches: every client matches the oracle.</p>'
        if not report["mismatches"]
        else f'<p class="bad">{report["mismatches"]} mismatches with the oracle</p><ul>{mism}</ul>'
    )
    disagreements = "".join(
        f'<p class="bad">server and oracle disagree: {esc(d)}</p>'
        for d in report["server_disagreements"]
    )
    b = report["baseline"]
    ratio = (
        f"<p>notified p99 / bare fan-out p99 = <b>{b.get('notified_p99_ratio')}</b>. The bare "
        "fan-out is one QoS 1 publish to one plain MQTT subscriber per client, on the same "
        "broker from the same worker processes, before the agents connect: the floor.</p>"
        if b.get("p99_ms") is not None
        else "<p>Bare fan-out not measured (--no-baseline).</p>"
    )
    procs = _table(
        ["role", "pid", "CPU s", "max RSS MiB"],
        [
            [p["role"], p.get("pid", ""), f"{p['cpu_s']:.1f}", f"{p['rss_max_kb'] / 1024:.0f}"]
            for p in report["processes"]
        ],
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>addin-sim: {esc(report["scenario"])}</title>
<style>{_CSS}</style></head><body>
<h1>{esc(report["scenario"])}: {_run_size(report)}</h1>
<p>{esc(report["description"])}</p>
{verdict}{disagreements}
<div class="row">
<div><h2>Run</h2>{_table([], _summary_rows(report), "kv")}</div>
<div><h2>Errors and retries</h2>
{_table(["", "count", "what it counts"], _errors_rows(report), "errors")}</div>
</div>
<h2>Latency</h2>
<div class="row">
<div class="col">
{_table(["", "p50 ms", "p95 ms", "p99 ms", "max ms", "n"], _latency_rows(report))}
{ratio}
<p class="note">Stages are measured from the commit of each change to the client: notified =
its agent accepted the message, cached = it verified the manifest, applied = a launch applied
it (so it includes the time until a user started the app). n counts deliveries, one per client
and change (see the step table). Manifest GET: from a request's connection slot to its answer,
as the agents' shared connection pool saw it.</p></div>
{_cdf_svg(report)}
</div>
<h2>Over time</h2>
{_rate_svg(report)}
{_latency_over_time_svg(report)}
<h2>Convergence per step</h2>
<p class="note">Share of the clients a step reached (accepted one of its messages, or started
during it) whose entitlements equal the oracle's, over time since the step started; each step
on its own scale.</p>
{_convergence_panels(report)}
<h2>Steps</h2>
{_step_rows(report)}
<p class="note">reached: clients that accepted a message of the step (or started during it).
in sync: online clients whose entitlements equal the oracle's when the step ended; clients the
step did not reach were already in sync. {esc(n_explained(report))} Latencies in ms.</p>
<h2>Processes</h2>
{procs}
</body></html>
"""


_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON, with each innermost list of numbers (a plot point, a timeline bucket)
    on one line: thousands of them would otherwise take a line per number."""
    text = json.dumps(report, indent=2)
    return _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text
    )


def write_reports(r: RunResult, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(r)
    (directory / "report.json").write_text(to_json(report) + "\n")
    (directory / "report.html").write_text(render_html(report))
    return report
