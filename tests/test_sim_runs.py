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
    assert all({"role", "cpu_s", "rss_max_kb"} <= set(p) for p in data["processes"])
    assert [s["name"] for s in data["steps"]][-1] == "final-check"
    # every online client converged in every step
    assert all(s["unconverged"] == 0 for s in data["steps"])
    assert data["stages"]["notified"]["count"] > 0
    assert "<svg" in (tmp_path / "report" / "report.html").read_text()


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
    import agent.daemon
    from addin_core.protocol import Mode

    real = agent.daemon.resolve

    def weakest_mode_wins(*args: Any, **kwargs: Any) -> Any:
        # The bug: every fixed entitlement is downgraded to optional.
        out = real(*args, **kwargs)
        return {
            a: dataclasses.replace(e, mode=Mode.OPTIONAL) if e.mode == Mode.FIXED else e
            for a, e in out.items()
        }

    monkeypatch.setattr(agent.daemon, "resolve", weakest_mode_wins)
    result = await _run(parse_scenario(BROKEN), tmp_path, baseline=False)
    bad = {m["user"] for m in result.mismatches}
    assert bad == {"u00001"}  # exactly the user with the fixed assignment
    assert any("expected fixed, got optional" in d for m in result.mismatches for d in m["diff"])
