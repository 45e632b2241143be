"""The secure setup end to end, as real processes on loopback: `pki init`, `enroll`,
`broker-config --pki`, `broker run` (a real Mosquitto with TLS and client certificates),
`serve --pki` (HTTPS, publisher over mqtts), and `revoke` cutting a device off.

Clients here are plain aiomqtt clients holding a device's certificate, and httpx holding
its token: what a stolen device key or token allows is exactly what they can do."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import httpx
import pytest
from agent_helpers import until
from harness import stop_process

from addin_core.protocol import AgentReport
from server_stub.pki import init_pki, open_pki
from simulator.mosquitto import free_port

TIMEOUT = 60
WAIT = 15.0
"""Seconds a bounded wait below may take before the test fails."""
BASE = "addins/v1/contoso"


def addin_server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "server_stub", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = "server.db"
    return env


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}:\n{log.read_text()}"
            time.sleep(0.05)


@dataclass
class Tenant:
    dir: Path
    broker_port: int
    https: str
    broker: subprocess.Popen[bytes]

    @property
    def ca(self) -> Path:
        return self.dir / "pki" / "ca.crt"

    def verify(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def token(self, device: str) -> str:
        return str(tomllib.loads((self.dir / f"{device}.toml").read_text())["server_token"])

    def device_tls(self, device: str) -> ssl.SSLContext:
        """The TLS context an agent builds from its bundle: the CA, its cert and key."""
        cfg = tomllib.loads((self.dir / f"{device}.toml").read_text())
        (self.dir / f"{device}.crt").write_text(cfg["tls_cert"])
        (self.dir / f"{device}.key").write_text(cfg["tls_key"])
        ctx = self.verify()
        ctx.load_cert_chain(self.dir / f"{device}.crt", self.dir / f"{device}.key")
        return ctx

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.https, verify=self.verify(), timeout=10,
                            headers={"Authorization": "Bearer adm"})  # fmt: skip

    def broker_log(self) -> str:
        return (self.dir / "broker.log").read_text(errors="replace")

    def server_log(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")


@pytest.fixture
def tenant(tmp_path: Path) -> Iterator[Tenant]:
    """PKI; users ann and bob; devices ann-laptop, ann-desktop, bob-laptop; a TLS broker
    run by `addin-server broker run`; `serve --pki` over HTTPS publishing through it."""
    t = tmp_path
    addin_server("pki", "init", "pki", "--tenant", "contoso", cwd=t)
    addin_server("user", "add", "ann", "--tenant", "contoso", cwd=t)
    addin_server("user", "add", "bob", cwd=t)
    for user, device in (("ann", "ann-laptop"), ("ann", "ann-desktop"), ("bob", "bob-laptop")):
        addin_server("enroll", "--user", user, "--device", device, "--pki", "pki",
                     "-o", f"{device}.toml", cwd=t)  # fmt: skip
    addin_server("broker-config", "broker", "--pki", "pki", cwd=t)
    bport, hport = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with open(t / "broker.log", "wb") as blog, open(t / "server.log", "wb") as slog:
        try:
            broker = subprocess.Popen(
                [sys.executable, "-m", "server_stub", "broker", "run", "broker",
                 "--listen", f"127.0.0.1:{bport}"],
                cwd=t, env=_env(), stdout=blog, stderr=blog,
            )  # fmt: skip
            procs.append(broker)
            _wait_port(bport, broker, t / "broker.log")
            server = subprocess.Popen(
                [sys.executable, "-m", "server_stub", "serve", "--tenant", "contoso",
                 "--pki", "pki", "--broker", f"mqtts://127.0.0.1:{bport}",
                 "--listen", f"127.0.0.1:{hport}", "--admin-token", "adm"],
                cwd=t, env=_env(), stdout=slog, stderr=slog,
            )  # fmt: skip
            procs.append(server)
            _wait_port(hport, server, t / "server.log")
            yield Tenant(t, bport, f"https://127.0.0.1:{hport}", broker)
        finally:
            for p in reversed(procs):
                stop_process(p)


@asynccontextmanager
async def mqtt(t: Tenant, ctx: ssl.SSLContext, identifier: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        "127.0.0.1", t.broker_port, identifier=identifier, tls_context=ctx,
        protocol=aiomqtt.ProtocolVersion.V5, timeout=5,
    ) as client:  # fmt: skip
        yield client


async def refused(t: Tenant, ctx: ssl.SSLContext, identifier: str) -> bool:
    """Whether the broker refuses this TLS client (its alert ends the connection attempt)."""
    try:
        async with mqtt(t, ctx, identifier) as c:
            await c.subscribe(f"{BASE}/policy", timeout=5)
    except aiomqtt.MqttError:
        return True
    return False


class Inbox:
    """Every message a client receives, by topic, while the context is open."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.got: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for m in self.client.messages:
            self.got.append((str(m.topic), bytes(m.payload)))

    async def __aenter__(self) -> Inbox:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.got]

    async def wait_for(self, topic: str, count: int = 1) -> None:
        await until(lambda: self.topics().count(topic) >= count, WAIT, f"{count} x {topic}")


def member_of(t: Tenant, user: str, *groups: str) -> None:
    with t.admin() as http:
        for group in groups:
            r = http.post("/v1/groups", json={"id": group})
            assert r.status_code in (200, 409), r.text
            r = http.put(f"/v1/groups/{group}/members/{user}")
            assert r.status_code == 200, r.text


def test_device_token_reads_its_own_user_over_https_only(tenant: Tenant) -> None:
    t = tenant
    ann = {"Authorization": f"Bearer {t.token('ann-laptop')}"}
    with httpx.Client(base_url=t.https, verify=t.verify(), timeout=10) as http:
        assert http.get("/v1/agents/ann/digest", headers=ann).status_code == 200
        assert http.get("/v1/agents/ann/state", headers=ann).status_code == 200
        r = http.get("/v1/agents/bob/digest", headers=ann)
        assert r.status_code == 403 and "acts for user 'ann'" in r.json()["detail"]
        assert http.get("/v1/agents/bob/state", headers=ann).status_code == 403
        assert http.get("/v1/manifests/" + "0" * 64, headers=ann).status_code == 404
        assert http.get("/v1/users/ann", headers=ann).status_code == 401  # admin route
        assert http.get("/v1/agents/ann/digest", headers={"Authorization": "Bearer x"}).status_code == 401
        assert http.get("/v1/agents/ann/digest").status_code == 401
        bob = {"Authorization": f"Bearer {t.token('bob-laptop')}"}
        assert http.get("/v1/agents/bob/digest", headers=bob).status_code == 200
    with pytest.raises(httpx.HTTPError):  # no plain HTTP on the port
        httpx.get(t.https.replace("https", "http") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # the server's certificate is the tenant CA's only
        httpx.get(t.https + "/healthz", timeout=5)


async def test_tls_broker_binds_each_client_to_its_certificate(tenant: Tenant) -> None:
    t = tenant
    member_of(t, "ann", "sales")
    member_of(t, "bob", "sales")
    # ann-laptop's certificate with another client id: the broker uses the CN for both the
    # username and the client id, so it reads as ann-laptop and cannot take bob's session.
    async with mqtt(t, t.device_tls("bob-laptop"), "bob-laptop") as bob_client, \
            mqtt(t, t.device_tls("ann-laptop"), "bob-laptop") as ann_client, \
            Inbox(ann_client) as ann:  # fmt: skip
        await ann_client.subscribe(f"{BASE}/member/+", qos=1)
        await ann_client.subscribe(f"{BASE}/#", qos=1)
        await ann.wait_for(f"{BASE}/member/ann")  # retained, published by serve over mqtts
        assert json.loads(ann.got[0][1])["groups"] == ["sales"]
        report = AgentReport(client_id="ann-laptop", user_id="ann", revision=1,
                             reported_at=time.time(), applied=[])  # fmt: skip
        await ann_client.publish(f"{BASE}/report/ann-laptop", report.to_bytes(), qos=1)
        forged = AgentReport(client_id="bob-laptop", user_id="bob", revision=1,
                             reported_at=time.time(), applied=[])  # fmt: skip
        await ann_client.publish(f"{BASE}/report/bob-laptop", forged.to_bytes(), qos=1)
        await until(lambda: reports(t) == [("ann-laptop", "ann")], WAIT, "ann-laptop's report")
        # bob's own session is still there (no takeover by the client id "bob-laptop").
        await bob_client.publish(f"{BASE}/report/bob-laptop", forged.to_bytes(), qos=1, timeout=5)
        both = [("ann-laptop", "ann"), ("bob-laptop", "bob")]
        await until(lambda: reports(t) == both, WAIT, "bob-laptop's report")
    assert not [tp for tp in ann.topics() if tp.endswith("/bob") or "/report/" in tp]
    log = t.broker_log()
    assert "as ann-laptop (p5" in log and "u'ann-laptop'" in log
    assert log.count("as bob-laptop (p5") == 1  # bob's own connection only

    # ann-desktop, enrolled to ann, reporting as bob: stored by nobody.
    async with mqtt(t, t.device_tls("ann-desktop"), "ann-desktop") as c:
        lie = AgentReport(client_id="ann-desktop", user_id="bob", revision=1,
                          reported_at=time.time(), applied=[])  # fmt: skip
        await c.publish(f"{BASE}/report/ann-desktop", lie.to_bytes(), qos=1)
    refusal = "refused a report from client 'ann-desktop' claiming user 'bob': that device is enrolled to 'ann'"
    await until(lambda: refusal in t.server_log(), WAIT, "the refusal in the server log")
    assert ("ann-desktop", "bob") not in reports(t)


def reports(t: Tenant) -> list[tuple[str, str]]:
    with sqlite3.connect(t.dir / "server.db", timeout=10) as db:
        return [(str(c), str(u)) for c, u in
                db.execute("SELECT client_id, user_id FROM reports ORDER BY client_id")]  # fmt: skip


async def test_a_client_without_the_tenants_certificate_is_refused(
    tenant: Tenant, tmp_path: Path
) -> None:
    t = tenant
    assert await refused(t, t.verify(), "ann-laptop")  # no client certificate
    init_pki(tmp_path / "other", "contoso")  # another CA, same tenant name and device id
    other = open_pki(tmp_path / "other").issue_device("ann-laptop")
    (tmp_path / "o.crt").write_text(other.cert_pem)
    (tmp_path / "o.key").write_text(other.key_pem)
    ctx = t.verify()
    ctx.load_cert_chain(tmp_path / "o.crt", tmp_path / "o.key")
    assert await refused(t, ctx, "ann-laptop")
    assert not await refused(t, t.device_tls("ann-laptop"), "ann-laptop")


async def test_revoke_cuts_a_device_off_broker_and_http(tenant: Tenant) -> None:
    t = tenant
    member_of(t, "ann", "sales")
    laptop_tls = t.device_tls("ann-laptop")
    token = {"Authorization": f"Bearer {t.token('ann-laptop')}"}
    async with mqtt(t, laptop_tls, "ann-laptop") as laptop_client, \
            mqtt(t, t.device_tls("ann-desktop"), "ann-desktop") as desktop_client, \
            Inbox(laptop_client) as laptop, Inbox(desktop_client) as desktop:  # fmt: skip
        for c in (laptop_client, desktop_client):
            await c.subscribe(f"{BASE}/member/ann", qos=1)
        await laptop.wait_for(f"{BASE}/member/ann")
        await desktop.wait_for(f"{BASE}/member/ann")

        reloads = t.broker_log().count("Reloading config.")
        r = addin_server("revoke", "ann-laptop", "--pki", "pki", "--broker-dir", "broker",
                         cwd=t.dir)  # fmt: skip
        assert f"sent SIGHUP to the broker (pid {t.broker.pid})" in r.stdout, r.stdout
        # Mosquitto logs this line as it re-reads its files, before it handles anything else.
        await until(lambda: t.broker_log().count("Reloading config.") > reloads, WAIT, "reload")
        async with httpx.AsyncClient(base_url=t.https, verify=t.verify(), timeout=10) as http:
            assert (await http.get("/v1/agents/ann/digest", headers=token)).status_code == 401
        # The next change for ann reaches her other device, not the revoked one.
        member_of(t, "ann", "eng")
        await desktop.wait_for(f"{BASE}/member/ann", 2)
        await asyncio.sleep(1.0)  # what the laptop would have got arrives with the desktop's
        assert laptop.topics() == [f"{BASE}/member/ann"]
    await until(lambda: refused(t, laptop_tls, "ann-laptop"), WAIT, "the broker refusing it")
    assert not await refused(t, t.device_tls("ann-desktop"), "ann-desktop")
