"""`addin-sim compare`: several runs' report.json side by side, and how cost grows with the
client count (a table, and a page of inline SVG plots drawn with `svg`, like report.html)."""

from __future__ import annotations

import html
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from simulator.report.svg import Axis, Series, svg_plot


class CompareError(ValueError):
    """A report that cannot be compared; the message is one line naming the file."""


@dataclass
class RunFigures:
    """One run's figures, as the comparison shows them."""

    source: str
    clients: int
    cache: str
    cpu_us_per_client: float | None
    kb_per_client: float | None
    main_step: str | None
    notified_p99_ms: float | None
    cached_p99_ms: float | None
    floor: str | None
    floor_p99_ms: float | None
    ratio: float | None
    download_p99_ms: float | None = None
    """The download floor: the bare fan-out plus one manifest GET per client."""
    cached_ratio: float | None = None
    """The main step's cached p99 over the download floor's p99."""
    download_notify_p99_ms: float | None = None
    """When the download floor's subscribers were notified, while the others downloaded."""
    download_notify_ratio: float | None = None
    """The main step's notify p99 over `download_notify_p99_ms`: what the agent adds to a
    notification when every client downloads as it is notified."""
    runs: int = 1
    """How many runs this row is the median of (`median`)."""
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    """For a median of several runs: each figure's (lowest, highest) over them."""


MEDIAN_FIGURES = (
    "cpu_us_per_client",
    "kb_per_client",
    "notified_p99_ms",
    "cached_p99_ms",
    "floor_p99_ms",
    "ratio",
    "download_p99_ms",
    "cached_ratio",
    "download_notify_p99_ms",
    "download_notify_ratio",
)
"""The figures a median row takes the median of (each ratio is the median of the runs' own
ratios, each measured within its run)."""


def load_report(path: Path) -> dict[str, Any]:
    """report.json at `path` (or in the directory `path`)."""
    file = path / "report.json" if path.is_dir() else path
    try:
        report = json.loads(file.read_text())
    except FileNotFoundError:
        raise CompareError(f"{file}: no such file (a report.json of `addin-sim run`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"{file}: cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise CompareError(f"{file}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(report, dict) or not isinstance(report.get("clients"), int):
        raise CompareError(f"{file}: not a report.json of `addin-sim run` (no client count)")
    return report


def figures(report: dict[str, Any], source: str) -> RunFigures:
    """The compared figures of one report; a figure the run did not measure is None."""
    try:
        clients = int(report["clients"])
        workers = [p for p in report.get("processes", []) if "worker" in str(p.get("role"))]
        cpu_s = sum(float(p["cpu_s"]) for p in workers)
        step = _main_step(report.get("steps", []))
        stages = step["stages"] if step else {}
        baseline = report.get("baseline") or {}
        download = baseline.get("download") or {}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        # The caller names the file: `source` is the run's name, not necessarily a file.
        raise CompareError(f"not a report.json of `addin-sim run` ({e})") from None
    return RunFigures(
        source=source,
        clients=clients,
        cache=str(report.get("agent_cache", "?")),
        cpu_us_per_client=round(cpu_s * 1e6 / clients) if workers and clients else None,
        kb_per_client=report.get("rss_per_client_kb"),
        main_step=step["name"] if step else None,
        notified_p99_ms=(stages.get("notified") or {}).get("p99_ms"),
        cached_p99_ms=(stages.get("cached") or {}).get("p99_ms"),
        # Reports from before the paho floor have no "subscriber": theirs was aiomqtt.
        floor=baseline.get("subscriber") or ("aiomqtt" if baseline.get("p99_ms") else None),
        floor_p99_ms=baseline.get("p99_ms"),
        ratio=_ratio((stages.get("notified") or {}).get("p99_ms"), baseline.get("p99_ms")),
        download_p99_ms=download.get("p99_ms"),
        cached_ratio=_ratio((stages.get("cached") or {}).get("p99_ms"), download.get("p99_ms")),
        download_notify_p99_ms=download.get("notified_p99_ms"),
        download_notify_ratio=_ratio(
            (stages.get("notified") or {}).get("p99_ms"), download.get("notified_p99_ms")
        ),
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    # The main step's p99 over the floor, so that the row's own figures give it (the run's
    # summary divides the p99 over all its steps).
    return round(a / b, 2) if a and b else None


_RUN_STEPS = ("connect", "final-check")
"""Steps the run adds around the scenario's: a connect notifies every client of its state."""


def _main_step(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The scenario step that notified the most clients (in phased-rollout, `everyone`);
    steps that start clients (the run's connect, a connect storm) count only when there is
    no other."""

    def notified(s: dict[str, Any]) -> int:
        return int((s.get("stages", {}).get("notified") or {}).get("count", 0))

    changes = [s for s in steps if s["name"] not in _RUN_STEPS and not s.get("storm")]
    best = max(changes or steps, key=notified, default=None)
    return best if best is not None and notified(best) else None


def load_all(paths: Sequence[Path]) -> list[RunFigures]:
    """Every report's figures, in client-count order (stable for equal counts)."""
    runs = []
    for p in paths:
        report = load_report(p)
        try:
            # A run is named by its report directory, as `run --report DIR` named it.
            runs.append(figures(report, str(p.parent if p.name == "report.json" else p)))
        except CompareError as e:
            raise CompareError(f"{p}: {e}") from None
    return sorted(runs, key=lambda r: r.clients)


def median(runs: Sequence[RunFigures]) -> list[RunFigures]:
    """One row per client count, cache mode and main step: repeats of one configuration
    become their median, with each figure's range, in client-count order."""
    groups: dict[tuple[int, str, str | None], list[RunFigures]] = {}
    for r in runs:
        groups.setdefault((r.clients, r.cache, r.main_step), []).append(r)
    out = []
    for rs in groups.values():
        if len(rs) == 1:
            out.append(rs[0])
            continue
        values: dict[str, float | None] = {}
        ranges: dict[str, tuple[float, float]] = {}
        for name in MEDIAN_FIGURES:
            got = [float(v) for r in rs if (v := getattr(r, name)) is not None]
            values[name] = round(statistics.median(got), 2) if got else None
            if got:
                ranges[name] = (min(got), max(got))
        floors = {r.floor for r in rs if r.floor}
        out.append(
            replace(
                rs[0],
                source=f"{rs[0].source} +{len(rs) - 1}",
                floor=" / ".join(sorted(floors)) or None,
                runs=len(rs),
                ranges=ranges,
                **values,  # type: ignore[arg-type]
            )
        )
    return sorted(out, key=lambda r: r.clients)


assert set(MEDIAN_FIGURES) <= {f.name for f in fields(RunFigures)}

COLUMNS = (
    "run",
    "clients",
    "cache",
    "CPU µs\n/client",
    "KB\n/client",
    "main step",
    "notify\np99 ms",
    "cached\np99 ms",
    "floor\np99 ms",
    "notify\n÷ floor",
    "download\nfloor p99 ms",
    "cached\n÷ download",
    "notify\n÷ notify\nin download",
)


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def rows(runs: Sequence[RunFigures]) -> list[list[str]]:
    """The table's cells; a median row's figures are followed by their range."""

    def cell(r: RunFigures, name: str, digits: int = 0) -> str:
        text = _num(getattr(r, name), digits)
        lo_hi = r.ranges.get(name)
        if lo_hi is None or lo_hi[0] == lo_hi[1]:
            return text
        return f"{text} ({_num(lo_hi[0], digits)}–{_num(lo_hi[1], digits)})"

    return [
        [
            r.source if r.runs == 1 else f"{r.source} (median of {r.runs})",
            f"{r.clients:,}",
            r.cache,
            cell(r, "cpu_us_per_client"),
            cell(r, "kb_per_client"),
            r.main_step or "-",
            cell(r, "notified_p99_ms"),
            cell(r, "cached_p99_ms"),
            f"{cell(r, 'floor_p99_ms')} ({r.floor})" if r.floor else "-",
            cell(r, "ratio", 2),
            cell(r, "download_p99_ms"),
            cell(r, "cached_ratio", 2),
            cell(r, "download_notify_ratio", 2),
        ]
        for r in runs
    ]


_COLORS = {
    "notify": "#1f77b4",
    "cached": "#2ca02c",
    "floor": "#555555",
    "download": "#ff7f0e",
}
_CACHE_DASH = ("", "6,3", "2,3", "10,3,2,3")
_CACHE_COLORS = ("#d62728", "#9467bd", "#8c564b", "#17becf")


def _points(runs: Sequence[RunFigures], attr: str) -> list[tuple[float, float]]:
    return [
        (float(r.clients), float(v)) for r in runs if (v := getattr(r, attr)) is not None and v > 0
    ]


def _by_cache(runs: Sequence[RunFigures]) -> dict[str, list[RunFigures]]:
    """Runs grouped by agent cache: a line joins runs of one cache mode only (two modes at one
    client count are two points, not a vertical line)."""
    groups: dict[str, list[RunFigures]] = {}
    for r in runs:
        groups.setdefault(r.cache, []).append(r)
    return groups


def render_html(runs: Sequence[RunFigures]) -> str:
    """A page with the table and the figures plotted against the client count: latency in one
    plot, CPU and memory per client in their own (each has its own unit); one line per figure
    and cache mode."""
    groups = _by_cache(runs)
    latency, cpu, rss = [], [], []
    for i, (cache, rs) in enumerate(groups.items()):
        dash, color = _CACHE_DASH[i % len(_CACHE_DASH)], _CACHE_COLORS[i % len(_CACHE_COLORS)]
        latency += [
            Series(
                f"notify p99 ({cache})", _points(rs, "notified_p99_ms"), _COLORS["notify"], dash
            ),
            Series(f"cached p99 ({cache})", _points(rs, "cached_p99_ms"), _COLORS["cached"], dash),
            Series(f"floor p99 ({cache})", _points(rs, "floor_p99_ms"), _COLORS["floor"], dash),
            Series(
                f"download floor p99 ({cache})",
                _points(rs, "download_p99_ms"),
                _COLORS["download"],
                dash,
            ),
        ]
        cpu.append(Series(cache, _points(rs, "cpu_us_per_client"), color))
        rss.append(Series(cache, _points(rs, "kb_per_client"), color))
    clients = Axis("clients")
    plots = [
        svg_plot(
            latency,
            title="p99 of the main step and the bare fan-out floors",
            x=clients,
            y=Axis("ms (log scale)", log=True),
            width=760,
            legend_width=230,
        ),
        svg_plot(
            cpu,
            title="workers' CPU per client",
            x=clients,
            y=Axis("µs per client", lo=0),
            width=460,
            legend_width=90,
        ),
        svg_plot(
            rss,
            title="peak worker RSS per client",
            x=clients,
            y=Axis("KB per client", lo=0),
            width=460,
            legend_width=90,
        ),
    ]
    esc = html.escape
    head = "".join(f"<th>{esc(c.replace(chr(10), ' '))}</th>" for c in COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows(runs)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>addin-sim compare</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}svg{{margin:6px}}</style>
</head><body>
<h1>addin-sim compare: {len(runs)} runs</h1>
<table><tr>{head}</tr>{body}</table>
<p>Main step: the scenario step that notified the most clients. CPU µs/client: the workers' CPU time
over the client count. notify ÷ floor: the main step's notify p99 over the bare fan-out p99
(the floor: paho callbacks; aiomqtt in reports made before it). cached ÷ download: the main
step's cached p99 over the download floor's p99 (the same bare fan-out, each subscriber then
GETting one manifest from the run's server). A row that is the median of several runs (same
client count, cache mode and main step) shows each figure's range after it; each ratio is the
median of the runs' own ratios.</p>
<div>{plots[0]}</div>
<div>{plots[1]}{plots[2]}</div>
</body></html>
"""
