"""A subscription the broker refuses in its SUBACK (an ACL, or a NATS node that could not make
the JetStream consumer in time) is not counted as held: the agent's transport logs it, keeps
the connection and its other subscriptions, and subscribes again later. Before, it recorded
the filter as subscribed and never received what it carries until a reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from server_helpers import eventually

from addin_core.user_topics import user_filters
from agent import transport as transport_mod
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.doctor import Check, check_subscriptions
from agent.readmodel import ReadModel
from agent.transport import Transport, refused_filters
from server_stub.broker_targets import write_nats_config
from simulator.nats_cluster import NatsCluster, NatsError, find_nats_server, free_nodes

TENANT = "contoso"
FILTERS = user_filters(TENANT, "ann", [])
EVERYONE = next(f for f in FILTERS if "/assign/everyone/" in f)


def publish_retained(
    port: int, topic: str, payload: bytes, login: tuple[str, str] | None = None
) -> None:
    c = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id="publisher", protocol=paho.MQTTv311
    )
    if login is not None:
        c.username_pw_set(*login)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        c.loop_stop()
        c.disconnect()


def test_refused_filters_reads_every_form_of_suback_code() -> None:
    class Code:
        def __init__(self, value: int) -> None:
            self.value = value

    assert refused_filters(["a", "b", "c"], [1, Code(0x87), 0x80]) == ["b", "c"]
    assert refused_filters(["a", "b"], [Code(1), Code(0)]) == []
    assert refused_filters(["a", "b"], [1]) == ["b"]  # no code at all: not confirmed


def make_transport(port: int, got: list[tuple[str, bytes]], login: tuple[str, str]) -> Transport:
    async def on_message(t: str, payload: bytes) -> None:
        got.append((t, payload))

    async def nothing(*_a: Any) -> None:
        return None

    return Transport(
        host="127.0.0.1", port=port, client_id="ann-pc", username=login[0], password=login[1],
        session_expiry=3600, keepalive=5, on_message=on_message, on_connect=nothing,
        on_disconnect=nothing, desired=lambda: set(FILTERS), clean_start_first=True,
        mqtt_version="3.1.1",
    )  # fmt: skip


@dataclass
class Node:
    """One NATS node whose permissions refuse ann's Everyone filter until `grant()`."""

    cluster: NatsCluster
    port: int
    ann: tuple[str, str]
    server: tuple[str, str]
    accounts: Path
    granted: str

    def grant(self) -> None:
        self.accounts.write_text(self.granted)
        node = self.cluster.procs[0]
        assert node is not None
        node.send_signal(signal.SIGHUP)  # nats-server reloads its configuration


@pytest.fixture
def refusing_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    """NATS answers a subscription outside the user's permissions (or one whose JetStream
    consumer it could not make) with SUBACK 0x80. (Mosquitto 2.0 grants a subscription its
    ACL denies and delivers nothing on it: no SUBACK to read there.)"""
    try:
        find_nats_server()
    except NatsError as e:
        pytest.skip(str(e))
    monkeypatch.setattr(transport_mod, "SUBSCRIBE_RETRY", (0.3, 1.0))
    nodes = free_nodes(1)
    creds = write_nats_config(tmp_path, TENANT, ["ann"], nodes)
    agents, server = creds["agents"], creds["server"]
    assert isinstance(agents, dict) and isinstance(server, dict)
    accounts = tmp_path / "accounts.conf"
    granted = accounts.read_text()
    everyone_subject = '"addins.v1.contoso.assign.everyone.*", '
    assert everyone_subject in granted
    accounts.write_text(granted.replace(everyone_subject, "", 1))
    cluster = NatsCluster(tmp_path, nodes, login=("ann", agents["ann"]))
    cluster.start()
    try:
        yield Node(cluster, nodes[0].mqtt.port, ("ann", agents["ann"]),
                   (server["username"], server["password"]), accounts, granted)  # fmt: skip
    finally:
        cluster.stop()


async def test_a_subscription_nats_refuses_is_retried_until_it_is_granted(
    refusing_node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    node = refusing_node
    got: list[tuple[str, bytes]] = []
    t = make_transport(node.port, got, node.ann)
    caplog.set_level(logging.WARNING, logger="addin_agent.transport")
    try:
        topic = EVERYONE.removesuffix("+") + "notes"
        await asyncio.to_thread(
            publish_retained, node.port, topic, b"everyone gets notes", node.server
        )
        t.start()
        await asyncio.wait_for(t.connected.wait(), 20)
        await eventually(lambda: t.refused_subscriptions >= 2, 10, "the refusal, retried")
        assert t.subscribed == FILTERS - {EVERYONE}
        assert f"refused the subscription to {EVERYONE}" in caplog.text
        attempts = t.attempts

        node.grant()
        await eventually(lambda: EVERYONE in t.subscribed, 15, "the subscription granted")
        await eventually(lambda: bool(got), 10, "the retained message")
        assert got == [(topic, b"everyone gets notes")]
        assert t.attempts == attempts  # on the same connection
    finally:
        await t.stop()


async def test_the_agent_records_the_refusal_and_doctor_names_it(
    tmp_path: Path, refusing_node: Node
) -> None:
    """The daemon's side: a `subscription_refused` event, the recorded subscriptions without
    the refused filter, and `doctor` failing on it until the broker grants it."""
    node = refusing_node
    cfg = AgentConfig(
        tenant=TENANT, user_id="ann", client_id="ann-pc", insecure=True,
        broker_url=f"mqtt://127.0.0.1:{node.port}", broker_username=node.ann[0],
        broker_password=node.ann[1], server_url="http://127.0.0.1:1",
        cache_path=str(tmp_path / "ann.sqlite"), applier="memory", control=None,
        watch_hosts=False, mqtt_version="3.1.1", anti_entropy_interval=0,
    )  # fmt: skip
    agent = Agent(cfg)

    def subscriptions_check() -> Check:
        with contextlib.closing(sqlite3.connect(cfg.cache_path)) as conn:
            return check_subscriptions(cfg, ReadModel(conn))

    await agent.start()
    try:
        # The connect records the subscriptions held, the refusal its event just after.
        await eventually(
            lambda: subscriptions_check().detail.startswith(
                f"missing {EVERYONE}: the broker refused it"
            ),
            15,
            "doctor naming the refusal",
        )
        assert subscriptions_check().status == "fail"
        with contextlib.closing(sqlite3.connect(cfg.cache_path)) as conn:
            details = [r[0] for r in conn.execute(
                "SELECT detail FROM events WHERE kind = 'subscription_refused'")]  # fmt: skip
        assert details and details[0] == f"broker refused: {EVERYONE}"

        node.grant()
        await eventually(lambda: subscriptions_check().status == "ok", 15, "doctor ok again")
    finally:
        await agent.stop()
