"""The run's report: a terminal summary, `report.json` (documented in docs/simulator.md) and
a self-contained `report.html` with inline SVG plots (no plotting dependency, no network)."""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.coordinator import RunResult, curve_of
from simulator.metrics import STAGES, StageSet

MAX_LISTED_MISMATCHES = 1000


def _ratio(a: Any, b: Any) -> float | None:
    if not a or not b:
        return None
    return round(float(a) / float(b), 3)


def build_report(r: RunResult) -> dict[str, Any]:
    stages = r.stages.summary()
    steps = []
    for s in r.steps:
        steps.append(
            {
                "name": s.name,
                "revisions": s.revisions,
                "duration_s": round(s.duration_s, 3),
                "online_clients": s.online,
                "converged": len(s.offsets),
                "unconverged": s.unconverged,
                "converged_p99_s": round(sorted(s.offsets)[int(0.99 * (len(s.offsets) - 1))], 3)
                if s.offsets
                else None,
                "notes": s.notes,
                "stages": s.stages.summary(),
                "convergence": [[t, round(f, 4)] for t, f in curve_of(s)],
            }
        )
    notified = stages.get("notified", {})
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
        "baseline": {
            "clients": r.baseline.get("clients"),
            "received": r.baseline.get("received"),
            "p50_ms": r.baseline.get("p50_ms"),
            "p99_ms": r.baseline.get("p99_ms"),
            "max_ms": r.baseline.get("max_ms"),
            "notified_p99_ratio": _ratio(notified.get("p99_ms"), r.baseline.get("p99_ms")),
        },
        "throughput": {
            "deliveries": sum(int(v.get("count", 0)) for v in stages.values()),
            "deliveries_per_s": round(
                sum(int(v.get("count", 0)) for v in stages.values()) / max(r.duration_s, 1e-9), 1
            ),
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
            "cpus": __import__("os").cpu_count(),
        },
    }


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{report['scenario']}: {_run_size(report)}")
    t.add_column("step")
    t.add_column("converged", justify="right")
    for stage in STAGES:
        t.add_column(f"{stage} p50/p99 ms", justify="right")
    t.add_column("notes")

    def cell(st: dict[str, Any], stage: str) -> str:
        v = st.get(stage) or {}
        if not v.get("count"):
            return "-"
        return f"{v['p50_ms']:.0f} / {v['p99_ms']:.0f} (n={v['count']})"

    for s in report["steps"]:
        t.add_row(
            s["name"],
            f"{s['converged']}/{s['online_clients']}",
            *(cell(s["stages"], st) for st in STAGES),
            ", ".join(s["notes"]),
        )
    t.add_section()
    t.add_row("all changes", "", *(cell(report["stages"], st) for st in STAGES), "")
    console.print(t)
    b = report["baseline"]
    if b.get("p99_ms") is not None:
        console.print(
            f"bare MQTT fan-out to {b['clients']} subscribers: p99 {b['p99_ms']:.0f} ms, "
            f"max {b['max_ms']:.0f} ms; notified p99 / baseline p99 = {b['notified_p99_ratio']}"
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
        for m in report["mismatch_list"][:20]:
            console.print(
                f"  {m['checkpoint']}: {m['client']} ({m['user']}): {'; '.join(m['diff'])}"
            )
    else:
        console.print("[bold green]0 mismatches:[/] every client matches the oracle")
    for d in report["server_disagreements"]:
        console.print(f"[yellow]server and oracle disagree:[/] {d}")


# -- HTML ------------------------------------------------------------------------------------

_COLORS = {"notified": "#1f77b4", "cached": "#ff7f0e", "applied": "#2ca02c", "baseline": "#7f7f7f"}


def _svg_plot(
    series: dict[str, list[tuple[float, float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    width: int = 640,
    height: int = 320,
) -> str:
    import math

    pts = [p for s in series.values() for p in s]
    left, right, top, bottom = 60, 40, 30, 45
    w, h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    out.append(
        f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{html.escape(title)}</text>'
    )
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no data</text></svg>'
        )
        return "".join(out)

    def fx(x: float) -> float:
        return math.log10(max(x, 0.1)) if logx else x

    xs = [fx(p[0]) for p in pts]
    xmin, xmax = min(xs), max(xs)
    if xmax - xmin < 1e-9:
        xmax = xmin + 1
    ymax = max(1.0, max(p[1] for p in pts))

    def px(x: float) -> float:
        return left + (fx(x) - xmin) / (xmax - xmin) * w

    def py(y: float) -> float:
        return top + h - y / ymax * h

    out.append(f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>')
    for i in range(6):
        yv = ymax * i / 5
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{py(yv)}" y2="{py(yv)}" stroke="#eee"/>')
        out.append(
            f'<text x="{left - 5}" y="{py(yv) + 4}" text-anchor="end" font-size="10">{yv:.2f}</text>'
        )
    for i in range(6):
        xv = xmin + (xmax - xmin) * i / 5
        label = 10**xv if logx else xv
        xpix = left + (xv - xmin) / (xmax - xmin) * w
        out.append(f'<line x1="{xpix}" x2="{xpix}" y1="{top}" y2="{top + h}" stroke="#eee"/>')
        out.append(
            f'<text x="{xpix}" y="{top + h + 14}" text-anchor="middle" font-size="10">{_tick(label)}</text>'
        )
    out.append(
        f'<text x="{left + w / 2}" y="{height - 8}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="14" y="{top + h / 2}" text-anchor="middle" font-size="11" transform="rotate(-90 14 {top + h / 2})">{html.escape(ylabel)}</text>'
    )
    for i, (name, s) in enumerate(series.items()):
        if not s:
            continue
        color = _COLORS.get(
            name, ["#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"][i % 6]
        )
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        out.append(
            f'<rect x="{left + 10}" y="{top + 8 + 16 * i}" width="10" height="10" fill="{color}"/>'
        )
        out.append(
            f'<text x="{left + 25}" y="{top + 17 + 16 * i}" font-size="11">{html.escape(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _run_size(report: dict[str, Any]) -> str:
    workers = report["workers"]
    return f"{report['clients']} clients, {workers} worker{'' if workers == 1 else 's'}"


def _tick(value: float) -> str:
    """An axis label a person reads: 2710, not 2.71e+03."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _stage_cells(stage: dict[str, Any]) -> str:
    """p50, p99, max and count of one stage; dashes where the stage saw no event."""
    if not stage.get("count"):
        return "<td>–</td><td>–</td><td>–</td><td>0</td>"
    return "".join(f"<td>{stage.get(k, '–')}</td>" for k in ("p50_ms", "p99_ms", "max_ms", "count"))


def render_html(report: dict[str, Any], stages: StageSet) -> str:
    cdf = {s: stages.stages[s].cdf() for s in STAGES if s in stages.stages}
    cdf_svg = _svg_plot(
        cdf,
        title="Latency CDF per stage (all changes)",
        xlabel="ms after commit (log)",
        ylabel="share of deliveries",
        logx=True,
    )
    conv = {
        s["name"]: [(t, f) for t, f in s["convergence"]]
        for s in report["steps"]
        if s["convergence"] and s["name"] != "final-check"
    }
    conv_svg = _svg_plot(
        conv,
        title="Convergence per step",
        xlabel="seconds after the step started",
        ylabel="share of online clients converged",
    )
    rows = []
    for s in report["steps"]:
        cells = "".join(_stage_cells(s["stages"].get(st) or {}) for st in STAGES)
        rows.append(
            f"<tr><td>{html.escape(s['name'])}</td><td>{s['converged']}/{s['online_clients']}</td>"
            f"<td>{s['duration_s']}</td>{cells}<td>{html.escape(', '.join(s['notes']))}</td></tr>"
        )
    head = "".join(f'<th colspan="4">{st} (ms: p50, p99, max, n)</th>' for st in STAGES)
    mism = "".join(
        f"<li>{html.escape(m['checkpoint'])}: {html.escape(m['client'])} ({html.escape(m['user'])}): {html.escape('; '.join(m['diff']))}</li>"
        for m in report["mismatch_list"][:200]
    )
    b = report["baseline"]
    procs = "".join(
        f"<tr><td>{html.escape(p['role'])}</td><td>{p.get('pid', '')}</td><td>{p['cpu_s']}</td><td>{p['rss_max_kb']}</td></tr>"
        for p in report["processes"]
    )
    verdict = (
        '<p class="ok">0 mismatches: every client matches the oracle.</p>'
        if not report["mismatches"]
        else f'<p class="bad">{report["mismatches"]} mismatches with the oracle</p><ul>{mism}</ul>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>addin-sim: {html.escape(report["scenario"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
td:first-child {{ text-align: left; }}
.ok {{ color: #2a7; font-weight: bold; }} .bad {{ color: #c22; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(report["scenario"])}: {_run_size(report)}</h1>
<p>{html.escape(report["description"])}</p>
{verdict}
<p>Run took {report["duration_s"]} s. Bare MQTT fan-out on the same broker: p99 {b.get("p99_ms")} ms,
max {b.get("max_ms")} ms; notified p99 / baseline p99 = {b.get("notified_p99_ratio")}.</p>
{cdf_svg}
{conv_svg}
<h2>Steps</h2>
<table><tr><th>step</th><th>converged</th><th>duration s</th>{head}<th>notes</th></tr>{"".join(rows)}</table>
<h2>Processes</h2>
<table><tr><th>role</th><th>pid</th><th>CPU s</th><th>max RSS KiB</th></tr>{procs}</table>
</body></html>
"""


def write_reports(r: RunResult, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(r)
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.html").write_text(render_html(report, r.stages))
    return report
