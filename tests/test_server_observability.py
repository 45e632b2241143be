"""/readyz and /metrics of a real `addin-server serve` process against a real Mosquitto:
readiness follows the broker (stopped -> 503 with the reason, restarted -> 200), and the
Prometheus text exposition, parsed back with prometheus_client's own parser, counts real
traffic (admin writes, manifest downloads, anti-entropy, an agent report over MQTT)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.publish as mqtt_publish
import pytest
from agent_helpers import manifest
from harness import ADMIN_TOKEN, AGENT_TOKEN, REPO, TENANT, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from addin_core.protocol import AgentReport, AppliedAddin, Host, Topic
from simulator.mosquitto import MosquittoBroker

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
AGENT = {"Authorization": f"Bearer {AGENT_TOKEN}"}


@pytest.fixture
def server(tmp_path: Path, broker: MosquittoBroker, db_target: str) -> Iterator[ServerProcess]:
    # On both backends: /readyz checks the database the server runs on.
    srv = ServerProcess(
        db_target,
        broker.url,
        log=tmp_path / "server.log",
        extra_args=("--ready-max-outbox-lag", "1"),
    )
    srv.start()
    yield srv
    srv.stop()


def _ready(server: ServerProcess, want: int, timeout: float = 20.0) -> dict[str, object]:
    """The /readyz body once it answers `want` (bounded in time)."""
    deadline = time.monotonic() + timeout
    r = httpx.get(f"{server.url}/readyz", timeout=5)
    while r.status_code != want and time.monotonic() < deadline:
        time.sleep(0.1)
        r = httpx.get(f"{server.url}/readyz", timeout=5)
    assert r.status_code == want, r.text
    body: dict[str, object] = r.json()
    return body


def test_readyz_follows_the_broker_and_the_outbox(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    body = _ready(server, 200)
    assert body["ready"] is True and body["reasons"] == []
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["database"] == {"ok": True, "detail": "reachable"}
    assert checks["broker"] == {"ok": True, "detail": "connected"}

    broker.stop()
    body = _ready(server, 503)
    assert body["ready"] is False
    reasons = body["reasons"]
    assert isinstance(reasons, list)
    assert any(r.startswith("broker: not connected (") for r in reasons), reasons
    # Liveness is not readiness: the process still answers /healthz.
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200

    # A change committed while the broker is away waits in the outbox past the threshold.
    r = httpx.post(f"{server.url}/v1/users", json={"id": "ann"}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reasons = httpx.get(f"{server.url}/readyz", timeout=5).json()["reasons"]
        if any(r.startswith("outbox: ") for r in reasons):
            break
        time.sleep(0.1)
    assert any("message(s) waiting" in r and "threshold 1 s" in r for r in reasons), reasons

    broker.start()
    body = _ready(server, 200)
    checks = body["checks"]
    assert isinstance(checks, dict) and checks["outbox"] == {"ok": True, "detail": "empty"}


def _scrape(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Every sample of /metrics: sample name -> sorted labels -> value."""
    r = httpx.get(f"{server.url}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def test_metrics_count_real_traffic(server: ServerProcess, broker: MosquittoBroker) -> None:
    _ready(server, 200)
    http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=10)
    xml = manifest("Metrics Pad", "1.2.0.0")
    added = http.post("/v1/addins", content=xml, headers={"Content-Type": "application/xml"})
    assert added.status_code == 200, added.text
    addin = added.json()["addin_id"]
    sha = http.get(f"/v1/addins/{addin}").json()["manifest_sha256"]
    assert http.post("/v1/users", json={"id": "ann"}).status_code == 200
    body = {"target": "everyone", "mode": "fixed"}
    assert http.post(f"/v1/addins/{addin}/assign", json=body).status_code == 200
    for _ in range(3):  # the first read fills the cache, the next two take the fast path
        assert httpx.get(f"{server.url}/v1/manifests/{sha}", headers=AGENT).status_code == 200
    etag = {"If-None-Match": f'"{sha}"', **AGENT}
    assert httpx.get(f"{server.url}/v1/manifests/{sha}", headers=etag).status_code == 304
    assert httpx.get(f"{server.url}/v1/agents/ann/digest", headers=AGENT).status_code == 200
    assert httpx.get(f"{server.url}/v1/agents/ann/state", headers=AGENT).status_code == 200
    revision = http.get("/healthz").json()["revision"]
    report = AgentReport(
        client_id="ann-pc",
        user_id="ann",
        revision=revision,
        reported_at=time.time(),
        applied=[AppliedAddin(addin_id=addin, version="1.2.0.0", host=Host.WORD)],
    )
    mqtt_publish.single(
        str(Topic.report(TENANT, "ann-pc")),
        report.to_bytes(),
        qos=1,
        hostname="127.0.0.1",
        port=broker.port,
    )
    deadline = time.monotonic() + 10
    m = _scrape(server)
    while not m.get("addin_devices") and time.monotonic() < deadline:
        time.sleep(0.1)
        m = _scrape(server)

    writes = m["addin_admin_writes_total"]
    assert writes[(("operation", "create_user"),)] == 1
    assert sum(writes.values()) == revision == 3
    assert m["addin_revision"][()] == revision
    assert m["addin_broker_connected"][()] == 1
    assert m["addin_published_messages_total"][()] >= 3
    assert m["addin_outbox_depth"][()] == 0
    assert m["addin_outbox_lag_seconds"][()] == 0
    assert m["addin_manifest_downloads_total"] == {
        (("status", "200"),): 3,
        (("status", "304"),): 1,
    }
    assert m["addin_antientropy_requests_total"] == {
        (("kind", "digest"),): 1,
        (("kind", "state"),): 1,
    }
    assert m["addin_agent_reports_received_total"][()] == 1
    assert m["addin_devices"] == {
        (("addin", addin), ("state", "installed"), ("version", "1.2.0.0")): 1
    }
    assert m["addin_devices_reporting"][(("state", "current"),)] == 1
    # Latency by route template, never by raw path (one series per route, not per hash).
    counts = m["addin_http_request_duration_seconds_count"]
    manifest_route = (
        ("method", "GET"),
        ("route", "/v1/manifests/{sha256}"),
        ("status", "200"),
    )
    assert counts[manifest_route] == 3
    assert all(sha not in json.dumps(labels) for labels in counts)
    _dashboard_uses_only(set(m))


def _dashboard_uses_only(exposed: set[str]) -> None:
    """Every metric the shipped Grafana dashboard queries is one the server exposes."""
    dashboard = json.loads((REPO / "packaging" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\baddin_[a-z_]+", e)}
    assert len(used) >= 10
    assert used <= exposed, used - exposed


def test_hostile_input_cannot_grow_the_metric_series(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    """Label values come from the server, never raw from a client: requests with made-up
    methods (no token needed) and reports naming thousands of made-up add-ins or versions
    each fold into one series, so /metrics stays small whatever the fleet sends."""
    _ready(server, 200)
    http = httpx.Client(base_url=server.url, headers=ADMIN, timeout=10)
    added = http.post(
        "/v1/addins",
        content=manifest("Metrics Pad", "1.2.0.0"),
        headers={"Content-Type": "application/xml"},
    )
    assert added.status_code == 200, added.text
    addin = added.json()["addin_id"]
    # httptools (the "fast" extra) parses only the methods it knows, WebDAV's among them;
    # h11, uvicorn's parser without it, takes any token as a method.
    for method in ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "COPY", "MOVE", "SEARCH", "PURGE"):
        r = httpx.request(method, f"{server.url}/v1/users", timeout=5)
        assert r.status_code in (401, 405), r.text
    made_up = [
        AppliedAddin(addin_id=f"fake-{i}", version="1.0.0.0", host=Host.WORD) for i in range(300)
    ]
    versions = [
        AppliedAddin(addin_id=addin, version=f"9.{i}.0.0", host=Host.EXCEL) for i in range(300)
    ]
    for client, applied in (("eve-pc", made_up + versions), ("ann-pc", made_up[:1])):
        report = AgentReport(
            client_id=client,
            user_id="eve",
            revision=0,
            reported_at=time.time(),
            applied=[*applied, AppliedAddin(addin_id=addin, version="1.2.0.0", host=Host.WORD)],
        )
        mqtt_publish.single(
            str(Topic.report(TENANT, client)), report.to_bytes(), qos=1,
            hostname="127.0.0.1", port=broker.port,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    m = _scrape(server)
    while sum(m.get("addin_devices", {}).values()) < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
        m = _scrape(server)
    assert m["addin_devices"] == {
        (("addin", addin), ("state", "installed"), ("version", "1.2.0.0")): 2,
        (("addin", addin), ("state", "installed"), ("version", "(other)")): 1,
        (("addin", "(unknown)"), ("state", "installed"), ("version", "(other)")): 2,
    }
    methods = {dict(labels)["method"] for labels in m["addin_http_request_duration_seconds_count"]}
    assert methods <= {"GET", "POST", "other"}, methods
    assert "other" in methods
