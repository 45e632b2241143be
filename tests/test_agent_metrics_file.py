"""`metrics_file` in agent.toml: a real agent process writes node_exporter textfile metrics,
read back with prometheus_client's parser, following the state it receives from a real
server and broker, and showing it disconnected once stopped."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from agent_helpers import addin_id, lab_agent_toml, manifest
from harness import ADMIN_TOKEN, AgentProcess, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from simulator.mosquitto import MosquittoBroker

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _read(path: Path) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _until(path: Path, ok: object, what: str, timeout: float = 20) -> Samples:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            m = _read(path)
            if callable(ok) and ok(m):
                return m
        time.sleep(0.2)
    raise AssertionError(f"{what}: {path.read_text() if path.exists() else 'no file'}")


def test_agent_writes_textfile_metrics(tmp_path: Path, broker: MosquittoBroker) -> None:
    server = ServerProcess(tmp_path / "server.db", broker.url)
    server.start()
    agent: AgentProcess | None = None
    try:
        http = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        )
        assert http.post("/v1/users", json={"id": "ann"}).status_code == 200
        cfg = lab_agent_toml(
            tmp_path,
            broker,
            server,  # type: ignore[arg-type]
            'metrics_file = "agent.prom"\nmetrics_interval = 1\n',
        )
        prom = tmp_path / "agent.prom"  # relative to the config's folder
        agent = AgentProcess(cfg, tmp_path / "agent.log")
        m = _until(prom, lambda m: m["addin_agent_connected"][()] == 1, "connected")
        info = m["addin_agent_info"]
        assert info == {(("device", "ann-laptop"), ("tenant", "contoso"), ("user", "ann")): 1}
        assert m["addin_agent_entitlements"][()] == 0

        xml = manifest("Metric Notes", "1.0.0.0")
        r = http.post("/v1/addins", content=xml, headers={"Content-Type": "application/xml"})
        assert r.status_code == 200, r.text
        body = {"target": "user", "target_id": "ann", "mode": "fixed"}
        r = http.post(f"/v1/addins/{addin_id('Metric Notes')}/assign", json=body)
        assert r.status_code == 200, r.text
        revision = r.json()["revision"]
        m = _until(
            prom,
            lambda m: m["addin_agent_revision"][()] == revision
            and m["addin_agent_pending"][(("host", "Word"),)] == 1,
            "the assignment",
        )
        assert m["addin_agent_entitlements"][()] == 1
        assert m["addin_agent_installed"][(("host", "Word"),)] == 0
        assert m["addin_agent_messages_total"][(("result", "accepted"),)] >= 3
        assert m["addin_agent_subscriptions_refused_total"][()] == 0
    finally:
        if agent is not None:
            assert agent.stop() == 0
        server.stop()
    assert _read(prom)["addin_agent_connected"][()] == 0
    assert not list(tmp_path.glob(".agent.prom.*"))  # no temporary file left behind
