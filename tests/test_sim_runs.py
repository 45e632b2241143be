"""End-to-end simulator runs: real Mosquitto, real server stub (subprocess), real agents.

Each run starts its own private broker and server. Agents run inside the test process
(workers=0) so a test can tamper with the agent's resolver and see the oracle catch it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from simulator.coordinator import Coordinator, RunOptions, RunResult
from simulator.report import write_reports
from simulator.scenario import builtin_names, load_scenario, parse_scenario

CLIENTS = 30


async def _run(scenario: Any, tmp_path: Path, **kw: Any) -> RunResult:
    kw.setdefault("checkpoint_settle", 0.2)  # correctness does not depend on it; CI time does
    options = RunOptions(clients=CLIENTS, workers=0, workdir=tmp_path, **kw)
    return await asyncio.wait_for(Coordinator(scenario, options).execute(), 240)


def test_every_shipped_scenario_is_listed() -> None:
    assert set(builtin_names()) >= {
        "phased-rollout",
        "group-churn",
        "lob-update",
        "turn-off-on",
        "broker-restart",
        "offline-clients",
        "storm",
        "ring-rollout",
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin_names())
async def test_small_run_of_every_scenario_has_no_mismatch(name: str, tmp_path: Path) -> None:
    result = await _run(load_scenario(name), tmp_path)
    assert result.mismatches == []
    assert result.server_disagreements == []
    report = write_reports(result, tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["clients"] == CLIENTS and data["scenario"] == name and data["mismatches"] == 0
    for stage in ("notified", "cached", "applied"):
        assert set(data["stages"][stage]) == {"p50_ms", "p95_ms", "p99_ms", "max_ms", "count"}
    assert {"p99_ms", "max_ms"} <= set(data["baseline"])
    assert data["baseline"]["received"] == CLIENTS
    # The paho floor, and the aiomqtt subscribers measured after it, each reached every client.
    assert data["baseline"]["subscriber"] == "paho"
    assert data["baseline"]["aiomqtt"]["received"] == CLIENTS
    # Then the download floor: each bare subscriber GOT the setup's manifest from the server.
    download = data["baseline"]["download"]
    assert (download["subscriber"], download["received"], download["failed"]) == (
        "download",
        CLIENTS,
        0,
    )
    assert download["p99_ms"] > 0
    cached = data["stages"]["cached"]["p99_ms"]  # 0 where no step made clients download
    assert download["cached_p99_ratio"] == (
        round(cached / download["p99_ms"], 3) if cached else None
    )
    assert all({"role", "cpu_s", "rss_max_kb"} <= set(p) for p in data["processes"])
    assert [s["name"] for s in data["steps"]][-1] == "final-check"
    # every online client converged in every step
    assert all(s["unconverged"] == 0 for s in data["steps"])
    assert data["stages"]["notified"]["count"] > 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<svg" in page and "Errors and retries" in page and "Over time" in page
    # The load-test sections count what really happened.
    requests, errors = data["manifest_requests"], data["errors"]
    assert requests["count"] >= data["stages"]["cached"]["count"]
    assert requests["count"] > 0  # every scenario assigns an add-in
    assert sum(requests["answers"].values()) == requests["count"] and requests["p99_ms"] > 0
    if name != "offline-clients":  # the one scenario that restarts the server
        assert requests["failed"] == errors["manifest_requests_failed"] == 0
    assert set(data["timeline"]["series"]) >= {"notified", "manifest_get"}
    assert data["cdf"]["baseline"] and data["cdf"]["notified"]
    if name == "broker-restart":
        # Every client lost the broker and came back (once or twice: the kill may come while
        # a client is still waiting to reconnect after the restart).
        assert errors["connection_failures"] >= CLIENTS
        assert errors["reconnects"] >= CLIENTS
    else:
        assert errors["reconnects"] == 0
    if name == "offline-clients":  # the duplicated and reordered messages were ignored
        assert errors["messages_stale"] > 0


BROKEN = """
name: broken-resolver
org: {groups: 5}
addins:
  notes: {hosts: [Word], permissions: ReadDocument}
setup:
  - upload: {addin: notes}
steps:
  - name: assign
    settle_timeout: 3
    do:
      - assign: {addin: notes, target: "group:pilot", mode: optional}
      - assign: {addin: notes, target: "user:@user:0", mode: fixed}
      - checkpoint: {}
"""


async def test_a_broken_resolver_is_caught_by_the_oracle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.model
    from addin_core.protocol import Mode

    real = agent.model.resolve

    def weakest_mode_wins(*args: Any, **kwargs: Any) -> Any:
        # The bug: every fixed entitlement is downgraded to optional.
        out = real(*args, **kwargs)
        return {
            a: dataclasses.replace(e, mode=Mode.OPTIONAL) if e.mode == Mode.FIXED else e
            for a, e in out.items()
        }

    monkeypatch.setattr(agent.model, "resolve", weakest_mode_wins)
    result = await _run(parse_scenario(BROKEN), tmp_path, baseline=False)
    bad = {m["user"] for m in result.mismatches}
    assert bad == {"u00001"}  # exactly the user with the fixed assignment
    assert any("expected fixed, got optional" in d for m in result.mismatches for d in m["diff"])


@pytest.mark.slow
def test_a_worker_started_by_hand_joins_the_run(tmp_path: Path) -> None:
    """`addin-sim run --remote-workers 1` prints the exact `addin-sim worker` command; a worker
    started with it (here on this machine; elsewhere only the addresses differ) gets its share
    of the clients, and the coordinator merges what both workers measured."""
    import os
    import re
    import subprocess
    import sys
    import time

    report = tmp_path / "report"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "run", "--clients", "40", "--workers", "1",
         "--remote-workers", "1", "--scenario", "group-churn", "--no-baseline",
         "--report", str(report)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    worker: subprocess.Popen[str] | None = None
    try:
        assert run.stderr is not None
        deadline = time.monotonic() + 60
        command = None
        while command is None and time.monotonic() < deadline:
            line = run.stderr.readline()
            assert line or run.poll() is None, "the run ended before announcing the join command"
            found = re.search(r"addin-sim worker (--run \S+ --broker \S+ --server \S+)", line)
            if found:
                command = found.group(1).split()
        assert command is not None
        worker = subprocess.Popen(
            [sys.executable, "-m", "simulator.cli", "worker", *command],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, out + err
        assert worker.wait(timeout=30) == 0
    finally:
        for p in (run, worker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    data = json.loads((report / "report.json").read_text())
    assert data["mismatches"] == 0 and data["clients"] == 40
    assert data["workers"] == 2
    assert [p["role"] for p in data["processes"]].count("worker") == 2
    assert data["steps"][0]["converged"] == 40
