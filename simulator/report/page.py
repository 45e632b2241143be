"""report.html: a self-contained page (inline CSS and SVG) drawn from report.json alone, so a
report can be re-rendered or inspected without the run."""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from simulator.metrics import STAGES
from simulator.report.charts import cdf_svg, convergence_panels, latency_over_time_svg, rate_svg
from simulator.report.wording import (
    connect_storms,
    machine,
    ms,
    n_explained,
    run_size,
    transport,
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
                [s, *(ms(v.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
                 f"{v['count']:,}"]
            )  # fmt: skip
        else:
            rows.append([s, "–", "–", "–", "–", "0"])
    b = report["baseline"]
    for name, fig in (
        (f"bare MQTT fan-out ({b.get('subscriber') or 'aiomqtt'}, the floor)", b),
        ("bare MQTT fan-out (aiomqtt)", b.get("aiomqtt") or {}),
        ("bare fan-out + manifest GET (the download floor)", b.get("download") or {}),
    ):
        if fig.get("p99_ms") is not None:
            rows.append(
                [name,
                 *(ms(fig.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
                 f"{fig['received']:,}"]
            )  # fmt: skip
    m = report.get("manifest_requests") or {}
    if m.get("count"):
        rows.append(
            ["manifest GET",
             *(ms(m.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")),
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
        [
            "state payloads",
            "signed, verified by every agent" if report.get("state_signed") else "unsigned",
        ],
        ["transport", transport(report)],
        *([f"connect storm ({step})", text] for step, text in connect_storms(report)),
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
    rows.append(["machine", machine(report)])
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
        ["MQTT subscriptions refused", e.get("subscriptions_refused", 0),
         "a SUBACK failure (NATS: a JetStream consumer not made in time); retried"],
        ["MQTT reconnects", e.get("reconnects", 0), "connected again after a failure"],
        ["stale or duplicate messages ignored", e.get("messages_stale", 0),
         "older or equal revision than held (re-sent, reordered, or re-delivered)"],
        ["invalid messages refused", e.get("messages_invalid", 0), "failed to parse or validate"],
        ["messages refused for their signature", e.get("messages_signature_refused", 0),
         "unsigned, or not signed by the server's key for that topic"],
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
                cells += [ms(v.get(k)) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]
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
        f"<p>notified p99 / bare fan-out p99 = <b>{b.get('notified_p99_ratio')}</b> against "
        f"the {esc(b.get('subscriber') or 'aiomqtt')} floor"
        + (
            f" ({b['aiomqtt']['notified_p99_ratio']} against aiomqtt's message iterator)"
            if (b.get("aiomqtt") or {}).get("p99_ms") is not None
            else ""
        )
        + ". The bare fan-out is one QoS 1 publish to one plain MQTT subscriber per client "
        "(MQTT 5, the same broker, from the same worker processes and event loops, before the "
        "agents connect): plain paho callbacks are the floor, the cheapest subscriber an "
        "agent could be; aiomqtt's message iterator is shown beside it for continuity.</p>"
        if b.get("p99_ms") is not None
        else "<p>Bare fan-out not measured (--no-baseline).</p>"
    )
    d = b.get("download") or {}
    if d.get("p99_ms") is not None:
        ratio += (
            f"<p>cached p99 / download floor p99 = <b>{d.get('cached_p99_ratio')}</b>. The "
            "download floor is the same bare paho fan-out where each subscriber, on the "
            "message, GETs one real manifest from the run's server through one HTTP pool per "
            f"worker (the agents' pool and settings): {d['received']:,} downloaded, "
            f"{d.get('failed', 0):,} failed.</p>"
        )
        if d.get("notified_p99_ms") is not None:
            ratio += (
                f"<p>Its subscribers were notified p99 <b>{d['notified_p99_ms']:.0f} ms</b> "
                "while the others' downloads shared their event loops: the notify floor of a "
                "step in which every client downloads as it is notified. notified p99 / that "
                f"p99 = <b>{d.get('notified_p99_ratio')}</b>.</p>"
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
<h1>{esc(report["scenario"])}: {run_size(report)}</h1>
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
{cdf_svg(report)}
</div>
<h2>Over time</h2>
{rate_svg(report)}
{latency_over_time_svg(report)}
<h2>Convergence per step</h2>
<p class="note">Share of the clients a step reached (accepted one of its messages, or started
during it) whose entitlements equal the oracle's, over time since the step started; each step
on its own scale.</p>
{convergence_panels(report)}
<h2>Steps</h2>
{_step_rows(report)}
<p class="note">reached: clients that accepted a message of the step (or started during it).
in sync: online clients whose entitlements equal the oracle's when the step ended; clients the
step did not reach were already in sync. {esc(n_explained(report))} Latencies in ms.</p>
<h2>Processes</h2>
{procs}
</body></html>
"""
