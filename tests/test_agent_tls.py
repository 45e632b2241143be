"""The agent over TLS against real components: a Mosquitto TLS listener that wants a client
certificate (its CN becomes the username) and an HTTPS server on loopback, with a throwaway
CA. The agent connects and receives retained state; a wrong CA or a refused device
certificate keeps it offline, says why in its log and events, and changes nothing it holds;
HTTPS requests verify the server and never send the token to one that fails."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from agent_helpers import addin_id, manifest, until
from harness import AgentProcess, agent_env
from tls_helpers import (
    HttpsServer,
    Issued,
    TestCA,
    client_context,
    mosquitto_tls_config,
    signing_pub,
)

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic
from agent.antientropy import AntiEntropy, compare_now, local_digest
from agent.cli import _run as run_daemon
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.doctor import check_broker, check_certificate, check_key_file, check_server
from agent.fetcher import Fetcher
from agent.state import ReceivedState
from agent.tls import explain, https_context, mqtt_context
from agent.transport import Loss, Transport
from simulator.mosquitto import MosquittoBroker, free_port

TENANT, USER, DEVICE = "contoso", "ann", "ann-laptop"
WAIT = 20.0
"""Seconds any wait for the broker or the daemon may take before the test fails."""


class Pki:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca, self.other = TestCA(), TestCA("another CA")
        self.device = self.ca.device(DEVICE)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(broker_factory: Callable[..., MosquittoBroker], pki: Pki) -> MosquittoBroker:
    return broker_factory(extra_config=mosquitto_tls_config(pki.ca, pki.folder / "broker"))


def mqtts(broker: MosquittoBroker) -> str:
    return f"mqtts://127.0.0.1:{broker.port}"


def secure_config(
    tmp_path: Path,
    broker: MosquittoBroker,
    pki: Pki,
    *,
    ca: TestCA | None = None,
    device: Issued | None = None,
    server_url: str | None = None,
    **kw: Any,
) -> AgentConfig:
    device = device or pki.device
    fields: dict[str, Any] = dict(
        tenant=TENANT,
        user_id=USER,
        client_id=DEVICE,
        broker_url=mqtts(broker),
        server_url=server_url or f"https://127.0.0.1:{free_port()}",
        server_token="device-token",
        signing_key=signing_pub(),
        tls_ca=(ca or pki.ca).cert_pem,
        tls_cert=device.cert_pem,
        tls_key=device.key_pem,
        cache_path=str(tmp_path / "cache.sqlite"),
        anti_entropy_interval=0,
    )
    fields.update(kw)
    return AgentConfig(**fields)


# -- state the broker holds -----------------------------------------------------------------

AID = addin_id("tables")
XML = manifest("tables")
SHA = hashlib.sha256(XML).hexdigest()
ENTRY = CatalogEntry(
    revision=1, committed_at=1.0, addin_id=AID, name="Contoso Tables", source=Source.LOB,
    version="1.0.0.0", manifest_sha256=SHA, manifest_url=f"/v1/manifests/{SHA}",
    hosts=[Host.WORD], permissions="ReadDocument", enabled=True,
)  # fmt: skip


async def publish_retained(broker: MosquittoBroker, pki: Pki, folder: Path) -> None:
    """The catalog entry and an Everyone assignment, retained, from a client of the CA."""
    ctx = client_context(pki.ca, pki.ca.device("publisher"), folder / "publisher")
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier="publisher", tls_context=ctx
    ) as c:
        await c.publish(str(Topic.catalog(TENANT, AID)), ENTRY.to_bytes(), qos=1, retain=True)
        everyone = Assignment(revision=2, committed_at=2.0, mode=Mode.FIXED)
        await c.publish(str(Topic.assign_everyone(TENANT, AID)), everyone.to_bytes(), qos=1, retain=True)  # fmt: skip


def transport(cfg: AgentConfig, seen: list[tuple[str, Loss]], got: list[str]) -> Transport:
    async def on_message(topic: str, _payload: bytes) -> None:
        got.append(topic)

    async def on_connect(_present: bool) -> None:
        pass

    async def on_disconnect(what: str, kind: Loss) -> None:
        seen.append((what, kind))

    return Transport(
        host=cfg.broker_host, port=cfg.broker_port, client_id=cfg.client_id, username=None,
        password=None, session_expiry=cfg.session_expiry, keepalive=cfg.keepalive,
        on_message=on_message, on_connect=on_connect, on_disconnect=on_disconnect,
        desired=lambda: {f"addins/v1/{TENANT}/catalog/+"}, clean_start_first=True,
        tls_context=mqtt_context(cfg),
    )  # fmt: skip


def refused_certificate(text: str) -> bool:
    """Whether `text` says the broker refused this device's certificate. With TLS 1.3 the
    broker's alert (unknown CA) arrives after the handshake, and may be lost when the
    client's CONNECT crosses the broker's close (the kernel resets the connection): both
    are explained as a refusal, the first with the alert's name."""
    named = (
        "the broker refused the connection (TLSV1_ALERT_UNKNOWN_CA): this device's "
        "certificate is not from the broker's CA"
    )
    lost = (
        "the broker closed the connection right after the handshake without answering: "
        "most likely it refused this device's certificate"
    )
    return (named in text or lost in text) and "addin-server enroll" in text


# -- MQTT --------------------------------------------------------------------------------------


async def test_a_secure_config_connects_over_tls_and_receives_retained_state(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki
) -> None:
    await publish_retained(tls_broker, pki, tmp_path)
    cfg = secure_config(tmp_path, tls_broker, pki)
    assert not cfg.insecure and cfg.broker_port == tls_broker.port
    seen: list[tuple[str, Loss]] = []
    got: list[str] = []
    t = transport(cfg, seen, got)
    t.start()
    try:
        await until(lambda: bool(got), timeout=WAIT, what="the retained catalog entry")
    finally:
        await t.stop()
    assert got == [str(Topic.catalog(TENANT, AID))] and seen == []
    # One context per process, however many agents use it (the simulator runs thousands).
    assert mqtt_context(secure_config(tmp_path, tls_broker, pki)) is t.tls_context


async def test_a_broker_refusing_the_device_certificate_says_so_at_once(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki
) -> None:
    """A certificate from another CA (or a revoked one): the broker's TLS alert arrives only
    after the handshake, and aiomqtt alone would report "Operation timed out" 10 s later."""
    stranger = pki.other.device(DEVICE)
    cfg = secure_config(tmp_path, tls_broker, pki, device=stranger)
    seen: list[tuple[str, Loss]] = []
    t = transport(cfg, seen, [])
    t.start()
    try:
        await asyncio.wait_for(t.first_attempt.wait(), WAIT)
        await until(lambda: bool(seen), timeout=WAIT, what="the loss reported")
    finally:
        await t.stop()
    what, kind = seen[0]
    assert kind == "tls_failed" and not t.connected.is_set()
    assert refused_certificate(what)


async def test_wrong_ca_keeps_the_agent_offline_with_its_last_state_and_says_why(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    await publish_retained(tls_broker, pki, tmp_path)
    # TLS with the device certificate; unsigned state (insecure = true) since signing the
    # test's messages is not what this test is about.
    good = secure_config(tmp_path, tls_broker, pki, insecure=True, signing_key=None)
    agent = Agent(good)
    await agent.start()
    try:
        await until(lambda: AID in agent.entitlements(), timeout=WAIT, what="the entitlement")
        assert agent.connected
    finally:
        await agent.stop()

    wrong = secure_config(tmp_path, tls_broker, pki, ca=pki.other, insecure=True, signing_key=None)
    agent = Agent(wrong)
    caplog.set_level(logging.ERROR, logger="addin_agent.transport")
    await agent.start()  # returns after the first attempt
    rows: list[Any] = []

    async def refused() -> bool:
        assert agent.cache is not None
        sql = "SELECT detail FROM events WHERE kind = 'tls_failed'"
        rows[:] = await agent.cache.fetchall(sql)
        return bool(rows)

    try:
        await until(refused, timeout=WAIT, what="a tls_failed event")
        assert not agent.connected
        assert set(agent.entitlements()) == {AID}  # the last good state, untouched
        assert agent.cache is not None
        last_error = await agent.cache.sync_value("last_error")
    finally:
        await agent.stop()
    detail = rows[0]["detail"]
    assert detail.startswith("TLS: the broker's certificate was not accepted (")
    assert "tls_ca is not the CA that issued it" in detail
    assert last_error is not None and "tls_ca" in last_error
    assert any(
        r.levelno == logging.ERROR and "certificate was not accepted" in r.getMessage()
        for r in caplog.records
    )


def test_doctor_checks_the_broker_over_tls(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki
) -> None:
    ok = check_broker(secure_config(tmp_path, tls_broker, pki))
    assert ok.status == "ok" and "over TLS, its certificate verified against tls_ca" in ok.detail
    wrong_ca = check_broker(secure_config(tmp_path, tls_broker, pki, ca=pki.other))
    assert wrong_ca.status == "fail"
    assert "the broker's certificate was not accepted" in wrong_ca.detail
    stranger = pki.other.device(DEVICE)
    refused = check_broker(secure_config(tmp_path, tls_broker, pki, device=stranger))
    assert refused.status == "fail" and refused_certificate(refused.detail)


def test_doctor_shows_the_device_certificate_and_warns_before_it_expires(
    tmp_path: Path, broker: MosquittoBroker, pki: Pki
) -> None:
    soon = pki.ca.device(DEVICE, days=10)
    cfg = secure_config(tmp_path, broker, pki, device=soon)
    check = check_certificate(cfg)
    assert check is not None and check.status == "warn"
    until_day = soon.cert.not_valid_after_utc
    assert f"CN={DEVICE}" in check.detail and f"expires {until_day:%Y-%m-%d}" in check.detail
    assert "renew it" in check.detail
    later = until_day + (until_day - soon.cert.not_valid_before_utc)
    expired = check_certificate(cfg, now=later)
    assert expired is not None and expired.status == "fail" and "expired" in expired.detail
    fine = check_certificate(secure_config(tmp_path, broker, pki))
    assert fine is not None and fine.status == "ok"
    plain = secure_config(tmp_path, broker, pki, insecure=True, tls_cert=None, tls_key=None)
    assert check_certificate(plain) is None


# -- HTTPS -------------------------------------------------------------------------------------


@pytest.fixture
def https_server(tmp_path: Path, pki: Pki) -> Iterator[HttpsServer]:
    empty = local_digest(ReceivedState(TENANT), USER)
    digest = {"digest": empty.digest, "revision": 0, "count": 0}
    server = HttpsServer(
        pki.ca.server("addins"),
        tmp_path / "https",
        {
            f"/v1/manifests/{SHA}": (200, XML),
            f"/v1/agents/{USER}/digest": (200, json.dumps(digest).encode()),
            "/healthz": (200, b'{"revision": 0}'),
        },
    )
    yield server
    server.close()


async def test_manifest_download_verifies_the_server_and_refuses_another_ca(
    tmp_path: Path, broker: MosquittoBroker, pki: Pki, https_server: HttpsServer
) -> None:
    cfg = secure_config(tmp_path, broker, pki, server_url=https_server.url)
    fetcher = Fetcher(cfg.server_url, cfg.server_token, ssl_context=https_context(cfg))
    try:
        result = await fetcher.fetch(ENTRY)
    finally:
        await fetcher.aclose()
    assert result.status == "verified" and result.xml == XML
    assert https_server.requests == [(f"/v1/manifests/{SHA}", "Bearer device-token")]

    wrong = secure_config(tmp_path, broker, pki, ca=pki.other, server_url=https_server.url)
    fetcher = Fetcher(wrong.server_url, wrong.server_token, ssl_context=https_context(wrong), attempts=2, base_delay=0.01)  # fmt: skip
    try:
        refused = await fetcher.fetch(ENTRY)
    finally:
        await fetcher.aclose()
    assert refused.status == "failed" and refused.reason is not None
    assert "TLS: the server's certificate was not accepted" in refused.reason
    assert len(https_server.requests) == 1  # the token never went to the unverified server


async def test_anti_entropy_and_doctor_verify_the_server(
    tmp_path: Path, broker: MosquittoBroker, pki: Pki, https_server: HttpsServer
) -> None:
    cfg = secure_config(tmp_path, broker, pki, server_url=https_server.url)
    agent = Agent(cfg)
    await agent.open()  # no broker: anti-entropy uses its own HTTPS client
    try:
        ae = AntiEntropy(agent, 600)
        result = await ae.check()
        await ae.stop()
    finally:
        await agent.stop()
    assert result.result == "ok", result.detail
    assert compare_now(cfg, ReceivedState(TENANT))[0] == "ok"
    assert check_server(cfg, 0)[0].status == "ok"

    wrong = secure_config(tmp_path, broker, pki, ca=pki.other, server_url=https_server.url)
    agent = Agent(wrong)
    await agent.open()
    try:
        ae = AntiEntropy(agent, 600)
        refused = await ae.check()
        await ae.stop()
    finally:
        await agent.stop()
    assert refused.result == "error"
    assert refused.detail.startswith("TLS: the server's certificate was not accepted")
    status, detail = compare_now(wrong, ReceivedState(TENANT))
    assert status == "warn" and "the server's certificate was not accepted" in detail
    server_check = check_server(wrong, 0)[0]
    assert server_check.status == "fail" and "certificate was not accepted" in server_check.detail
    assert len(https_server.requests) == 3  # only the three verified ones


# -- the daemon --------------------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(config), *args],
        env={**agent_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def wait_for_log(daemon: AgentProcess, pattern: str) -> str:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
        if re.search(pattern, text):
            return text
        assert daemon.proc.poll() is None, f"daemon exited:\n{daemon.log_tail()}"
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in the daemon's log:\n{daemon.log_tail()}")


def test_the_daemon_runs_from_an_enrollment_style_config(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki
) -> None:
    """Inline PEM, mqtts, https, signing key: `run` connects, `status` and `doctor` say it is
    secured, with no lab-mode warning."""
    toml = tmp_path / "agent.toml"
    fields = {
        "tenant": TENANT, "user_id": USER, "client_id": DEVICE, "broker_url": mqtts(tls_broker),
        "server_url": f"https://127.0.0.1:{free_port()}", "server_token": "device-token",
        "signing_key": signing_pub(), "tls_ca": pki.ca.cert_pem,
        "tls_cert": pki.device.cert_pem, "tls_key": pki.device.key_pem,
        "cache_path": "cache.sqlite", "anti_entropy_interval": 0,
    }  # fmt: skip
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items()))
    toml.chmod(0o600)
    daemon = AgentProcess(toml, tmp_path / "daemon.log")
    try:
        log = wait_for_log(daemon, rf"connected to 127\.0\.0\.1:{tls_broker.port} as {DEVICE}")
        status = cli(toml, "status")
        doctor = cli(toml, "doctor", "--json")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert "WARNING" not in log
    # doctor made no MQTT login: the broker binds the client id to the certificate, so one
    # would have taken over the daemon's session (the broker logs each login at once).
    logins = re.findall(r"New client connected .* as (\S+)", tls_broker.log_path.read_text())
    assert logins == [DEVICE]
    assert "Secure  yes: TLS to broker and server, signed state required" in status.stdout
    checks = {c["name"]: c for c in json.loads(doctor.stdout)}
    assert checks["security"]["status"] == "ok"
    assert checks["broker"]["status"] == "ok" and "over TLS" in checks["broker"]["detail"]
    assert checks["certificate"]["status"] == "ok"
    assert f"CN={DEVICE}" in checks["certificate"]["detail"]
    assert checks["private key"]["status"] == "ok"
    assert (
        "(it holds tls_key inline) is readable by its owner only (mode 0600)"
        in (checks["private key"]["detail"])
    )


def test_an_insecure_daemon_warns_once_at_start_and_status_says_so(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'tenant = "{TENANT}"\nuser_id = "{USER}"\nclient_id = "{DEVICE}"\ninsecure = true\n'
        f'broker_url = "{broker.url}"\nserver_url = "http://127.0.0.1:{free_port()}"\n'
        'cache_path = "cache.sqlite"\nanti_entropy_interval = 0\n'
    )
    daemon = AgentProcess(toml, tmp_path / "daemon.log")
    try:
        log = wait_for_log(daemon, rf"agent {DEVICE} for {TENANT}/{USER} running")
        status = cli(toml, "status")
        doctor = cli(toml, "doctor", "--json")
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1, log
    assert "WARNING addin_agent: insecure = true (lab mode): broker mqtt://" in warnings[0]
    assert "state messages accepted unsigned" in warnings[0]
    assert "Secure  no, insecure = true (lab mode): plain MQTT, plain HTTP, unsigned state" in (
        status.stdout
    )
    security = next(c for c in json.loads(doctor.stdout) if c["name"] == "security")
    assert security["status"] == "warn" and "insecure = true (lab mode)" in security["detail"]


async def test_a_key_file_gone_since_the_config_was_read_stops_the_start_in_one_line(
    tmp_path: Path, tls_broker: MosquittoBroker, pki: Pki
) -> None:
    crt, key = pki.device.write(tmp_path, "device")
    cfg = secure_config(tmp_path, tls_broker, pki, tls_cert=str(crt), tls_key=str(key))
    key.unlink()
    problem = await run_daemon(cfg)
    assert problem == f"agent {DEVICE} not started: tls_key: file {key} does not exist: " + (
        "give the path of a PEM file or the PEM text itself (-----BEGIN ...)"
    )
    broker_check = check_broker(cfg)  # doctor says the same instead of a traceback
    assert broker_check.status == "fail" and broker_check.detail.startswith("tls_key: file ")


@pytest.mark.parametrize(
    ("paho_text", "words"),
    [
        (
            "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert "
            "certificate revoked (_ssl.c:2580)",
            "refused the connection (SSLV3_ALERT_CERTIFICATE_REVOKED): this device's "
            "certificate is revoked; if this device was revoked it needs a new enrollment",
        ),
        (
            "failed to receive on socket: [SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert "
            "certificate expired (_ssl.c:2580)",
            "this device's certificate has expired",
        ),
        (
            "failed to receive on socket: [Errno 104] Connection reset by peer",
            "closed the connection right after the handshake without answering",
        ),
        ("[Errno 111] Connection refused", None),
    ],
)
def test_broker_refusals_in_words(paho_text: str, words: str | None) -> None:
    """What the broker's refusals (revocation is `addin-server revoke`'s) read like; a plain
    network failure is no TLS failure."""
    said = explain(paho_text, "broker")
    assert (said is None) if words is None else (said is not None and words in said)


def test_doctor_warns_about_a_private_key_others_can_read(
    tmp_path: Path, broker: MosquittoBroker, pki: Pki
) -> None:
    crt, key = pki.device.write(tmp_path, "device")  # 0600
    cfg = secure_config(tmp_path, broker, pki, tls_cert=str(crt), tls_key=str(key))
    ok = check_key_file(cfg, None)
    assert ok is not None and ok.status == "ok"
    key.chmod(0o644)
    loose = check_key_file(cfg, None)
    assert loose is not None and loose.status == "warn"
    assert loose.detail == (
        f"tls_key file {key} is readable by other users (mode 0644): chmod 600 {key}"
    )
