"""`broker-config --target mosquitto-bridge` and `--target nats`: brokers past one Mosquitto.

Both log in with the passwords of ``credentials.json`` (`write_credentials`) and grant
topics from the rules of `server_stub.broker_rules`, as the Mosquitto ACL does.

**Mosquitto bridge tree** (Mosquitto's own way to scale): the server publishes to a core
broker; agents connect to regional brokers, each bridged to the core. State topics flow
core -> regions (``topic ... in``), report topics regions -> core (``... out``). Every
regional broker keeps the state retained and the agents' sessions, so a region keeps
serving its agents while its bridge is down and catches up when it returns. Files:
``core/`` and ``region-N/``, each with ``mosquitto.conf``, ``passwd`` and ``acl``; the
core also has one account per bridge, which reads every agent topic and writes reports.

**NATS** (its MQTT gateway keeps sessions and retained messages in JetStream, replicated
across a cluster): ``nats-N.conf`` per node (server name, client, cluster and MQTT
listeners, routes to the other nodes, JetStream store) and ``accounts.conf`` they include:
one account for the tenant with JetStream, the server's user and one user per agent, each
with the publish/subscribe permissions of its rules. Limits of nats-server 2.9 (Debian 12):
its MQTT speaks 3.1.1 and QoS 0/1 only (the programs fall back to 3.1.1 by themselves), and
it refuses topics with a ``.`` (2.10 maps them to ``//``, which the permissions already
use): ids with dots need nats-server 2.10 or later. In password mode NATS cannot tie a
client id to a user, so an agent may publish to any report topic (as in Mosquitto's lab
mode the ACL cannot tie it either; the server checks each report's user and client).
"""

from __future__ import annotations

import json
import os
import pwd
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from server_stub.broker_config import (
    BrokerConfigError,
    acl_text,
    hash_password,
    write_credentials,
)
from server_stub.broker_rules import (
    AGENT_RULES,
    SERVER_RULES,
    Rule,
    fill,
    mosquitto_lines,
    nats_permissions,
)

TARGETS = ("mosquitto", "mosquitto-bridge", "nats")


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str) -> Listen:
        host, _, port = text.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise BrokerConfigError(f"{what} {text!r} must look like HOST:PORT")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NatsNode:
    mqtt: Listen
    client: Listen
    cluster: Listen

    @classmethod
    def parse(cls, text: str) -> NatsNode:
        """``mqtt=HOST:PORT,client=HOST:PORT,cluster=HOST:PORT``."""
        parts: dict[str, Listen] = {}
        for item in text.split(","):
            key, _, value = item.partition("=")
            if key not in ("mqtt", "client", "cluster") or key in parts:
                raise BrokerConfigError(
                    f"--node {text!r} must look like "
                    "mqtt=HOST:PORT,client=HOST:PORT,cluster=HOST:PORT"
                )
            parts[key] = Listen.parse(value, f"--node {key}")
        if len(parts) != 3:
            raise BrokerConfigError(f"--node {text!r} needs mqtt=, client= and cluster=")
        return cls(parts["mqtt"], parts["client"], parts["cluster"])


def default_nats_nodes(count: int) -> list[NatsNode]:
    """Loopback nodes on ports outside Linux's ephemeral range: MQTT 18883+i, NATS
    clients 14222+i, cluster routes 16222+i."""
    loop = "127.0.0.1"
    return [
        NatsNode(Listen(loop, 18883 + i), Listen(loop, 14222 + i), Listen(loop, 16222 + i))
        for i in range(count)
    ]


def default_bridge_nodes(regions: int) -> list[Listen]:
    """The core on 127.0.0.1:18883, region i on 18884+i."""
    return [Listen("127.0.0.1", 18883 + i) for i in range(regions + 1)]


# -- Mosquitto bridge tree ---------------------------------------------------------------------


def bridge_account(tenant: str, region: int) -> str:
    return f"addin-bridge-{tenant}-{region}"


def write_bridge_config(
    directory: Path, tenant: str, user_ids: Iterable[str], nodes: Sequence[Listen]
) -> dict[str, object]:
    """The core's and every region's files for `nodes` (the core first); what was written."""
    if len(nodes) < 2:
        raise BrokerConfigError("a bridge tree needs the core and at least one region")
    creds = write_credentials(directory, tenant, user_ids)
    bridges = _bridge_passwords(directory, tenant, len(nodes) - 1)
    server, agents = creds["server"], creds["agents"]
    assert isinstance(server, dict) and isinstance(agents, dict)
    agent_lines = [f"{uid}:{hash_password(pw)}" for uid, pw in agents.items()]
    core, regions = nodes[0], nodes[1:]
    core_dir = directory / "core"
    core_dir.mkdir(exist_ok=True)
    _write_private(
        core_dir / "passwd",
        "\n".join(
            [
                f"{server['username']}:{hash_password(server['password'])}",
                *(f"{u}:{hash_password(p)}" for u, p in bridges.items()),
                *agent_lines,
            ]
        )
        + "\n",
    )
    bridge_acl = []
    for account in bridges:
        # A bridge carries every agent's topics: the agent rules with every id a wildcard.
        bridge_acl += ["", f"user {account}"]
        bridge_acl += mosquitto_lines(AGENT_RULES, tenant, keyword="topic", user="+", client="+")
    (core_dir / "acl").write_text(acl_text(tenant) + "\n".join(bridge_acl) + "\n")
    _write_private(core_dir / "mosquitto.conf", _mosquitto_conf(core_dir, core, []))
    written = [str(core_dir)]
    for i, listen in enumerate(regions, start=1):
        region_dir = directory / f"region-{i}"
        region_dir.mkdir(exist_ok=True)
        _write_private(region_dir / "passwd", "\n".join(agent_lines) + "\n")
        (region_dir / "acl").write_text(acl_text(tenant))
        account = bridge_account(tenant, i)
        bridge = [
            "",
            "# The bridge to the core: state comes in, reports go out.",
            f"connection core-{i}",
            f"address {core}",
            f"remote_username {account}",
            f"remote_password {bridges[account]}",
            f"remote_clientid {account}",
            # A persistent session on the core: state published while the link is down
            # is queued for the region, and retained state is resent when it returns.
            "cleansession false",
            "try_private true",
            "restart_timeout 1 10",
            *bridge_topics(tenant),
        ]
        _write_private(region_dir / "mosquitto.conf", _mosquitto_conf(region_dir, listen, bridge))
        written.append(str(region_dir))
    return {**creds, "written": written, "bridges": sorted(bridges)}


def bridge_topics(tenant: str) -> list[str]:
    """A region's bridge topics from the agent rules, every id a wildcard: what agents read
    comes in from the core, what they write goes out to it. (The same filters as the core's
    ACL for the bridge account, so Mosquitto accepts each of the bridge's subscriptions.)"""
    lines = []
    for rule in AGENT_RULES:
        direction = {"read": "in", "write": "out", "readwrite": "both"}[rule.access]
        lines.append(f"topic {fill(rule, tenant, user='+', client='+')} {direction} 1")
    return lines


def _bridge_passwords(directory: Path, tenant: str, regions: int) -> dict[str, str]:
    """One password per bridge account, kept in credentials.json under ``bridges``."""
    import secrets

    path = directory / "credentials.json"
    data = json.loads(path.read_text())
    old = data.get("bridges") if isinstance(data.get("bridges"), dict) else {}
    bridges = {
        bridge_account(tenant, i): str(
            old.get(bridge_account(tenant, i)) or secrets.token_urlsafe(24)
        )
        for i in range(1, regions + 1)
    }
    data["bridges"] = bridges
    _write_private(path, json.dumps(data, indent=2) + "\n")
    return bridges


def _mosquitto_conf(d: Path, listen: Listen, extra: list[str]) -> str:
    d = d.absolute()
    return (
        "\n".join(
            [
                "# Generated by `addin-server broker-config --target mosquitto-bridge`.",
                f"listener {listen.port} {listen.host}",
                "allow_anonymous false",
                f"password_file {d / 'passwd'}",
                f"acl_file {d / 'acl'}",
                "persistence true",
                f"persistence_location {d / 'data'}/",
                "log_dest stderr",
                # Started as root, Mosquitto drops to another user: the files' owner, who
                # can read the 0600 password file (as `addin-server broker run` does).
                *([f"user {pwd.getpwuid(d.stat().st_uid).pw_name}"] if os.geteuid() == 0 else []),
                *extra,
            ]
        )
        + "\n"
    )


# -- NATS --------------------------------------------------------------------------------------


def write_nats_config(
    directory: Path,
    tenant: str,
    user_ids: Iterable[str],
    nodes: Sequence[NatsNode],
    store_dir: Path | None = None,
    *,
    light_consumers: bool = False,
) -> dict[str, object]:
    """``accounts.conf`` and ``nats-N.conf`` for every node; what was written."""
    if not nodes:
        raise BrokerConfigError("a NATS configuration needs at least one node")
    creds = write_credentials(directory, tenant, user_ids)
    _write_private(directory / "accounts.conf", nats_accounts_text(creds))
    store = (store_dir or directory / "jetstream").absolute()
    written = [str(directory / "accounts.conf")]
    for i in range(len(nodes)):
        path = directory / f"nats-{i}.conf"
        text = nats_node_text(
            tenant, i, nodes, store / f"node-{i}", light_consumers=light_consumers
        )
        path.write_text(text)
        written.append(str(path))
    agents = creds["agents"]
    assert isinstance(agents, dict)
    dotted = [uid for uid in agents if "." in uid]
    return {**creds, "written": written, "dotted": dotted}


def nats_accounts_text(creds: dict[str, object]) -> str:
    tenant = str(creds["tenant"])
    server, agents = creds["server"], creds["agents"]
    assert isinstance(server, dict) and isinstance(agents, dict)
    users = [_nats_user(server["username"], server["password"], SERVER_RULES, tenant, "", "")]
    for uid, pw in agents.items():
        # The client id is not known per user in password mode: any report topic.
        users.append(_nats_user(uid, pw, AGENT_RULES, tenant, uid, "+", mqtt_only=True))
    body = ",\n".join(users)
    return (
        "# Generated by `addin-server broker-config --target nats` from the same rules as the\n"
        "# Mosquitto ACL (server_stub/broker_rules.py). Holds passwords: keep it 0600.\n"
        f"accounts {{\n  {json.dumps(tenant)}: {{\n    jetstream: enabled\n"
        f"    users: [\n{body}\n    ]\n  }}\n}}\n"
    )


def _nats_user(
    name: str,
    password: str,
    rules: Sequence[Rule],
    tenant: str,
    user: str,
    client: str,
    *,
    mqtt_only: bool = False,
) -> str:
    perms = nats_permissions(rules, tenant, user=user, client=client)
    # nats-server 2.9 delivers a QoS 1 subscription through a JetStream consumer on
    # `$MQTT.sub.<id>`, checked against the user's own subscribe permissions.
    perms["subscribe"] = [*perms["subscribe"], "$MQTT.sub.>"]
    entry: dict[str, object] = {
        "user": name,
        "password": password,
        "permissions": {
            "publish": {"allow": perms["publish"]},
            "subscribe": {"allow": perms["subscribe"]},
        },
    }
    if mqtt_only:
        # An agent's password opens MQTT only: with the NATS protocol it could subscribe
        # to other clients' `$MQTT.sub.>` deliveries.
        entry["allowed_connection_types"] = ["MQTT"]
    return "      " + json.dumps(entry)


def nats_node_text(
    tenant: str,
    index: int,
    nodes: Sequence[NatsNode],
    store: Path,
    *,
    light_consumers: bool = False,
) -> str:
    """One node's config. Each QoS 1 subscription is a JetStream consumer, replicated like
    the streams; `light_consumers` keeps them on one node, in memory: far cheaper for
    thousands of clients, but a subscription whose consumer was on a lost node delivers
    nothing until its client subscribes again (reconnects) or anti-entropy repairs it."""
    node = nodes[index]
    routes = [f"nats-route://{n.cluster}" for j, n in enumerate(nodes) if j != index]
    replicas = min(3, len(nodes))
    consumers = (
        "consumer_replicas: 1, consumer_memory_storage: true"
        if light_consumers
        else f"consumer_replicas: {replicas}"
    )
    lines = [
        f"# Generated by `addin-server broker-config --target nats`: node {index} of {len(nodes)}.",
        f"server_name: {json.dumps(f'addin-{tenant}-{index}')}",
        f"listen: {json.dumps(str(node.client))}",
        f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
    ]
    if len(nodes) > 1:
        lines.append(
            f"cluster {{ name: {json.dumps(f'addin-{tenant}')}, "
            f"listen: {json.dumps(str(node.cluster))}, routes: {json.dumps(routes)} }}"
        )
    lines += [
        # Sessions, retained messages and QoS 1 deliveries on `replicas` nodes: one node
        # lost keeps a quorum and nothing is lost.
        f"mqtt {{ listen: {json.dumps(str(node.mqtt))}, stream_replicas: {replicas}, "
        f"{consumers} }}",
        'include "accounts.conf"',
    ]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
