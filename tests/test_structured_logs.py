"""`--log-format json`: the real server and agent processes write one JSON object per line,
parsed back here, with the revision, add-in, user and device of each event."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import addin_id, lab_agent_toml, manifest
from harness import ADMIN_TOKEN, AgentProcess, ServerProcess, agent_env

from simulator.mosquitto import MosquittoBroker

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
Line = dict[str, Any]


def _lines(log: Path) -> list[Line]:
    """Every line of the log, each of which must be one JSON object."""
    out = []
    for text in log.read_text().splitlines():
        if text.strip():
            line = json.loads(text)  # a line that is not JSON fails the test here
            assert isinstance(line, dict), text
            out.append(line)
    return out


def _wait_for(log: Path, match: Callable[[Line], bool], what: str, timeout: float = 15) -> Line:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in _lines(log) if match(line)] if log.exists() else []
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no log line with {what} in {log}:\n{log.read_text()[-3000:]}")


def test_server_and_agent_log_json_lines(tmp_path: Path, broker: MosquittoBroker) -> None:
    server = ServerProcess(tmp_path / "server.db", broker.url, extra_args=("--log-format", "json"))
    server.start()
    agent: AgentProcess | None = None
    try:
        http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=10)
        xml = manifest("Log Pad", "2.0.0.0")
        assert http.post("/v1/users", json={"id": "ann"}).status_code == 200
        r = http.post("/v1/addins", content=xml, headers={"Content-Type": "application/xml"})
        assert r.status_code == 200, r.text
        aid = addin_id("Log Pad")
        r = http.post(
            f"/v1/addins/{aid}/assign", json={"target": "user", "target_id": "ann", "mode": "fixed"}
        )
        assert r.status_code == 200, r.text
        assigned = r.json()["revision"]

        line = _wait_for(server.log, lambda x: x.get("operation") == "assign", "operation=assign")
        assert line["revision"] == assigned and line["addin"] == aid and line["user"] == "ann"
        assert line["program"] == "addin-server" and line["level"] == "info"
        assert line["ts"].endswith("Z")
        line = _wait_for(server.log, lambda x: x.get("operation") == "create_user", "create_user")
        assert line["user"] == "ann" and line["revision"] == 1
        _wait_for(
            server.log,
            lambda x: x["message"].startswith("published") and x.get("revision") == assigned,
            f"published revision {assigned}",
        )
        started = _wait_for(server.log, lambda x: "tenant contoso" in x["message"], "the start")
        assert started["logger"] == "addin_server"

        cfg = lab_agent_toml(tmp_path, broker, server)  # type: ignore[arg-type]
        agent_log = tmp_path / "agent.log"
        agent = AgentProcess(cfg, agent_log, env={**agent_env(), "ADDIN_LOG_FORMAT": "json"})
        line = _wait_for(
            agent_log,
            lambda x: x.get("topic", "").endswith(f"/assign/user/ann/{aid}"),
            "the assignment accepted",
        )
        assert line["program"] == "addin-agent"
        assert (line["user"], line["device"]) == ("ann", "ann-laptop")
        assert (line["revision"], line["addin"]) == (assigned, aid)

        # Launching Word applies the add-in: its line names add-in, host and revision.
        deadline = time.monotonic() + 15
        applied: list[Line] = []
        while not applied and time.monotonic() < deadline:
            subprocess.run(
                [sys.executable, "-m", "agent.cli", "--config", str(cfg), "launch", "Word"],
                capture_output=True,
                env=agent_env(),
                timeout=30,
                check=False,
            )
            applied = [x for x in _lines(agent_log) if x["message"].startswith("applied:")]
            time.sleep(0.2)
        assert applied, agent_log.read_text()[-3000:]
        assert applied[0]["addin"] == aid and applied[0]["host"] == "Word"
        # The revision of the change it applies (the upload or the assignment, as the
        # agent's pending plan attributes it).
        assert applied[0]["device"] == "ann-laptop" and 1 < applied[0]["revision"] <= assigned
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
    # The whole of both logs, start to stop, is JSON (the stop lines included).
    assert all(x["program"] == "addin-agent" for x in _lines(tmp_path / "agent.log"))
    assert all(x["program"] == "addin-server" for x in _lines(server.log))


SIM_SCENARIO = """
name: json-logs
org: {groups: 2}
addins:
  notes: {hosts: [Word], permissions: ReadDocument}
setup:
  - upload: {addin: notes}
steps:
  - name: assign
    do:
      - assign: {addin: notes, target: everyone, mode: fixed}
      - checkpoint: {}
"""


async def test_the_simulator_hands_the_format_to_its_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`addin-sim --log-format json` puts the format in the environment; the run's server
    process logs JSON lines, with the revisions the scenario committed."""
    from addin_runtime.logs import FORMAT_ENV
    from simulator.coordinator import Coordinator, RunOptions
    from simulator.scenario import parse_scenario

    monkeypatch.setenv(FORMAT_ENV, "json")
    options = RunOptions(
        clients=3, workers=1, workdir=tmp_path, baseline=False, checkpoint_settle=0
    )
    result = await asyncio.wait_for(
        Coordinator(parse_scenario(SIM_SCENARIO), options).execute(), 120
    )
    assert result.mismatches == []
    lines = _lines(tmp_path / "server.log")
    assert all(x["program"] == "addin-server" for x in lines)
    assert any(x.get("operation") == "assign" and x.get("revision") for x in lines), lines
    _worker_logs_are_json(tmp_path)


def _worker_logs_are_json(workdir: Path) -> None:
    """The worker process got the format too: whatever it logged (warnings only) is JSON."""
    for worker_log in workdir.glob("worker-*.log"):
        assert all(x["program"] == "addin-sim" for x in _lines(worker_log))


def test_under_systemd_text_lines_carry_journal_priorities(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """With JOURNAL_STREAM set (systemd connected stdout to the journal), log lines go to
    stdout without a timestamp and with the <N> priority prefix journald reads."""
    server = ServerProcess(tmp_path / "server.db", broker.url, env={"JOURNAL_STREAM": "8:12345"})
    server.start()
    try:
        http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=10)
        assert http.post("/v1/users", json={"id": "ann"}).status_code == 200
        deadline = time.monotonic() + 10
        while "revision 1 committed" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()
    lines = server.log.read_text().splitlines()
    assert (
        "<6>INFO addin_server.changes: revision 1 committed: create_user by admin, 1 message(s)"
        in lines
    )
    logged = [x for x in lines if x.startswith("<")]
    assert logged and all(x[:3] in ("<3>", "<4>", "<6>", "<7>") for x in logged), lines
