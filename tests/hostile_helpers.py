"""The world the hostile-input catalogue attacks: a Mosquitto with the server-generated password
and ACL files, `addin-server serve` and `addin-agent run` as real processes, and a few tools
(a synchronous MQTT client, a read-only view of the agent's cache, the CLIs).

Everything is real: the broker enforces the ACL, the server speaks HTTP on 127.0.0.1, the
agent is the daemon a workstation runs, with a SQLite cache and a folder applier.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from harness import AgentProcess, ServerProcess, stop_process
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties

from addin_runtime.sqlite_tx import readonly_uri
from simulator.mosquitto import MosquittoBroker

TENANT = "contoso"
T = f"addins/v1/{TENANT}"
ADMIN_TOKEN = "hostile-admin-token"
AGENT_TOKEN = "hostile-agent-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

TASKPANE = """<?xml version="1.0" encoding="UTF-8"?>
<OfficeApp xmlns="http://schemas.microsoft.com/office/appforoffice/1.1"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="TaskPaneApp">
  <Id>{id}</Id>
  <Version>{version}</Version>
  <ProviderName>Contoso</ProviderName>
  <DefaultLocale>en-US</DefaultLocale>
  <DisplayName DefaultValue="{name}"/>
  <Description DefaultValue="Hostile-input test add-in"/>
  <Hosts><Host Name="Document"/></Hosts>
  <DefaultSettings>
    <SourceLocation DefaultValue="{url}"/>
  </DefaultSettings>
  <Permissions>{permissions}</Permissions>
</OfficeApp>
"""


def addin_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"hostile:{name}"))


def manifest(
    name: str,
    version: str = "1.0.0.0",
    permissions: str = "ReadDocument",
    *,
    id: str | None = None,
    display: str | None = None,
    url: str | None = None,
) -> bytes:
    """A valid Word task-pane manifest unless an argument makes it otherwise."""
    return TASKPANE.format(
        id=id or addin_id(name),
        version=version,
        name=display or name,
        permissions=permissions,
        url=url or f"https://addins.contoso.com/{name}/index.html",
    ).encode()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `cond` (bounded in time) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.03)


# -- MQTT ----------------------------------------------------------------------------------


class Mqtt:
    """A small synchronous MQTT 5 client (paho, the library under aiomqtt)."""

    def __init__(
        self,
        port: int,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"hostile-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: list[tuple[str, bytes, bool]] = []
        self.granted: list[int] = []
        self._connack = threading.Event()
        self._suback = threading.Event()
        self.disconnected = threading.Event()
        self.reason: Any = None
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.port = port

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.reason = reason
        self._connack.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.disconnected.set()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
        self.granted = [int(getattr(c, "value", c)) for c in codes]
        self._suback.set()

    def connect(self) -> bool:
        """True when the broker accepted the CONNECT."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._connack.wait(10):
            raise AssertionError("no CONNACK within 10 s")
        return not self.reason.is_failure

    def publish(self, topic: str, payload: bytes, retain: bool = False, wait: float = 10) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(wait)

    def subscribe(self, *filters: str) -> list[int]:
        self._suback.clear()
        self.client.subscribe([(f, 1) for f in filters], properties=Properties(3))
        if not self._suback.wait(10):
            raise AssertionError("no SUBACK within 10 s")
        return self.granted

    def quiet(self, seconds: float = 0.2, limit: float = 5.0) -> None:
        """Wait until no message arrived for `seconds` (at most `limit` seconds)."""
        deadline = time.monotonic() + limit
        seen = len(self.messages)
        time.sleep(seconds)
        while time.monotonic() < deadline and seen != len(self.messages):
            seen = len(self.messages)
            time.sleep(seconds)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(port: int, username: str, password: str) -> dict[str, bytes]:
    """Every retained message under the tenant, as a fresh (server-account) subscriber sees it."""
    c = Mqtt(port, username, password)
    assert c.connect()
    try:
        c.subscribe(f"{T}/#")
        c.quiet(0.3)
        return {t: p for t, p, r in c.messages if r}
    finally:
        c.close()


# -- processes -------------------------------------------------------------------------------


def server_cli(db: Path | None, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args, *(["--db", str(db)] if db else [])],
        capture_output=True,
        text=True,
        timeout=60,
    )


def agent_cli(
    cache: Path, *args: str, config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    pre = ["--config", str(config)] if config else ["--cache", str(cache)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *pre, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "200"},
    )


class World:
    """Broker with ACL + server + one agent (user ann, client ann-pc), started in order."""

    def __init__(
        self, tmp: Path, server_env: dict[str, str] | None = None, agent_lines: tuple[str, ...] = ()
    ) -> None:
        self.tmp = tmp
        self.server_env = server_env or {}
        """Environment of `serve` (e.g. ADDIN_SERVER_SIGNING_KEY)."""
        self.agent_lines = agent_lines
        """Extra lines of the agent's agent.toml (e.g. its signing_key)."""
        self.db = tmp / "server.db"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.broker: MosquittoBroker | None = None
        self.http = httpx.Client(headers=ADMIN, timeout=20)

    # The users must exist before `broker-config` so that they get accounts.
    def start_broker(self, users: tuple[str, ...] = ("ann", "bob")) -> None:
        for i, u in enumerate(users):
            extra = ("--tenant", TENANT) if i == 0 else ()
            r = server_cli(self.db, "user", "add", u, *extra)
            assert r.returncode == 0, r.stderr
        cfg = self.tmp / "brokercfg"
        r = server_cli(self.db, "broker-config", str(cfg))
        assert r.returncode == 0, r.stderr
        self.creds: dict[str, Any] = json.loads((cfg / "credentials.json").read_text())
        self.acl = (cfg / "acl").read_text()
        self.broker = MosquittoBroker(
            self.tmp / "broker", password_file=cfg / "passwd", acl_file=cfg / "acl"
        )
        self.broker.start()
        # Sees every message the tenant's topics carry for the whole module.
        self.watcher = Mqtt(self.broker.port, *self.server_account)
        assert self.watcher.connect()
        self.watcher.subscribe(f"{T}/#")

    @property
    def server_account(self) -> tuple[str, str]:
        s = self.creds["server"]
        return s["username"], s["password"]

    def start_server(self) -> None:
        assert self.broker is not None
        serve = ServerProcess(
            self.db,
            self.broker.url,
            admin_token=ADMIN_TOKEN,
            agent_token=AGENT_TOKEN,
            admin_user="ann",
            broker_account=self.server_account,
            env=self.server_env,
        )
        self.server_log = serve.log
        serve.start()
        self.server = serve.proc
        assert self.server is not None
        self.procs.append(self.server)
        self.port = serve.port
        self.url = serve.url
        self.http = httpx.Client(base_url=self.url, headers=ADMIN, timeout=20)

    def call(self, method: str, path: str, expect: int = 200, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def upload(self, xml: bytes, expect: int = 200) -> Any:
        return self.call(
            "POST", "/v1/addins", expect, content=xml, headers={"Content-Type": "application/xml"}
        )

    def revision(self) -> int:
        return int(httpx.get(f"{self.url}/healthz", timeout=5).json()["revision"])

    def settle(self, timeout: float = 30.0, quiet: float = 1.0) -> None:
        """Until the watcher has a message of the latest revision and then none for `quiet`
        seconds: a test comparing what was published before and after it must not count the
        setup's late deliveries (on a loaded machine they arrived during the first test)."""
        rev = self.revision()
        deadline = time.monotonic() + timeout

        def revision_of(payload: bytes) -> object:
            try:
                return json.loads(payload).get("revision")
            except (ValueError, AttributeError):
                return None

        while not any(revision_of(p) == rev for _, p, _ in list(self.watcher.messages)):
            assert time.monotonic() < deadline, f"revision {rev} was not published"
            time.sleep(0.05)
        seen = -1
        while seen != len(self.watcher.messages):
            assert time.monotonic() < deadline, "the setup's messages kept arriving"
            seen = len(self.watcher.messages)
            time.sleep(quiet)

    def addins(self) -> Any:
        return self.call("GET", "/v1/addins")

    def start_agent(self) -> None:
        assert self.broker is not None
        self.cache = self.tmp / "ann-pc.sqlite"
        self.wef = self.tmp / "wef"
        self.sock = self.tmp / "agent.sock"
        self.agent_config = self.tmp / "agent.toml"
        self.agent_config.write_text(
            "\n".join(
                [
                    f'tenant = "{TENANT}"',
                    'user_id = "ann"',
                    'client_id = "ann-pc"',
                    "insecure = true",
                    f'broker_url = "{self.broker.url}"',
                    'broker_username = "ann"',
                    f'broker_password = "{self.creds["agents"]["ann"]}"',
                    f'server_url = "{self.url}"',
                    f'server_token = "{AGENT_TOKEN}"',
                    f'cache_path = "{self.cache}"',
                    'hosts = ["Word", "Excel"]',
                    'applier = "folder"',
                    f'applier_dir = "{self.wef}"',
                    f'control = "{self.sock}"',
                    *self.agent_lines,
                    "",
                ]
            )
        )
        self.agent_log = self.tmp / "agent.log"
        self.agent = AgentProcess(self.agent_config, self.agent_log).proc
        self.procs.append(self.agent)
        wait_for(lambda: self.cache.exists() and self.sync("connected") == 1, 20, "agent connects")

    # -- the agent's cache, read-only like the helpdesk reads it --------------------------
    def ro(self) -> sqlite3.Connection:
        conn = sqlite3.connect(readonly_uri(self.cache), uri=True, timeout=5)
        conn.row_factory = sqlite3.Row
        return conn

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        conn = self.ro()
        try:
            return [dict(r) for r in conn.execute(sql, args)]
        finally:
            conn.close()

    def sync(self, key: str) -> Any:
        try:
            r = self.rows("SELECT value FROM sync WHERE key = ?", (key,))
        except sqlite3.OperationalError:  # the daemon is still creating its schema
            return None
        return json.loads(r[0]["value"]) if r else None

    def last_event_id(self) -> int:
        return int(self.rows("SELECT coalesce(max(id), 0) AS n FROM events")[0]["n"])

    def events_after(self, after: int, kind: str | None = None) -> list[dict[str, Any]]:
        if kind is None:
            return self.rows("SELECT * FROM events WHERE id > ? ORDER BY id", (after,))
        return self.rows(
            "SELECT * FROM events WHERE id > ? AND kind = ? ORDER BY id", (after, kind)
        )

    def snapshot(self) -> dict[str, Any]:
        """The agent's durable state: what it holds, resolves, has installed and waits for."""
        return {
            "received": self.rows("SELECT topic, revision, payload FROM received ORDER BY topic"),
            "entitlements": self.rows(
                "SELECT addin_id, mode, version, sha256, permissions FROM entitlements "
                "ORDER BY addin_id"
            ),
            "installed": self.rows(
                "SELECT host, addin_id, version, sha256 FROM installed ORDER BY host, addin_id"
            ),
            "pending": self.rows(
                "SELECT host, addin_id, action, to_version, state FROM pending "
                "ORDER BY host, addin_id"
            ),
            "manifests": self.rows("SELECT sha256, status FROM manifests ORDER BY sha256"),
            "subscriptions": self.sync("subscriptions"),
        }

    def installed(self, host: str = "Word") -> dict[str, str]:
        rows = self.rows("SELECT addin_id, version FROM installed WHERE host = ?", (host,))
        return {r["addin_id"]: r["version"] for r in rows}

    def launch(self, host: str = "Word") -> dict[str, Any]:
        r = agent_cli(self.cache, "launch", host, "--json", config=self.agent_config)
        assert r.returncode == 0, r.stdout + r.stderr
        out: dict[str, Any] = json.loads(r.stdout)
        assert out["via"] == "daemon", out  # the running daemon applied it, not a side door
        return out

    def agent_alive(self) -> bool:
        return self.agent.poll() is None and bool(self.sync("connected") == 1)

    def stop(self) -> None:
        self.http.close()
        if self.broker is not None:
            self.watcher.close()
        for p in reversed(self.procs):
            stop_process(p)
        if self.broker is not None:
            self.broker.kill()
