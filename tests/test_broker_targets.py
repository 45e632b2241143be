"""`broker-config` targets from one rule list: NATS subjects and permissions (ids with dots
permitted exactly where they should be), and a real Mosquitto bridge tree (state core ->
region, reports region -> core)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from addin_runtime.mqtt_version import VersionChoice, parse_mqtt_version, refused_version
from server_stub.broker_config import acl_text
from server_stub.broker_rules import AGENT_RULES, SERVER_RULES, nats_permissions, nats_subject
from server_stub.broker_targets import (
    Listen,
    NatsNode,
    nats_accounts_text,
    write_bridge_config,
    write_nats_config,
)
from simulator.mosquitto import find_mosquitto, free_port

T = "t"
BASE = f"addins/v1/{T}"


def nats_match(pattern: str, subject: str) -> bool:
    """NATS subject matching: tokens split on `.`, `*` is one token, `>` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may(perms: dict[str, list[str]], action: str, topic: str) -> bool:
    return any(nats_match(p, nats_subject(topic)) for p in perms[action])


def test_nats_subjects_follow_the_gateway_mapping() -> None:
    assert nats_subject("addins/v1/t/member/jane.doe") == "addins.v1.t.member.jane//doe"
    assert nats_subject("addins/v1/t/assign/group/+/+") == "addins.v1.t.assign.group.*.*"
    assert nats_subject("addins/v1/t/#") == "addins.v1.t.>"
    with pytest.raises(ValueError):
        nats_subject("addins//t")


def test_an_id_with_a_dot_is_permitted_exactly_where_it_should_be() -> None:
    jane_doe = nats_permissions(AGENT_RULES, T, user="jane.doe", client="+")
    jane = nats_permissions(AGENT_RULES, T, user="jane", client="+")
    # jane.doe reads her own topics; dots in other ids (add-ins, groups) pass the wildcards.
    assert may(jane_doe, "subscribe", f"{BASE}/member/jane.doe")
    assert may(jane_doe, "subscribe", f"{BASE}/assign/user/jane.doe/my.addin")
    assert may(jane_doe, "subscribe", f"{BASE}/catalog/my.addin")
    assert may(jane_doe, "subscribe", f"{BASE}/assign/group/sales.emea/my.addin")
    assert may(jane_doe, "subscribe", f"{BASE}/group/sales.emea/parents")
    assert may(jane_doe, "publish", f"{BASE}/report/pc.1")
    # ... and no one else's: not "jane", not "doe", not "jane/doe".
    for other in ("jane", "doe", "jane.doe.x", "jane/doe"):
        assert not may(jane_doe, "subscribe", f"{BASE}/member/{other}"), other
        assert not may(jane_doe, "subscribe", f"{BASE}/assign/user/{other}/a"), other
    # "jane" cannot read jane.doe's topics, whose subject starts with her own id.
    assert may(jane, "subscribe", f"{BASE}/member/jane")
    assert not may(jane, "subscribe", f"{BASE}/member/jane.doe")
    assert not may(jane, "subscribe", f"{BASE}/assign/user/jane.doe/a")
    # An agent never writes state nor reads another tenant.
    assert not may(jane_doe, "publish", f"{BASE}/catalog/a")
    assert not may(jane_doe, "publish", f"{BASE}/report/a/b")
    assert not may(jane_doe, "subscribe", "addins/v1/t2/catalog/a")
    # A tenant with a dot: its own subtree, not the tenant whose id is its first part.
    server = nats_permissions(SERVER_RULES, "a.b", user="", client="")
    assert may(server, "publish", "addins/v1/a.b/catalog/x")
    assert may(server, "subscribe", "addins/v1/a.b/report/pc.1")
    assert not may(server, "publish", "addins/v1/a/catalog/x")


def test_nats_accounts_and_mosquitto_acl_grant_the_same_topics(tmp_path: Path) -> None:
    result = write_nats_config(
        tmp_path, T, ["ann", "jane.doe"],
        [NatsNode(Listen("127.0.0.1", 1), Listen("127.0.0.1", 2), Listen("127.0.0.1", 3))],
    )  # fmt: skip
    assert result["dotted"] == ["jane.doe"]
    text = (tmp_path / "accounts.conf").read_text()
    assert (tmp_path / "accounts.conf").stat().st_mode & 0o077 == 0
    creds = json.loads((tmp_path / "credentials.json").read_text())
    assert text == nats_accounts_text({**creds, "skipped": []})
    users = _users(text)
    assert users["ann"]["password"] == creds["agents"]["ann"]
    assert users["ann"]["allowed_connection_types"] == ["MQTT"]
    assert "allowed_connection_types" not in users[f"addin-server-{T}"]
    # The Mosquitto pattern lines and ann's NATS subscribe list name the same topics.
    reads = [
        line.split()[2] for line in acl_text(T).splitlines() if line.startswith("pattern read")
    ]
    want = [nats_subject(r.replace("%u", "ann")) for r in reads]
    assert users["ann"]["permissions"]["subscribe"]["allow"] == [*want, "$MQTT.sub.>"]


def _users(text: str) -> dict[str, dict[str, object]]:
    out = {}
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if line.startswith('{"user"'):
            entry = json.loads(line)
            out[entry["user"]] = entry
    return out


def test_mqtt_version_choice() -> None:
    assert parse_mqtt_version("3.1.1") == "3.1.1"
    with pytest.raises(ValueError, match=r"auto, 5, 3\.1\.1"):
        parse_mqtt_version("4")
    import aiomqtt
    from aiomqtt.exceptions import MqttConnectError

    refused = MqttConnectError(1)
    assert refused_version(refused)
    assert not refused_version(MqttConnectError(5))  # not authorised
    assert not refused_version(aiomqtt.MqttError("timeout"))
    auto = VersionChoice("auto")
    assert auto.protocol == aiomqtt.ProtocolVersion.V5
    assert not auto.fall_back(MqttConnectError(5))
    assert auto.fall_back(refused) and auto.protocol == aiomqtt.ProtocolVersion.V311
    pinned = VersionChoice("5")
    assert not pinned.fall_back(refused) and pinned.name == "5"


# -- a real bridge tree ---------------------------------------------------------------------


class Client:
    def __init__(self, port: int, user: str, password: str, client_id: str) -> None:
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv311)  # fmt: skip
        self.c.username_pw_set(user, password)
        self.got: list[tuple[str, bytes]] = []
        self.ok: list[bool] = []
        self.c.on_connect = lambda _c, _u, _f, rc, _p=None: self.ok.append(not rc.is_failure)
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, m.payload))
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        until(lambda: bool(self.ok), "a CONNACK")
        assert self.ok[0], f"{user} refused"

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def until(cond: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"no {what} within {timeout}s"
        time.sleep(0.05)


@pytest.fixture
def bridge_tree(tmp_path: Path) -> Iterator[tuple[list[int], dict[str, object]]]:
    binary = find_mosquitto()
    ports = [free_port(), free_port()]
    result = write_bridge_config(
        tmp_path, T, ["ann", "jane.doe"], [Listen("127.0.0.1", p) for p in ports]
    )
    procs = []
    try:
        for node in ("core", "region-1"):
            log = open(tmp_path / f"{node}.log", "ab")
            procs.append(subprocess.Popen([binary, "-c", str(tmp_path / node / "mosquitto.conf")],
                                          stdout=log, stderr=log))  # fmt: skip
            log.close()
        yield ports, result
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_bridge_tree_carries_state_in_and_reports_out(
    bridge_tree: tuple[list[int], dict[str, object]],
) -> None:
    (core_port, region_port), creds = bridge_tree
    server, agents = creds["server"], creds["agents"]
    assert isinstance(server, dict) and isinstance(agents, dict)
    time.sleep(0.5)
    srv = Client(core_port, server["username"], server["password"], server["username"])
    srv.c.subscribe(f"{BASE}/report/+", qos=1)
    srv.c.publish(f"{BASE}/catalog/a.1", b"state", qos=1, retain=True).wait_for_publish(10)
    jane = Client(region_port, "jane.doe", agents["jane.doe"], "pc.1")
    try:
        jane.c.subscribe([(f"{BASE}/catalog/+", 1), (f"{BASE}/member/jane.doe", 1),
                          (f"{BASE}/member/ann", 1)])  # fmt: skip
        # Retained state reaches the region through the bridge (connected first or later).
        until(lambda: (f"{BASE}/catalog/a.1", b"state") in jane.got, "the state in the region")
        srv.c.publish(f"{BASE}/member/jane.doe", b"m1", qos=1, retain=True)
        srv.c.publish(f"{BASE}/member/ann", b"m2", qos=1, retain=True)
        until(lambda: (f"{BASE}/member/jane.doe", b"m1") in jane.got, "her member topic")
        # Reports go out to the core; a state write from the region goes nowhere.
        jane.c.publish(f"{BASE}/catalog/a.1", b"forged", qos=1, retain=True)
        jane.c.publish(f"{BASE}/report/pc.1", b"report", qos=1)
        until(lambda: (f"{BASE}/report/pc.1", b"report") in srv.got, "the report at the core")
        time.sleep(0.5)
        assert (f"{BASE}/member/ann", b"m2") not in jane.got
        assert (f"{BASE}/catalog/a.1", b"forged") not in jane.got
    finally:
        jane.close()
        srv.close()


# -- the command ----------------------------------------------------------------------------


def _cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    import sys

    cmd = [sys.executable, "-m", "server_stub", "--db", str(db), *args]
    env_tenant = ["--tenant", "contoso"] if args and args[0] == "broker-config" else []
    return subprocess.run(cmd + env_tenant, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip


def test_broker_config_targets_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "org.db"
    for user in ("ann", "jane.doe"):
        assert _cli(db, "user", "add", user, "--tenant", "contoso").returncode == 0
    out = _cli(db, "broker-config", str(tmp_path / "n"), "--target", "nats", "--light-consumers")
    assert out.returncode == 0, out.stderr
    assert "2 agent users" in out.stdout and "need nats-server 2.10" in out.stdout
    assert "consumer_replicas: 1" in (tmp_path / "n" / "nats-2.conf").read_text()
    out = _cli(db, "broker-config", str(tmp_path / "b"), "--target", "mosquitto-bridge",
               "--node", "127.0.0.1:1", "--node", "127.0.0.1:2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "core", "credentials.json", "region-1"]  # fmt: skip
    # The same passwords whichever target wrote them first, once per folder.
    bridge = json.loads((tmp_path / "b" / "credentials.json").read_text())
    assert set(bridge["agents"]) == {"ann", "jane.doe"} and len(bridge["bridges"]) == 1
    for bad, words in (
        (["--target", "nats", "--node", "mqtt=x"], "must look like"),
        (["--target", "mosquitto-bridge", "--node", "127.0.0.1:1"], "at least one region"),
        (["--target", "nats", "--pki", str(tmp_path)], "drop --pki"),
        (["--node", "127.0.0.1:1"], "for the other targets"),
    ):
        out = _cli(db, "broker-config", str(tmp_path / "x"), *bad)
        assert out.returncode != 0 and words in out.stderr, (bad, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
