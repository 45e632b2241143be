"""One daemon per state file, and what happens when two clients share one MQTT client id:
real `addin-agent run` and `addin-server serve` processes against a real Mosquitto."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent_helpers import until
from harness import AgentProcess, ServerProcess, server_command

from addin_runtime.reconnect import Backoff
from agent import transport
from agent.cache import Cache, Retention, Tx, open_readonly
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.doctor import check_client_id
from agent.readmodel import ReadModel
from server_stub import publisher
from server_stub.publisher import Publisher
from simulator.mosquitto import MosquittoBroker, free_port


def write_config(path: Path, broker: MosquittoBroker, cache: Path, control: Path | None) -> Path:
    path.write_text(
        f"""
tenant = "contoso"
user_id = "ann"
client_id = "ann-laptop"
insecure = true
broker_url = "{broker.url}"
server_url = "http://127.0.0.1:{free_port()}"
cache_path = "{cache}"
hosts = ["Word"]
"""
        + (f'control = "{control}"\n' if control else "")
    )
    return path


class Daemon(AgentProcess):
    """`addin-agent run` as a real process."""

    def __init__(self, cfg: Path, log: Path) -> None:
        super().__init__(cfg, log, env={**os.environ, "ADDIN_AGENT_CONFIG": ""})

    def wait_exit(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the second daemon kept running; log:\n{self.log.read_text()}"
            ) from None

    def stop(self, timeout: float = 20.0) -> int:
        return super().stop(timeout)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for d in made:
        d.stop()


def socket_answers(sock: Path) -> bool:
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=5) as h:
            return h.get("http://agent/v1/status").status_code == 200
    except httpx.TransportError:
        return False


def wait_for_socket(sock: Path, daemon: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not socket_answers(sock):
        assert daemon.proc.poll() is None, daemon.log.read_text()
        assert time.monotonic() < deadline, f"no control socket; log:\n{daemon.log.read_text()}"
        time.sleep(0.1)


def events(cache: Path, kind: str) -> int:
    conn = open_readonly(cache)
    try:
        return int(conn.execute("SELECT count(*) FROM events WHERE kind=?", (kind,)).fetchone()[0])
    finally:
        conn.close()


def test_second_agent_is_refused_and_the_first_keeps_its_socket(
    tmp_path: Path, broker: MosquittoBroker, daemons: list[Daemon]
) -> None:
    cache, sock = tmp_path / "cache.sqlite", tmp_path / "agent.sock"
    cfg = write_config(tmp_path / "agent.toml", broker, cache, sock)
    first = Daemon(cfg, tmp_path / "first.log")
    daemons.append(first)
    wait_for_socket(sock, first)

    # The same config: refused on the cache's lock, naming the holder.
    second = Daemon(cfg, tmp_path / "second.log")
    daemons.append(second)
    assert second.wait_exit() == 1
    out = second.log.read_text()
    assert "Traceback" not in out
    assert out.strip() == (
        f"error: another addin-agent (pid {first.proc.pid}) is running on cache {cache}: one "
        "agent per cache; stop it first, or give this one its own cache_path and client_id"
    )

    # Its own cache but the same control socket: refused on the socket, which it leaves alone.
    other = write_config(tmp_path / "other.toml", broker, tmp_path / "other.sqlite", sock)
    third = Daemon(other, tmp_path / "third.log")
    daemons.append(third)
    assert third.wait_exit() == 1
    out = third.log.read_text()
    assert "Traceback" not in out
    assert f"error: control socket {sock} is in use by another process" in out
    assert out.count("\n") == 1, out

    assert socket_answers(sock), "the first daemon lost its control socket"
    # Neither refused daemon connected under the first one's client id.
    assert events(cache, "session_taken_over") == 0
    assert first.proc.poll() is None
    assert first.stop() == 0
    assert not sock.exists()
    assert not (tmp_path / "cache.sqlite.lock").read_text()  # pid cleared at exit


def test_stopping_an_agent_never_removes_a_socket_it_does_not_own(
    tmp_path: Path, broker: MosquittoBroker, daemons: list[Daemon]
) -> None:
    sock = tmp_path / "agent.sock"
    first = Daemon(
        write_config(tmp_path / "a.toml", broker, tmp_path / "a.sqlite", sock),
        tmp_path / "a.log",
    )
    daemons.append(first)
    wait_for_socket(sock, first)
    # Someone (an operator, a package upgrade) moves the socket and another daemon takes the
    # path; the first one's stop must not delete the newcomer's socket.
    sock.rename(tmp_path / "moved.sock")
    second = Daemon(
        write_config(tmp_path / "b.toml", broker, tmp_path / "b.sqlite", sock),
        tmp_path / "b.log",
    )
    daemons.append(second)
    wait_for_socket(sock, second)
    assert first.stop() == 0
    assert socket_answers(sock), "stopping the first daemon deleted the second one's socket"
    assert second.stop() == 0
    assert not sock.exists()


def test_second_server_on_one_database_is_refused(tmp_path: Path, broker: MosquittoBroker) -> None:
    db = tmp_path / "server.db"
    first = ServerProcess(db, broker.url, admin_token="adm", agent_token="agt")
    first.start()
    port = first.port
    try:
        second_cmd = server_command(
            db, broker.url, free_port(), admin_token="adm", agent_token="agt"
        )
        try:
            second = subprocess.run(second_cmd, capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("the second server kept running") from None
        err = second.stderr
        assert second.returncode == 1
        assert err.strip() == (
            f"error: another addin-server serve (pid {first.pid}) is running on {db}: "
            "one server per database; stop it first"
        )
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        first.stop(20)


def test_backoff_grows_across_flapping_connections() -> None:
    now = [0.0]
    b = Backoff(0.5, 60.0, stable_after=30.0, uniform=lambda lo, hi: hi, clock=lambda: now[0])
    delays = []
    for _ in range(6):  # connected, dropped a second later, six times
        b.connected()
        now[0] += 1.0
        delays.append(b.failed())
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
    b.connected()
    now[0] += 31.0  # a connection that lasted: the next loss starts from the bottom
    assert b.failed() == 1.0
    assert [b.failed() for _ in range(8)][-1] == 60.0  # capped


async def test_two_agents_with_one_client_id_back_off_and_say_why(
    tmp_path: Path,
    broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Small delays so the test sees several takeovers in seconds; the rule is the same.
    monkeypatch.setattr(transport, "MIN_BACKOFF", 0.05)
    monkeypatch.setattr(transport, "MAX_BACKOFF", 1.0)
    caplog.set_level(logging.INFO, logger="addin_agent.transport")

    def config(name: str) -> AgentConfig:
        return AgentConfig(
            tenant="contoso",
            user_id="ann",
            client_id="ann-laptop",  # the same for both: a copied agent.toml
            insecure=True,
            broker_url=broker.url,
            server_url=f"http://127.0.0.1:{free_port()}",
            cache_path=str(tmp_path / f"{name}.sqlite"),
            anti_entropy_interval=0,
        )

    a, b = Agent(config("a")), Agent(config("b"))
    try:
        await a.start()
        await b.start()
        # Each successful CONNECT is followed by the other's: only a backoff that does not
        # restart at every CONNECT reaches 6 failures in a row.
        await until(
            lambda: a.transport.backoff.failures >= 6 and b.transport.backoff.failures >= 6,
            timeout=60,
            what="six failures in a row on each agent",
        )
    finally:
        await a.stop()
        await b.stop()
    # Mosquitto 2.0.15+ says why (reason 0x8E); older ones just close the connection.
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "another client connected with our client id 'ann-laptop' and the broker "
        "disconnected us (MQTT reason 0x8E, session taken over)"
        in m
        or "without a reason: probably another client uses our client id 'ann-laptop'" in m
        for m in said
    ), said
    conn = open_readonly(tmp_path / "a.sqlite")
    try:
        kinds = {
            r[0]
            for r in conn.execute(
                "SELECT kind FROM events WHERE kind IN "
                "('session_taken_over', 'connection_flapping')"
            )
        }
        check = check_client_id(config("a"), ReadModel(conn))
    finally:
        conn.close()
    assert kinds
    assert check.status == "fail"
    assert "client id 'ann-laptop'" in check.detail


async def test_two_publishers_of_one_tenant_back_off_and_say_why(
    tmp_path: Path,
    broker: MosquittoBroker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two servers of one tenant on two databases (the lock cannot see that) share the
    publisher's client id."""
    monkeypatch.setattr(publisher, "BACKOFF", (0.05, 1.0))
    caplog.set_level(logging.INFO, logger="addin_server.publisher")
    pubs = [Publisher(tmp_path / f"{n}.db", "contoso", broker.url) for n in ("a", "b")]
    tasks = [asyncio.create_task(p.run()) for p in pubs]
    try:
        await until(
            lambda: all(p.taken_over >= 3 for p in pubs),
            timeout=60,
            what="three takeovers said of each publisher",
        )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "client id 'addin-server-contoso'" in m and "another addin-server of tenant contoso" in m
        for m in said
    ), said


async def test_reason_0x8e_is_logged_in_plain_words(caplog: pytest.LogCaptureFixture) -> None:
    """A broker that sends DISCONNECT 0x8E (Mosquitto 2.0.15+, EMQX, HiveMQ): a minimal
    MQTT 5 peer that accepts the CONNECT and then hands the session to 'someone else'."""

    async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        length, shift = 0, 0
        while True:  # remaining length, a variable byte integer
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        await reader.readexactly(length)
        writer.write(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: accepted, no properties
        await writer.drain()
        # Later, as when the other client connects (aiomqtt drops a DISCONNECT that comes
        # in the same read as the CONNACK).
        await asyncio.sleep(0.5)
        writer.write(bytes([0xE0, 2, 0x8E, 0]))  # DISCONNECT: session taken over
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()

    server = await asyncio.start_server(peer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lost: list[tuple[str, str]] = []

    async def nothing(*_: object) -> None:
        pass

    async def on_disconnect(what: str, kind: str) -> None:
        lost.append((what, kind))

    t = transport.Transport(
        host="127.0.0.1", port=port, client_id="ann-laptop", username=None, password=None,
        session_expiry=7 * 86400, keepalive=60, on_message=nothing, on_connect=nothing,
        on_disconnect=on_disconnect, desired=set, clean_start_first=True,
        min_backoff=5.0, max_backoff=5.0,
    )  # fmt: skip
    t.start()
    try:
        await until(lambda: bool(lost), timeout=20, what="the disconnect")
    finally:
        await t.stop()
        server.close()
    what, kind = lost[0]
    assert kind == "session_taken_over"
    assert what == (
        "another client connected with our client id 'ann-laptop' and the broker disconnected "
        "us (MQTT reason 0x8E, session taken over): two processes share this client id"
    )
    assert t.taken_over == 1


def test_agent_event_log_is_pruned_at_start(
    tmp_path: Path, broker: MosquittoBroker, daemons: list[Daemon]
) -> None:
    cache, sock = tmp_path / "cache.sqlite", tmp_path / "agent.sock"

    async def fill() -> None:
        c = await Cache.open(cache)
        tx = Tx()
        old = time.time() - 40 * 86400
        for i in range(300):
            tx.event("disconnected", f"old {i}")
            tx.statements[-1] = (tx.statements[-1][0], (old, *tx.statements[-1][1][1:]))
        for i in range(12_000):
            tx.event("disconnected", f"recent {i}")
        await c.commit(tx)
        await c.close()

    asyncio.run(fill())
    cfg = write_config(tmp_path / "agent.toml", broker, cache, sock)
    daemon = Daemon(cfg, tmp_path / "daemon.log")
    daemons.append(daemon)
    wait_for_socket(sock, daemon)
    assert daemon.stop() == 0
    conn = sqlite3.connect(cache)
    n, oldest = conn.execute("SELECT count(*), min(at) FROM events").fetchone()
    conn.close()
    assert oldest > time.time() - 31 * 86400  # 30 days kept
    assert n <= 10_000 + 20  # at most 10,000 rows, plus what this run wrote


async def test_agent_event_log_is_pruned_as_it_grows(tmp_path: Path) -> None:
    cache = await Cache.open(tmp_path / "c.sqlite", Retention(rows=100, every=50))
    try:
        for i in range(1000):
            tx = Tx()
            tx.event("disconnected", f"flap {i}")
            await cache.commit(tx)
        rows = await cache.fetchall("SELECT count(*) n FROM events")
    finally:
        await cache.close()
    assert 100 <= rows[0]["n"] <= 150
