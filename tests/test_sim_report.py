"""The simulator's report: what `report.html` and the terminal summary show for a given
`report.json`, the axes and legends of its plots, and the counters behind its load-test
sections (timeline, manifest requests, agent connection events)."""

from __future__ import annotations

import json
import math
import random
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console

from simulator.fleetstats import (
    MANIFEST_FAILED_SERIES,
    MANIFEST_SERIES,
    FleetStats,
    MeteredHttpPool,
)
from simulator.metrics import BINS_PER_DECADE, TICK_S, Timeline
from simulator.report import (
    bucket_width,
    labelled,
    linear_ticks,
    log_ticks,
    print_summary,
    render_html,
    to_json,
)

SVG = "{http://www.w3.org/2000/svg}"

# -- axes ------------------------------------------------------------------------------------


def _is_1_2_5(v: float) -> bool:
    mantissa = v / 10 ** math.floor(math.log10(v) + 1e-9)
    return any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5))


def test_log_ticks_are_round_1_2_5_values_covering_the_data() -> None:
    # The data range of the demo's CDF, which used to be labelled 6.31, 22.4, 79.2, 280, 993.
    assert log_ticks(6.31, 3516) == [5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    assert log_ticks(1, 50) == [1, 2, 5, 10, 20, 50]
    wide = log_ticks(0.6, 20_000)
    assert wide[0] == 0.5 and wide[-1] == 20_000 and len(wide) == 15
    # Too little room for 15 labels: the powers of ten are labelled, the rest are grid lines.
    assert labelled(wide, True, 300, 34) == [1, 10, 100, 1000, 10_000]
    assert labelled(wide, True, 900, 34) == wide
    for lo, hi in ((0.013, 7.7), (3.52, 52.5), (900, 1100), (0.2, 0.3)):
        ticks = log_ticks(lo, hi)
        assert ticks[0] <= lo and ticks[-1] >= hi, (lo, hi, ticks)
        assert all(_is_1_2_5(t) for t in ticks), ticks


def test_linear_ticks_are_round_steps_from_zero() -> None:
    assert linear_ticks(0, 3.38) == [0, 1, 2, 3, 4]
    assert linear_ticks(0, 17.8) == [0, 5, 10, 15, 20]
    assert linear_ticks(0, 0.0348 * 1000) == [0, 10, 20, 30, 40]
    assert linear_ticks(0, 1180) == [0, 250, 500, 750, 1000, 1250]


def test_bucket_width_gives_at_most_150_round_buckets() -> None:
    assert bucket_width(17.8) == 0.2
    assert bucket_width(44) == 0.5
    assert bucket_width(3600) == 30


# -- timeline and fleet counters -------------------------------------------------------------


def test_timeline_of_two_workers_merges_to_the_pooled_timeline() -> None:
    rng = random.Random(3)
    t0 = 1_700_000_000.0
    one, two, pooled = Timeline(), Timeline(), Timeline()
    samples = [(t0 + rng.uniform(0, 10), rng.lognormvariate(-2, 1)) for _ in range(4000)]
    for i, (at, lat) in enumerate(samples):
        (one if i % 3 else two).record("notified", at, lat)
        pooled.record("notified", at, lat)
    shipped = [Timeline.decode(json.loads(json.dumps(t.encode()))) for t in (one, two)]
    merged = Timeline()
    for t in shipped:
        merged.merge(t)
    assert merged.encode() == pooled.encode()
    buckets = merged.buckets("notified", t0, 1.0)
    assert [b[0] for b in buckets] == [float(i) for i in range(10)]
    assert sum(int(b[1]) for b in buckets) == 4000
    # Each bucket's percentiles are within one bin (12 %) of the exact ones.
    for start, count, p50, p99 in buckets:
        inside = sorted(
            lat * 1000 for at, lat in samples if start <= at - t0 < start + 1 and lat > 0
        )
        assert len(inside) == count
        exact50 = inside[math.ceil(0.5 * count) - 1]
        exact99 = inside[math.ceil(0.99 * count) - 1]
        assert abs(math.log10(p50 / exact50)) <= 1 / BINS_PER_DECADE
        assert abs(math.log10(p99 / exact99)) <= 1 / BINS_PER_DECADE


def test_timeline_peak_rate_is_the_busiest_whole_second() -> None:
    t = Timeline()
    for i in range(30):
        t.record("notified", 100.0 + i * TICK_S / 3, 0.01)  # 30 events within 1 s
    for i in range(10):
        t.record("cached", 100.5 + i * 0.01, 0.05)  # 10 more in that same second
    t.record("notified", 105.2, 0.01)
    assert t.peak_rate("notified") == 30
    assert t.peak_rate("notified", "cached") == 40
    assert t.peak_rate("applied") == 0


def test_fleet_stats_add_up_across_workers() -> None:
    a, b = FleetStats(), FleetStats()
    a.request(10.0, 0.004, "200")
    a.request(10.1, 0.2, "503")
    b.request(11.0, 0.003, "ConnectError")
    a.events["disconnected"] += 2
    b.events["connected"] += 5
    a.reconnects, b.reconnects = 1, 2
    a.add_messages({"accepted": 4, "stale": 1, "invalid": 0})
    b.add_messages({"accepted": 6, "stale": 0, "invalid": 2})
    total = FleetStats()
    for part in (a, b):
        total.merge(FleetStats.decode(json.loads(json.dumps(part.encode()))))
    assert total.all_requests == 3 and total.failed_requests == 2
    assert dict(total.answers) == {"200": 1, "503": 1, "ConnectError": 1}
    # Latency is the endpoint's: of the answers (200 and 503), not of a refused connection.
    assert total.requests.count == total.timeline.count(MANIFEST_SERIES) == 2
    assert total.requests.max_ms() == pytest.approx(200, rel=0.01)
    assert total.timeline.count(MANIFEST_FAILED_SERIES) == 2
    assert (total.events["disconnected"], total.events["connected"], total.reconnects) == (2, 5, 3)
    assert dict(total.messages) == {"accepted": 10, "stale": 1, "invalid": 2}
    assert FleetStats.decode({}).requests.count == 0  # a worker of an older version


async def test_metered_pool_times_every_manifest_request_and_names_failures() -> None:
    from aiohttp import web

    from simulator.mosquitto import free_port

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(body=b"<xml/>")

    async def busy(_request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/v1/manifests/ok", ok)
    app.router.add_get("/v1/manifests/busy", busy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    stats = FleetStats()
    pool = MeteredHttpPool(stats, max_connections=4, timeout=5)
    try:
        base = f"http://127.0.0.1:{port}/v1/manifests"
        assert (await pool.get(f"{base}/ok")).content == b"<xml/>"
        assert (await pool.get(f"{base}/ok")).status_code == 200
        assert (await pool.get(f"{base}/busy")).status_code == 503
        with pytest.raises(Exception, match="cannot connect"):
            await pool.get(f"http://127.0.0.1:{free_port()}/v1/manifests/x")
    finally:
        await pool.aclose()
        await runner.cleanup()
    assert dict(stats.answers) == {"200": 2, "503": 1, "ConnectError": 1}
    assert stats.all_requests == 4 and stats.failed_requests == 2
    assert stats.requests.count == stats.timeline.count(MANIFEST_SERIES) == 3
    assert stats.timeline.count(MANIFEST_FAILED_SERIES) == 2


async def test_worker_counts_reconnects_fetch_failures_and_message_stats() -> None:
    from agent.daemon import AgentEvent
    from simulator.control import BrokerAddress
    from simulator.worker import VirtualClient, Worker

    worker = Worker("run", BrokerAddress("127.0.0.1", 1), "http://127.0.0.1:1")
    c = VirtualClient("ws-1", "u1")
    c.agent = SimpleNamespace(stats={"accepted": 3, "stale": 2, "invalid": 1})
    c.online, c.started_at = True, time.time() - 5
    worker.clients[c.client_id] = c
    observe = worker._observer(c)
    now = time.time()
    for kind in ("connected", "disconnected", "connected", "fetch_failed", "connected"):
        observe(AgentEvent(kind, 0, None, None, None, now))  # type: ignore[arg-type]
    observe(AgentEvent("notified", 7, now - 0.05, "addin", None, now))
    observe(AgentEvent("notified", 7, now - 0.05, "addin", None, now))  # the same delivery
    result = await worker.cmd_stats(1, {"steps": {}})
    fleet = FleetStats.decode(json.loads(json.dumps(result["fleet"])))
    assert fleet.events["connected"] == 3 and fleet.reconnects == 2
    assert fleet.events["disconnected"] == 1 and fleet.events["fetch_failed"] == 1
    assert fleet.timeline.count("notified") == 1
    assert dict(fleet.messages) == {"accepted": 3, "stale": 2, "invalid": 1}


# -- the agent reports what the worker counts ------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path, broker: Any) -> AsyncIterator[Any]:
    from agent_helpers import ServerProcess

    srv = ServerProcess(tmp_path, broker)
    await srv.user("ann")
    yield srv
    await srv.aclose()


async def test_agent_reports_connects_lost_links_and_failed_fetch_rounds(
    tmp_path: Path, broker: Any, server: Any
) -> None:
    from agent_helpers import addin_id, agent_config, manifest, until

    from agent.daemon import Agent
    from simulator.mosquitto import free_port

    await server.upload(manifest("Notes"))
    await server.assign(addin_id("Notes"), "everyone")
    kinds: list[str] = []
    # Manifests from a port nobody listens on: every download attempt fails.
    config = agent_config(tmp_path, broker, server, server_url=f"http://127.0.0.1:{free_port()}")
    agent = Agent(config, observer=lambda e: kinds.append(e.kind))
    await agent.start()
    try:
        await until(lambda: "fetch_failed" in kinds, 30, "a failed round of downloads")
        assert kinds[0] == "connected" and "manifest_cached" not in kinds
        assert "disconnected" not in kinds
        broker.restart(hard=True)
        await until(
            lambda: "disconnected" in kinds and "connected" in kinds[kinds.index("disconnected") :],
            30,
            "the lost link and the reconnect",
        )
        before_stop = kinds.count("disconnected")
    finally:
        await agent.stop()
    assert kinds.count("disconnected") == before_stop  # a stop is not a lost link


# -- report.html and the terminal summary from a report.json --------------------------------


def _report() -> dict[str, Any]:
    """A report.json of a small phased rollout, as `build_report` writes it."""

    def stage(p50: float, p95: float, p99: float, mx: float, n: int) -> dict[str, Any]:
        return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "max_ms": mx, "count": n}

    def cdf(lo: float, hi: float) -> list[list[float]]:
        return [[round(lo * (hi / lo) ** (i / 20), 3), i / 20] for i in range(21)]

    def step(name: str, start: float, dur: float, reached: int, end: float) -> dict[str, Any]:
        curve = [[0.0, 0.0]] + [[round(end * i / 10, 4), i / 10] for i in range(1, 11)]
        return {
            "name": name,
            "revisions": [3],
            "started_s": start,
            "duration_s": dur,
            "online_clients": 1000,
            "converged": 1000,
            "unconverged": 0,
            "reached": reached,
            "converged_p99_s": end,
            "notes": [],
            "stages": {"notified": stage(11.0, 14.4, 15.2, 15.3, reached)},
            "convergence": curve,
            "reached_convergence": curve,
        }

    steps = [
        step("connect", 2.0, 3.4, 1000, 3.378),
        step("pilot", 5.5, 5.3, 20, 0.0348),
        step("everyone", 11.0, 2.3, 1000, 0.65),
        step("final-check", 13.5, 0.4, 0, 0.0),
    ]
    steps[0]["stages"]["notified"] = stage(252.0, 336.0, 359.0, 368.0, 2000)
    steps[2]["stages"]["cached"] = stage(359.0, 498.0, 511.0, 515.0, 919)
    steps[2]["notes"] = ["broker kill", "330 duplicated/reordered messages"]
    return {
        "clients": 1000,
        "scenario": "phased-rollout",
        "description": "pilot, then everyone",
        "seed": 4242,
        "workers": 2,
        "agent_cache": "file",
        "mismatches": 0,
        "mismatch_list": [],
        "server_disagreements": [],
        "stages": {
            "notified": stage(140.0, 255.4, 272.0, 275.0, 1020),
            "cached": stage(344.0, 497.2, 510.0, 515.0, 919),
            "applied": stage(2587.0, 2697.0, 2710.0, 2714.0, 919),
        },
        "cdf": {
            "notified": cdf(3.52, 275),
            "cached": cdf(41, 515),
            "applied": cdf(300, 2714),
            "baseline": cdf(0.6, 159),
        },
        "baseline": {
            "subscriber": "paho",
            "clients": 1000,
            "received": 1000,
            "p50_ms": 85.4,
            "p95_ms": 158.0,
            "p99_ms": 159.0,
            "max_ms": 159.0,
            "notified_p99_ratio": 1.711,
            "aiomqtt": {
                "subscriber": "aiomqtt",
                "clients": 1000,
                "received": 1000,
                "p50_ms": 101.0,
                "p95_ms": 181.0,
                "p99_ms": 183.0,
                "max_ms": 184.0,
                "notified_p99_ratio": 1.486,
            },
            "download": {
                "subscriber": "download",
                "clients": 1000,
                "received": 998,
                "failed": 2,
                "p50_ms": 212.0,
                "p95_ms": 371.0,
                "p99_ms": 402.0,
                "max_ms": 409.0,
                "cached_p99_ratio": 1.269,
                "notified_p99_ms": 350.0,
                "notified_p99_ratio": 0.777,
            },
        },
        "throughput": {
            "deliveries": 2858,
            "deliveries_per_s": 173.2,
            "peak_deliveries_per_s": 1200.0,
            "messages_accepted": 4661,
        },
        "manifest_requests": {
            "count": 926,
            "answered": 924,
            "failed": 7,
            "answers": {"200": 919, "503": 5, "ConnectError": 2},
            "peak_per_s": 885.0,
            "p50_ms": 17.7,
            "p95_ms": 175.6,
            "p99_ms": 179.0,
            "max_ms": 253.0,
        },
        "errors": {
            "manifest_requests_failed": 7,
            "fetch_rounds_failed": 1,
            "connection_failures": 13,
            "reconnects": 11,
            "messages_stale": 42,
            "messages_invalid": 3,
            "admin_retries": 2,
            "unconverged": 0,
        },
        "timeline": {
            "bucket_s": 0.2,
            "series": {
                "notified": [[2.2, 100, 250.0, 350.0], [11.0, 1000, 150.0, 270.0]],
                "cached": [[11.2, 919, 350.0, 500.0]],
                "applied": [[12.0, 400, 2000.0, 2600.0]],
                MANIFEST_SERIES: [[11.0, 900, 17.0, 170.0], [11.2, 24, 30.0, 250.0]],
                MANIFEST_FAILED_SERIES: [[11.2, 7, 1.0, 2.0]],
            },
        },
        "processes": [{"role": "worker", "pid": 12, "cpu_s": 3.0, "rss_max_kb": 153600}],
        "rss_per_client_kb": 153.6,
        "steps": steps,
        "started_at": 1795911175.9,
        "duration_s": 17.8,
        "machine": {"python": "3.11.7", "platform": "Linux-test-x86_64", "cpus": 2},
    }


def _svgs(page: str) -> dict[str, ET.Element]:
    """Each inline SVG of the page by its title (aria-label)."""
    out = {}
    for m in re.finditer(r"<svg .*?</svg>", page, re.S):
        el = ET.fromstring(m.group(0))
        out[el.attrib["aria-label"]] = el
    return out


def _ticks(svg: ET.Element, axis: str) -> list[str]:
    return [t.text or "" for t in svg.iter(f"{SVG}text") if t.attrib.get("class") == axis]


def test_html_shows_what_report_json_holds() -> None:
    page = render_html(_report())
    text = re.sub(r"<[^>]+>", " ", page)
    for expected in (
        "4242",  # seed
        "file",  # agent cache
        "2026-11-29 00:12:55 UTC",  # started
        "17.8 s",
        "Python 3.11.7, 2 CPUs, Linux-test-x86_64",
        "2,858 (173/s over the run, 1,200 in the busiest second)",
        "4,661",  # state messages accepted
        "255",  # p95 of notified (rounded as printed)
        "497",  # p95 of cached
        "158",  # p95 of the bare fan-out
        "1.711",  # notified p99 / baseline p99
        "against the paho floor (1.486 against aiomqtt",
        "cached p99 / download floor p99 =  1.269",
        "998 downloaded, 2 failed",
    ):
        assert expected in text, expected
    # Latency table: a row per stage, the bare fan-out and the manifest endpoint.
    assert re.search(
        r"manifest GET</td><td>17.7</td><td>176</td><td>179</td><td>253</td><td>924</td>", page
    )
    assert re.search(
        r"bare MQTT fan-out \(paho, the floor\)</td><td>85.4</td><td>158</td><td>159</td>", page
    )
    assert re.search(
        r"bare MQTT fan-out \(aiomqtt\)</td><td>101</td><td>181</td><td>183</td>", page
    )
    assert re.search(
        r"manifest GET \(the download floor\)</td><td>212</td><td>371</td><td>402</td>"
        r"<td>409</td><td>998</td>",
        page,
    )


def test_html_has_an_errors_and_retries_table() -> None:
    page = render_html(_report())
    section = page.split("<h2>Errors and retries</h2>", 1)[1].split("</table>", 1)[0]
    rows = {
        cells[0]: cells[1:]
        for cells in (
            re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section)
        )
        if cells
    }
    assert rows["manifest requests failed"][0] == "7"
    assert "503: 5, ConnectError: 2" in rows["manifest requests failed"][1]
    assert rows["fetch rounds failed"][0] == "1"
    assert rows["MQTT connection failures"][0] == "13"
    assert rows["MQTT reconnects"][0] == "11"
    assert rows["stale or duplicate messages ignored"][0] == "42"
    assert rows["invalid messages refused"][0] == "3"
    assert rows["admin API calls retried"][0] == "2"


def test_cdf_has_the_bare_fan_out_round_ticks_and_its_legend_beside_the_plot() -> None:
    svgs = _svgs(render_html(_report()))
    cdf = next(s for title, s in svgs.items() if title.startswith("Latency CDF"))
    legend = [t.text for g in cdf.iter(f"{SVG}g") for t in g.iter(f"{SVG}text")]
    assert legend == ["notified", "cached", "applied", "bare MQTT fan-out"]
    dashed = [p for p in cdf.iter(f"{SVG}polyline") if p.attrib.get("stroke-dasharray")]
    assert len(dashed) == 1  # the bare fan-out
    labels = _ticks(cdf, "xtick")
    assert labels == ["0.5", "1", "2", "5", "10", "20", "50", "100", "200", "500", "1,000",
                      "2,000", "5,000"]  # fmt: skip
    assert not {"3.52", "13.6", "52.5"} & set(labels)


def test_no_legend_overlaps_its_plot() -> None:
    for title, svg in _svgs(render_html(_report())).items():
        plot = next(r for r in svg.iter(f"{SVG}rect") if r.attrib.get("class") == "plot")
        right = float(plot.attrib["x"]) + float(plot.attrib["width"])
        for g in svg.iter(f"{SVG}g"):
            for el in g:
                x = float(el.attrib.get("x", el.attrib.get("x1", "0")))
                assert x > right, (title, el.attrib)


def test_each_step_converges_on_its_own_time_axis() -> None:
    svgs = _svgs(render_html(_report()))
    panels = {t.split(":")[0]: s for t, s in svgs.items() if " reached, " in t}
    assert set(panels) == {"connect", "pilot", "everyone"}  # final-check reached nobody
    assert "pilot: 20 reached, all in sync in 35 ms" in svgs
    assert "connect: 1,000 reached, all in sync in 3.4 s" in svgs
    # The pilot converged in 35 ms: its axis ends at 40 ms, not at connect's 3.4 s.
    assert _ticks(panels["pilot"], "xtick")[-1] == "40"
    assert _ticks(panels["connect"], "xtick")[-1] == "4"
    x_labels = [t.text for t in panels["pilot"].iter(f"{SVG}text")]
    assert "ms after the step started" in x_labels


def test_over_time_charts_show_stages_manifest_requests_and_steps() -> None:
    svgs = _svgs(render_html(_report()))
    rate = next(s for t, s in svgs.items() if t.startswith("Deliveries and manifest requests"))
    latency = next(s for t, s in svgs.items() if t.startswith("Latency over time"))
    texts = [t.text for t in rate.iter(f"{SVG}text")]
    for name in ("notified", "cached", "applied", "manifest GET", "manifest GET failed",
                 "connect", "pilot", "everyone"):  # fmt: skip
        assert name in texts, name
    assert "manifest GET p99" in [t.text for t in latency.iter(f"{SVG}text")]
    # 1000 notified deliveries in one 0.2 s bucket: 5,000 per second at the peak.
    assert _ticks(rate, "ytick")[-1] == "5,000"


def test_html_and_terminal_say_what_n_counts() -> None:
    report = _report()
    page = render_html(report)
    assert "n counts deliveries, one per client and change" in page
    assert "2 per client here" in page  # connect: 2,000 deliveries for 1,000 clients
    assert "clients that already held it from an earlier step" in page
    console = Console(record=True, width=80)
    print_summary(report, console)
    out = console.export_text()
    assert max(len(line) for line in out.splitlines()) <= 80
    flat = re.sub(r"\s+", " ", out)
    assert "n: deliveries, one per client and change" in flat
    assert "(2 per client)" in flat
    assert "in sync" in flat
    assert "manifest GET: 926 requests, 7 failed, busiest second 885" in flat
    assert "13 MQTT connection failures, 11 reconnects" in flat
    assert "seed 4242, agent cache file" in flat
    assert "1000 paho subscribers (the floor): p99 159 ms" in flat
    assert "notified p99 / floor p99 = 1.711" in flat
    assert "aiomqtt iterator subscribers: p99 183 ms" in flat and "= 1.486" in flat
    assert "(the download floor): 998 downloaded, 2 failed; p99 402 ms" in flat
    assert "cached p99 / download floor p99 = 1.269" in flat
    assert "notified (while the others downloaded) p99 350 ms; notified p99 / that p99 = 0.777" in flat
    assert "everyone: broker kill, 330 duplicated/reordered messages" in flat


def test_an_older_report_without_the_new_sections_still_renders() -> None:
    report = _report()
    for key in ("cdf", "manifest_requests", "errors", "timeline"):
        del report[key]
    for s in report["steps"]:
        for key in ("started_s", "reached", "reached_convergence"):
            del s[key]
    page = render_html(report)
    assert "no data" in page and "4242" in page


def test_report_json_keeps_plot_points_on_one_line() -> None:
    report = _report()
    text = to_json(report)
    assert json.loads(text) == report
    assert "[2.2, 100, 250.0, 350.0]" in text
    assert len(text.splitlines()) < len(json.dumps(report, indent=2).splitlines()) / 2


def test_build_report_counts_every_manifest_request_and_who_each_step_reached() -> None:
    from simulator.coordinator import RunOptions, RunResult, StepResult
    from simulator.metrics import StageSet
    from simulator.report import build_report
    from simulator.scenario import load_scenario

    t0 = 1_700_000_000.0
    fleet = FleetStats()
    for i in range(5):
        fleet.request(t0 + 2 + i * 0.1, 0.010, "200")
    fleet.request(t0 + 3, 0.020, "503")
    fleet.request(t0 + 3, 0.001, "ConnectError")
    fleet.request(t0 + 3.1, 0.001, "ConnectError")
    fleet.events.update(
        {"disconnected": 4, "connected": 7, "fetch_failed": 1, "subscription_refused": 2}
    )
    fleet.reconnects = 4
    fleet.timeline.record("notified", t0 + 1.5, 0.2)
    stages = StageSet()
    stages.record("notified", 0.2)
    stages.record("cached", 0.012)
    # Two clients got a message of the step; the third already matched when it started.
    step = StepResult("pilot", started_at=t0 + 1, offsets=[0.0, 0.4, 0.9], online=3)
    step.unconverged = 1
    result = RunResult(
        scenario=load_scenario("phased-rollout"),
        options=RunOptions(clients=4, seed=9, cache="none"),
        steps=[step],
        mismatches=[],
        stages=stages,
        baseline={
            "subscriber": "paho",
            "clients": 4,
            "received": 4,
            "p50_ms": 1.0,
            "p95_ms": 2.0,
            "p99_ms": 2.0,
            "max_ms": 2.0,
            "cdf": [(1.0, 0.0), (2.0, 1.0)],
            "aiomqtt": {"subscriber": "aiomqtt", "clients": 4, "received": 4, "p99_ms": 4.0},
            "download": {
                "subscriber": "download",
                "clients": 4,
                "received": 3,
                "failed": 1,
                "p99_ms": 8.0,
                "notified": {"p99_ms": 6.0},
            },
        },
        processes=[{"role": "worker", "pid": 1, "cpu_s": 1.0, "rss_max_kb": 4096}],
        started_at=t0,
        duration_s=10.0,
        workers=1,
        server_disagreements=[],
        fleet=fleet,
        admin_retries=2,
    )
    report = json.loads(to_json(build_report(result)))
    m = report["manifest_requests"]
    assert (m["count"], m["answered"], m["failed"]) == (8, 6, 3)
    assert m["answers"] == {"200": 5, "503": 1, "ConnectError": 2}
    assert m["p50_ms"] == pytest.approx(10, rel=0.01) and m["max_ms"] == pytest.approx(20, rel=0.01)
    assert report["errors"] == {
        "manifest_requests_failed": 3,
        "fetch_rounds_failed": 1,
        "connection_failures": 4,
        "subscriptions_refused": 2,
        "reconnects": 4,
        "messages_stale": 0,
        "messages_invalid": 0,
        "messages_signature_refused": 0,
        "admin_retries": 2,
        "unconverged": 1,
    }
    (s,) = report["steps"]
    assert (s["started_s"], s["reached"], s["converged"], s["online_clients"]) == (1.0, 3, 3, 3)
    assert s["reached_convergence"][-1] == [0.9, round(2 / 3, 4)]  # one reached never converged
    # The notify ratio is against the paho floor; the aiomqtt figure has its own beside it.
    assert report["baseline"]["subscriber"] == "paho"
    assert report["baseline"]["notified_p99_ratio"] == round(
        report["stages"]["notified"]["p99_ms"] / 2.0, 3
    )
    assert report["baseline"]["aiomqtt"]["notified_p99_ratio"] == round(
        report["stages"]["notified"]["p99_ms"] / 4.0, 3
    )
    # The cached ratio is against the download floor (fan-out plus one manifest GET).
    download = report["baseline"]["download"]
    assert download["cached_p99_ratio"] == round(report["stages"]["cached"]["p99_ms"] / 8.0, 3)
    assert (download["received"], download["failed"]) == (3, 1)
    # Its notify ratio is against when its own subscribers were notified, under downloads.
    assert download["notified_p99_ms"] == 6.0
    assert download["notified_p99_ratio"] == round(report["stages"]["notified"]["p99_ms"] / 6.0, 3)
    assert report["baseline"]["p95_ms"] == 2.0 and report["cdf"]["baseline"] == [
        [1.0, 0.0],
        [2.0, 1.0],
    ]
    assert report["timeline"]["bucket_s"] == 0.1
    assert report["timeline"]["series"]["manifest_get_failed"][0][:2] == [3.0, 3]
    assert (report["seed"], report["agent_cache"]) == (9, "none")
    assert "Errors and retries" in render_html(report)
