"""Several `addin-server serve` replicas on one PostgreSQL database.

Every replica serves the API and accepts admin writes (their transactions are serialized by
the database, `server_stub/pg.py`). Exactly one replica, the *leader*, drains the outbox: the
one holding `LEADER_LOCK`, a session-level advisory lock taken on a connection of its own.
PostgreSQL drops the lock the moment that connection ends, so a replica that is SIGKILLed
(or cut off from the database) is replaced by the next one that polls for it, within
`LEADER_POLL` seconds. The leader publishes under the server's one MQTT client id, as a
single server does: a second publisher connecting with that id makes the broker close the
first one's connection, which fences a former leader that has not yet noticed it lost the
lock. A leader also checks its lock connection every `LEADER_CHECK` seconds and stops
publishing the moment it fails. That connection also listens for the commits of every
replica (`server_stub/pg.py`, `OUTBOX_CHANNEL`), which wake the publisher.

The agents' reports are shared: each replica subscribes to
``$share/<server id>/addins/v1/<tenant>/report/+`` (MQTT 5 shared subscription, Mosquitto 2)
with a client id of its own, so the broker hands each report to one replica. With --pki
the broker takes the client id from the certificate (`use_username_as_clientid`), so every
replica would connect as the same client and take the others' connections: there the
leader's publishing session takes all reports (`report/+`) and the others none.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

import aiomqtt
import psycopg
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from addin_core.protocol import AgentReport, Filters, ProtocolError, decode_message, server_identity
from addin_runtime.reconnect import Backoff
from server_stub.db_target import describe
from server_stub.loop_thread import WritesFirst
from server_stub.pg import CONNECT_TIMEOUT, LEADER_LOCK, OUTBOX_CHANNEL
from server_stub.reports import ReportIntake, ReportSink

log = logging.getLogger("addin_server.replicas")

LEADER_POLL = 0.5
"""Seconds between a standby's attempts to take the outbox."""
LEADER_CHECK = 1.0
"""Seconds between the leader's checks that it still holds the outbox."""


class LeadershipLost(RuntimeError):
    """The leader's lock connection failed: another replica may hold the outbox now."""


class Leadership:
    """The outbox leader lock of one database, on a connection of its own."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def acquire(self) -> None:
        """Wait until this replica holds the lock (reconnecting to PostgreSQL as needed)."""
        backoff = Backoff(LEADER_POLL, 5.0)
        announced = False
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
                    )
                cur = await self._conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", LEADER_LOCK
                )
                row = await cur.fetchone()
                if row is not None and row[0]:
                    return
                if not announced:
                    log.info("standing by: another replica drains the outbox")
                    announced = True
                await asyncio.sleep(LEADER_POLL)
            except psycopg.OperationalError as e:
                await self.release()
                delay = backoff.failed()
                log.warning("cannot reach %s for the outbox lock (%s); retrying in %.1fs",
                            describe(self.url), e, delay)  # fmt: skip
                await asyncio.sleep(delay)

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` at each commit on the database (any replica's, or a CLI's); return
        only by raising `LeadershipLost`, when the lock's connection fails."""
        assert self._conn is not None
        try:
            await self._conn.execute(f"LISTEN {OUTBOX_CHANNEL}")
            while True:
                async with asyncio.timeout(LEADER_CHECK + CONNECT_TIMEOUT):
                    async for _ in self._conn.notifies(timeout=LEADER_CHECK):
                        wake()
                    await self._conn.execute("SELECT 1")
        except (psycopg.Error, TimeoutError) as e:
            raise LeadershipLost(f"the outbox lock's connection failed: {e}") from None

    async def release(self) -> None:
        """Closing the connection releases the lock."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await conn.close()
            except psycopg.Error:
                pass


def shared_reports_filter(tenant: str) -> str:
    return f"$share/{server_identity(tenant)}/{Filters.reports(tenant)}"


class SharedReports:
    """A replica's share of the agents' reports: a subscription in the shared group, on a
    connection with a client id of its own and no persistent session (a report offered to
    a replica that is gone goes to another; agents report again anyway)."""

    def __init__(
        self,
        tenant: str,
        host: str,
        port: int,
        sink: ReportSink,
        *,
        username: str | None = None,
        password: str | None = None,
        writes_first: WritesFirst | None = None,
    ) -> None:
        self.tenant = tenant
        self.host, self.port = host, port
        self.writes_first = writes_first
        """`serve` runs this on its MQTT thread: a fleet's reports step aside for writes."""
        self.username, self.password = username, password
        self.sink = sink
        self.client_id = f"{server_identity(tenant)}-{secrets.token_hex(4)}"
        self.connected = asyncio.Event()
        self.received = 0

    def _client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=props,
            timeout=30,
        )

    async def run(self) -> None:
        """Receive reports until cancelled, reconnecting after a lost broker."""
        intake = ReportIntake(self.sink)
        store = asyncio.create_task(intake.run(), name="store reports")
        backoff = Backoff(0.2, 5.0)
        try:
            while True:
                try:
                    async with self._client() as client:
                        backoff.connected()
                        await client.subscribe(shared_reports_filter(self.tenant), qos=1)
                        self.connected.set()
                        async for message in client.messages:
                            try:
                                _, payload = decode_message(
                                    str(message.topic), bytes(message.payload)
                                )
                            except ProtocolError as e:
                                log.warning("ignoring invalid report: %s", e)
                                continue
                            if isinstance(payload, AgentReport):
                                self.received += 1
                                intake.offer(payload)
                            if self.writes_first is not None:
                                self.writes_first.step_aside()
                except aiomqtt.MqttError as e:
                    self.connected.clear()
                    delay = backoff.failed()
                    log.warning("report subscription lost (%s); retrying in %.1fs", e, delay)
                    await asyncio.sleep(delay)
        finally:
            store.cancel()
            await asyncio.gather(store, return_exceptions=True)
