"""The terminal summary of a run: one table of the steps, then a line per figure."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from simulator.metrics import STAGES
from simulator.report.wording import (
    connect_storms,
    ms,
    n_explained,
    run_size,
    transport,
)


def print_summary(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(steps_table(report))
    for step, text in connect_storms(report):
        console.print(f"connect storm ({step}): {text}, over {transport(report)}")
    # Faults and the like, below the table: a column of them would squeeze the figures.
    for s in report["steps"]:
        if s["notes"]:
            console.print(f"{s['name']}: {', '.join(s['notes'])}")
    console.print(n_explained(report, short=True))
    b = report["baseline"]
    if b.get("p99_ms") is not None:
        console.print(
            f"bare MQTT fan-out to {b['clients']} {b.get('subscriber') or 'aiomqtt'} "
            f"subscribers (the floor): p99 {b['p99_ms']:.0f} ms, max {b['max_ms']:.0f} ms; "
            f"notified p99 / floor p99 = {b['notified_p99_ratio']}"
        )
    a = b.get("aiomqtt") or {}
    if a.get("p99_ms") is not None:
        console.print(
            f"  beside it, aiomqtt iterator subscribers: p99 {a['p99_ms']:.0f} ms, "
            f"max {a['max_ms']:.0f} ms; notified p99 / that p99 = {a['notified_p99_ratio']}"
        )
    d = b.get("download") or {}
    if d.get("p99_ms") is not None:
        console.print(
            f"bare fan-out + one manifest GET per subscriber (the download floor): "
            f"{d['received']} downloaded, {d.get('failed', 0)} failed; p99 {d['p99_ms']:.0f} ms, "
            f"max {d['max_ms']:.0f} ms; cached p99 / download floor p99 = "
            f"{d['cached_p99_ratio']}"
        )
        if d.get("notified_p99_ms") is not None:
            console.print(
                f"  its subscribers were notified (while the others downloaded) p99 "
                f"{d['notified_p99_ms']:.0f} ms; notified p99 / that p99 = "
                f"{d['notified_p99_ratio']}"
            )
    m = report.get("manifest_requests")
    if m and m["count"]:
        console.print(
            f"manifest GET: {m['count']} requests, {m['failed']} failed, busiest second "
            f"{m['peak_per_s']:.0f}; p50 {ms(m['p50_ms'])} ms, p95 {ms(m['p95_ms'])} ms, "
            f"p99 {ms(m['p99_ms'])} ms"
        )
    e = report.get("errors")
    if e:
        n_refused = e.get("subscriptions_refused", 0)
        refused = f"{n_refused} subscriptions refused (retried), " if n_refused else ""
        console.print(
            f"errors and retries: {e['manifest_requests_failed']} failed manifest requests, "
            f"{e['fetch_rounds_failed']} failed fetch rounds, {e['connection_failures']} MQTT "
            f"connection failures, {refused}{e['reconnects']} reconnects, {e['messages_stale']} stale "
            f"or duplicate, {e['messages_invalid']} invalid and "
            f"{e.get('messages_signature_refused', 0)} unsigned or badly signed messages ignored, "
            f"{e['admin_retries']} admin calls retried"
        )
    tp = report["throughput"]
    machine = report.get("machine") or {}
    console.print(
        f"run: {report['duration_s']:.1f} s, {tp['deliveries']} deliveries "
        f"({tp['deliveries_per_s']:.0f}/s, busiest second "
        f"{tp.get('peak_deliveries_per_s', 0):.0f}); seed {report['seed']}, agent cache "
        f"{report.get('agent_cache', 'memory')}, state "
        f"{'signed and verified' if report.get('state_signed') else 'unsigned'}; "
        f"Python {machine.get('python', '?')} on "
        f"{machine.get('cpus', '?')} CPUs"
    )
    _print_processes_and_verdict(report, console)


def _print_processes_and_verdict(report: dict[str, Any], console: Console) -> None:
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


def steps_table(report: dict[str, Any]) -> Table:
    """Each step's clients in sync and its stage latencies, then all changes together."""
    t = Table(title=f"{report['scenario']}: {run_size(report)}")
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
    return t
