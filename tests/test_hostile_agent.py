"""Hostile input against a running agent: malformed JSON on every topic it
reads, unsafe ids, forged catalog entries whose manifest does not match, escalation and
downgrade attempts, forged publishes and snooping with an agent's own broker account, and SQL
injection through `why` and `query`.

Each case checks the visible reaction — the refusal event in the agent's cache, or the CLI's
answer — and that the daemon still runs and its state (received, entitlements, installed,
pending, manifests, subscriptions) did not change.

One world per module: Mosquitto with the server-generated password/ACL files, `addin-server
serve` and `addin-agent run` as real processes. "Forged" state messages are published with the
server's account: the agent must not trust the broker's content blindly even then.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from hostile_helpers import (
    TENANT,
    Mqtt,
    T,
    World,
    addin_id,
    agent_cli,
    manifest,
    server_cli,
    sha256,
    wait_for,
)

from addin_core.protocol import CatalogEntry, Host, Source
from addin_core.signing import split_state

BASE = addin_id("base")
# One add-in per attack on the manifest chain, so that one forged revision cannot mask another.
VICTIMS = ("hashm", "idm", "verm", "badxml", "esc", "down")
HOSTILE_NAME = "[/bold][link=https://evil.example]Click me[/link] [red]"
_revisions = count(10**6)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("hostile-agent"))
    try:
        w.start_broker()
        w.start_server()
        w.call("POST", "/v1/groups", json={"id": "sales", "name": "Sales"})
        w.call("PUT", "/v1/groups/sales/members/ann")
        for name in ("base", *VICTIMS):
            w.upload(manifest(name))
            w.call(
                "POST",
                f"/v1/addins/{addin_id(name)}/assign",
                json={"target": "everyone", "mode": "fixed"},
            )
        w.call("POST", f"/v1/addins/{BASE}/assign", json={"target": "group", "target_id": "sales", "mode": "fixed"})  # fmt: skip
        w.call("POST", f"/v1/addins/{BASE}/assign", json={"target": "user", "target_id": "ann", "mode": "fixed"})  # fmt: skip
        w.call("POST", f"/v1/addins/{BASE}/assign", json={"target": "user", "target_id": "bob", "mode": "fixed"})  # fmt: skip
        w.start_agent()
        wanted = 1 + len(VICTIMS)
        wait_for(
            lambda: len(w.rows("SELECT 1 FROM manifests WHERE status = 'verified'")) == wanted,
            20,
            "the agent verifies every manifest",
        )
        wait_for(
            lambda: f"{T}/assign/group/sales/+" in (w.sync("subscriptions") or []),
            10,
            "subscribed to the group",
        )
        assert len(w.launch("Word")["installed"]) == wanted
        user, password = w.server_account
        w.forger = Mqtt(w.broker.port, user, password)  # type: ignore[attr-defined, union-attr]
        assert w.forger.connect()  # type: ignore[attr-defined]
        yield w
    finally:
        w.stop()


def forger(world: World) -> Mqtt:
    f: Mqtt = world.forger  # type: ignore[attr-defined]
    return f


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    before = world.snapshot()
    yield
    assert world.agent_alive(), (world.agent_log.read_text())[-3000:]
    assert world.snapshot() == before


def refusal(world: World, after: int, kind: str, *texts: str) -> dict[str, Any]:
    """Wait for the event of `kind` after event id `after` whose detail holds every text."""

    def found() -> dict[str, Any] | None:
        for e in world.events_after(after, kind):
            if all(t in e["detail"] for t in texts):
                return e
        return None

    try:
        event: dict[str, Any] = wait_for(found, 10, f"{kind} event with {texts}")
    except AssertionError:
        raise AssertionError(f"{kind} {texts} not among {world.events_after(after)}") from None
    return event


# -- malformed JSON on every topic the agent reads ------------------------------------------------

TOPICS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (topic, a valid payload without revision)
    "catalog": (f"{T}/catalog/{BASE}", {}),  # filled from the agent's own copy
    "assign-everyone": (f"{T}/assign/everyone/{BASE}", {"mode": "fixed"}),
    "assign-group": (f"{T}/assign/group/sales/{BASE}", {"mode": "fixed"}),
    "assign-user": (f"{T}/assign/user/ann/{BASE}", {"mode": "fixed"}),
    "member": (f"{T}/member/ann", {"groups": ["sales"]}),
    "group-parents": (f"{T}/group/sales/parents", {"parents": []}),
    "policy": (f"{T}/policy", {"nested_groups": True}),
}

MALFORMED: dict[str, str] = {
    # name: text the refusal event must contain
    "garbage": "payload is not UTF-8",
    "truncated": "payload is not JSON",
    "oversized": "exceeds the 65536-byte limit",
    "unknown-field": "smuggled: Extra inputs are not permitted",
    "wrong-type": "revision: Input should be a valid integer",
    "not-an-object": "payload must be a JSON object, got list",
}


def valid_payload(world: World, name: str) -> dict[str, Any]:
    topic, body = TOPICS[name]
    if name == "catalog":
        held = world.rows("SELECT payload FROM received WHERE topic = ?", (topic,))
        body = json.loads(held[0]["payload"])
    return {**body, "revision": next(_revisions)}


def malformed(world: World, topic_name: str, kind: str) -> bytes:
    good = valid_payload(world, topic_name)
    text = json.dumps(good)
    match kind:
        case "garbage":
            return b"\xff\xfe\x00\x01garbage{{{" + bytes(range(256))
        case "truncated":
            return text[: len(text) // 2].encode()
        case "oversized":
            return json.dumps({**good, "pad": "x" * 70_000}).encode()
        case "unknown-field":
            return json.dumps({**good, "smuggled": {"admin": True}}).encode()
        case "wrong-type":
            return json.dumps({**good, "revision": "999999999"}).encode()
        case "not-an-object":
            return json.dumps([good]).encode()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@pytest.mark.parametrize("topic_name", sorted(TOPICS))
def test_malformed_json_on_every_topic_is_refused_and_changes_nothing(
    world: World, unchanged: None, topic_name: str, kind: str
) -> None:
    topic = TOPICS[topic_name][0]
    mark = world.last_event_id()
    forger(world).publish(topic, malformed(world, topic_name, kind))
    event = refusal(world, mark, "invalid", topic, MALFORMED[kind])
    assert event["detail"].startswith(topic + ": ")


# -- ids that could put wildcards into the agent's subscriptions ---------------------------------

UNSAFE = ["x/+", "#", "+", "a\x00b", "../etc", "a b", "x" * 129]


@pytest.mark.parametrize("bad", UNSAFE, ids=repr)
def test_unsafe_group_ids_in_a_membership_are_refused(
    world: World, unchanged: None, bad: str
) -> None:
    # Accepted, "x/+" would make the agent subscribe to assign/group/x/+/+ (a wildcard).
    mark = world.last_event_id()
    body = {"revision": next(_revisions), "groups": ["sales", bad]}
    forger(world).publish(f"{T}/member/ann", json.dumps(body).encode())
    refusal(world, mark, "invalid", f"{T}/member/ann", "groups.1: String should match pattern")
    body = {"revision": next(_revisions), "parents": [bad]}
    forger(world).publish(f"{T}/group/sales/parents", json.dumps(body).encode())
    refusal(world, mark, "invalid", "parents.0: String should match pattern")


@pytest.mark.parametrize("bad", ["a b", "..", "x" * 129, "é", "$SYS"], ids=repr)
def test_unsafe_ids_in_the_topic_are_refused(world: World, unchanged: None, bad: str) -> None:
    # The agent subscribes to catalog/+, so any single-level name reaches it. (`+`, `#` and NUL
    # cannot appear in a published topic name at all: MQTT forbids them.)
    mark = world.last_event_id()
    body = valid_payload(world, "catalog")
    forger(world).publish(f"{T}/catalog/{bad}", json.dumps(body).encode())
    refusal(world, mark, "invalid", "invalid addin id", "use 1-128 characters")


@pytest.mark.parametrize("bad", ["a\x00b", "a\tb", "a\x7fb"], ids=repr)
def test_broker_refuses_control_characters_in_topic_names(
    world: World, unchanged: None, bad: str
) -> None:
    # Even the server account cannot publish them: Mosquitto drops the connection, so the
    # agent never sees the message. (`+` and `#` are refused by the client library already.)
    assert world.broker is not None
    c = Mqtt(world.broker.port, *world.server_account)
    assert c.connect()
    mark = world.last_event_id()
    try:
        c.publish(
            f"{T}/catalog/{bad}", json.dumps(valid_payload(world, "catalog")).encode(), wait=0.5
        )
        assert c.disconnected.wait(5), "the broker keeps a client that sent an invalid topic"
    finally:
        c.close()
    for wildcard in ("a+b", "a#b"):
        with pytest.raises(ValueError, match="wildcard"):
            forger(world).client.publish(f"{T}/catalog/{wildcard}", b"{}", qos=1)
    assert world.events_after(mark, "invalid") == []


def test_catalog_entry_naming_another_addin_is_refused(world: World, unchanged: None) -> None:
    mark = world.last_event_id()
    body = {**valid_payload(world, "catalog"), "addin_id": addin_id("esc")}
    forger(world).publish(f"{T}/catalog/{BASE}", json.dumps(body).encode())
    refusal(world, mark, "invalid", f"catalog entry names add-in '{addin_id('esc')}'")


def test_tombstone_on_policy_is_refused(world: World, unchanged: None) -> None:
    mark = world.last_event_id()
    body = {"deleted": True, "revision": next(_revisions)}
    forger(world).publish(f"{T}/policy", json.dumps(body).encode())
    refusal(world, mark, "invalid", "a policy topic cannot carry a tombstone")


# -- manifests that do not match their catalog entry ---------------------------------------------


def serve_manifest(world: World, sha: str, content: bytes) -> None:
    """Put bytes into the server's manifest store under `sha` (a compromised or corrupted
    store: the server serves whatever its table holds)."""
    conn = sqlite3.connect(world.db, timeout=10)
    try:
        conn.execute(
            "INSERT OR REPLACE INTO manifests(sha256, content) VALUES (?, ?)", (sha, content)
        )
        conn.commit()
    finally:
        conn.close()


def forge_catalog(
    world: World, name: str, version: str, sha: str, permissions: str = "ReadDocument"
) -> None:
    entry = CatalogEntry(
        addin_id=addin_id(name),
        name=name,
        source=Source.LOB,
        version=version,
        manifest_sha256=sha,
        manifest_url=f"/v1/manifests/{sha}",
        hosts=[Host.WORD],
        permissions=permissions,
        enabled=True,
        revision=next(_revisions),
    )
    forger(world).publish(f"{T}/catalog/{addin_id(name)}", entry.to_bytes())


XXE = manifest("badxml", version="1.1.0.0").replace(
    b"<OfficeApp", b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n<OfficeApp', 1
)
MISMATCHES: dict[str, tuple[bytes, str | None, str]] = {
    # victim: (bytes served, sha256 claimed (None: the real one), refusal text)
    "hashm": (manifest("hashm", "1.1.0.0"), sha256(b"other bytes"), "content hash"),
    "idm": (
        manifest("idm", "1.1.0.0", id=addin_id("someone-else")),
        None,
        f"manifest Id {addin_id('someone-else')} is not the catalog's {addin_id('idm')}",
    ),
    "verm": (manifest("verm", "1.2.0.0"), None, "manifest Version 1.2.0.0 is not the catalog's"),
    "badxml": (XXE, None, "the manifest reader rejected it: invalid manifest"),
}


@pytest.mark.parametrize("victim", sorted(MISMATCHES))
def test_manifest_not_matching_its_catalog_entry_is_refused_and_old_version_stays(
    world: World, victim: str
) -> None:
    content, claimed, text = MISMATCHES[victim]
    sha = claimed or sha256(content)
    serve_manifest(world, sha, content)
    v1 = (world.wef / "Word" / f"{addin_id(victim)}.xml").read_bytes()
    mark = world.last_event_id()
    forge_catalog(world, victim, "1.1.0.0", sha)
    event = refusal(world, mark, "manifest_refused", text)
    assert event["addin_id"] == addin_id(victim)
    (pending,) = world.rows("SELECT * FROM pending WHERE addin_id = ?", (addin_id(victim),))
    assert pending["state"] == "waiting" and "was refused" in pending["reason"], pending
    (row,) = world.rows("SELECT status, reason FROM manifests WHERE sha256 = ?", (sha,))
    assert row["status"] == "refused" and text in row["reason"]
    world.launch("Word")
    assert world.installed()[addin_id(victim)] == "1.0.0.0"
    assert (world.wef / "Word" / f"{addin_id(victim)}.xml").read_bytes() == v1
    why = json.loads(agent_cli(world.cache, "why", addin_id(victim), "--json").stdout)
    assert text in json.dumps(why)
    assert world.agent_alive()


def test_permission_escalation_is_not_published_and_a_forged_one_waits_for_consent(
    world: World,
) -> None:
    esc = addin_id("esc")
    seen = len(world.watcher.messages)
    v2 = manifest("esc", "2.0.0.0", permissions="ReadWriteDocument")
    assert world.upload(v2)["state"] == "needs_consent"
    # The server holds it back: the catalog entry it publishes keeps 1.0.0.0 and only names
    # 2.0.0.0 as withheld, with nothing an agent could fetch it by.
    assert world.revision() > 0
    deadline = time.monotonic() + 10
    while not (sent := [p for t, p, _ in world.watcher.messages[seen:] if t.endswith(esc)]):
        assert time.monotonic() < deadline, "no catalog message for esc"
        time.sleep(0.05)
    entry = json.loads(split_state(sent[0])[0])
    assert (entry["version"], entry["withheld"]["version"]) == ("1.0.0.0", "2.0.0.0")
    assert sha256(v2) not in sent[0].decode()
    # A catalog entry claiming the consented level for the escalated manifest: the agent reads
    # the manifest itself and holds the change as needs_consent; the installed version stays.
    mark = world.last_event_id()
    forge_catalog(world, "esc", "2.0.0.0", sha256(v2), permissions="ReadDocument")
    refusal(world, mark, "pending", "needs_consent", "ReadWriteDocument")
    (pending,) = world.rows("SELECT * FROM pending WHERE addin_id = ?", (esc,))
    assert pending["state"] == "needs_consent"
    assert pending["reason"] == (
        "needs admin consent: its manifest asks for permission ReadWriteDocument, "
        "the consented level is ReadDocument"
    )
    world.launch("Word")
    assert world.installed()[esc] == "1.0.0.0"
    assert world.agent_alive()


def test_downgrade_in_the_catalog_is_never_applied(world: World) -> None:
    down = addin_id("down")
    old = manifest("down", "0.9.0.0")
    serve_manifest(world, sha256(old), old)
    mark = world.last_event_id()
    forge_catalog(world, "down", "0.9.0.0", sha256(old))
    wait_for(
        lambda: [e for e in world.events_after(mark) if e["kind"] == "received" or e["addin_id"] == down]
        or world.rows("SELECT 1 FROM entitlements WHERE addin_id = ? AND version = '0.9.0.0'", (down,)),
        10,
        "the agent takes the (valid, older) catalog entry",
    )  # fmt: skip
    assert not world.rows("SELECT * FROM pending WHERE addin_id = ?", (down,))
    world.launch("Word")
    assert world.installed()[down] == "1.0.0.0"
    why = json.loads(agent_cli(world.cache, "why", down, "--host", "Word", "--json").stdout)
    assert why["cause"] == "downgrade_ignored", why
    assert "downgrades are never applied" in why["verdict"]


# -- the broker's ACL with an agent's own account --------------------------------------------------


def test_forged_state_from_an_agent_account_is_dropped_by_the_broker(
    world: World, unchanged: None
) -> None:
    assert world.broker is not None
    ann = Mqtt(world.broker.port, "ann", world.creds["agents"]["ann"], client_id="ann-forger")
    assert ann.connect()
    seen = len(world.watcher.messages)
    try:
        forged: dict[str, dict[str, Any]] = {
            f"{T}/assign/everyone/{addin_id('evil')}": {"mode": "fixed"},
            f"{T}/assign/user/ann/{addin_id('evil')}": {"mode": "fixed"},
            f"{T}/member/ann": {"groups": ["domain-admins"]},
            f"{T}/policy": {"nested_groups": True},
            f"{T}/catalog/{BASE}": {"deleted": True},
            f"{T}/report/bob-pc": {"client_id": "bob-pc"},
        }
        for topic, body in forged.items():
            ann.publish(topic, json.dumps({**body, "revision": next(_revisions)}).encode(), True)
        # Her own report topic is the one thing she may write: it arrives, proving delivery works.
        ann2 = Mqtt(world.broker.port, "ann", world.creds["agents"]["ann"], client_id="ann-pc2")
        assert ann2.connect()
        ann2.publish(f"{T}/report/ann-pc2", b'{"marker": 1}')
        ann2.close()
        wait_for(
            lambda: any(t.endswith("report/ann-pc2") for t, _, _ in world.watcher.messages[seen:]),
            10,
            "own report delivered",
        )
        got = {t for t, _, _ in world.watcher.messages[seen:]}
        assert got == {f"{T}/report/ann-pc2"}, got
    finally:
        ann.close()


def test_an_agent_account_cannot_read_another_users_topics(world: World) -> None:
    assert world.broker is not None
    ann = Mqtt(world.broker.port, "ann", world.creds["agents"]["ann"], client_id="ann-snoop")
    assert ann.connect()
    try:
        codes = ann.subscribe(
            f"{T}/assign/user/bob/+", f"{T}/member/bob", f"{T}/assign/user/+/+", f"{T}/#", "#"
        )
        # Mosquitto either refuses the SUBACK (0x87) or grants it and filters every delivery.
        assert all(c in (0, 1, 0x80, 0x87) for c in codes), codes
        ann.quiet(0.4)
        topics = {t for t, _, _ in ann.messages}
        assert topics, "ann still reads her own and the tenant-wide topics"
        assert not [t for t in topics if "/bob" in t or "/report/" in t], topics
    finally:
        ann.close()


@pytest.mark.parametrize(
    "who", ["wrong-password", "other-users-password", "anonymous", "server-name-agent-pw"]
)
def test_broker_refuses_bad_credentials(world: World, who: str) -> None:
    assert world.broker is not None
    agents = world.creds["agents"]
    user, password = {
        "wrong-password": ("ann", "guess"),
        "other-users-password": ("ann", agents["bob"]),
        "anonymous": (None, None),
        "server-name-agent-pw": (world.server_account[0], agents["ann"]),
    }[who]
    c = Mqtt(world.broker.port, user, password)
    try:
        assert not c.connect()
        assert c.reason.is_failure
    finally:
        c.close()


# -- SQL injection through the troubleshooting commands ------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["x' OR '1'='1", "'; DROP TABLE events; --", "base' UNION SELECT sql FROM sqlite_master --", "%", "_"],
)  # fmt: skip
def test_why_treats_its_argument_as_data(world: World, unchanged: None, text: str) -> None:
    tables = world.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
    r = agent_cli(world.cache, "why", text, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["addin_id"] is None and out["query"] == text
    assert "not in" in out["verdict"] or "no add-in" in out["verdict"].lower(), out["verdict"]
    assert world.rows("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name") == tables


WRITES = {
    # SQL: text of the refusal. The authorizer refuses before SQLite even tries.
    "DELETE FROM events": "not authorized",
    "DROP TABLE installed": "not authorized",
    "UPDATE installed SET version = '9.9'": "not authorized",
    "INSERT INTO choices VALUES ('x', 'install', 0)": "not authorized",
    "PRAGMA user_version = 7": "not authorized",
    "PRAGMA journal_mode = DELETE": "not authorized",
    "SELECT 1; DELETE FROM events": "one statement at a time",
    "ATTACH DATABASE 'attached.db' AS evil": "not authorized",
    "VACUUM INTO 'copy.db'": "authorization denied",
    "CREATE TEMP TABLE t AS SELECT * FROM manifests": "not authorized",
    "SELECT load_extension('evil')": "not authorized",
}


@pytest.mark.parametrize("sql", sorted(WRITES))
def test_query_is_read_only(world: World, unchanged: None, tmp_path: Path, sql: str) -> None:
    events = world.last_event_id()
    r = subprocess_in(tmp_path, world, "query", sql)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith("error: query failed: ") and WRITES[sql] in r.stderr, r.stderr
    assert world.rows("SELECT count(*) AS n FROM events WHERE id <= ?", (events,))[0]["n"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no file may be written"
    ok = subprocess_in(tmp_path, world, "query", "SELECT count(*) AS n FROM installed", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["n"] == len(world.installed())


@pytest.mark.parametrize(
    "sql",
    [
        "PRAGMA table_info(events)",
        "PRAGMA integrity_check",
        "PRAGMA journal_mode",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) SELECT i FROM n",
        "SELECT kind, count(*) FROM events GROUP BY kind",
    ],
)
def test_query_still_reads(world: World, tmp_path: Path, sql: str) -> None:
    r = subprocess_in(tmp_path, world, "query", sql, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)


def subprocess_in(cwd: Path, world: World, *args: str) -> Any:
    """`addin-agent --cache CACHE ARGS` run from `cwd` (relative file names land there)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--cache", str(world.cache), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def test_hostile_display_name_is_printed_as_text_not_markup(world: World) -> None:
    # A manifest's DisplayName is the admin's (or a Store publisher's) text. Printed through
    # rich, "[/bold]" used to crash `list`, `why` and `query`, and "[link=...]" could dress up
    # a link in the helpdesk's terminal.
    xml = manifest("markup", display=HOSTILE_NAME.replace("&", "&amp;"))
    out = world.upload(xml)
    world.call("POST", f"/v1/addins/{out['addin_id']}/assign", json={"target": "user", "target_id": "ann", "mode": "optional"})  # fmt: skip
    wait_for(
        lambda: world.rows("SELECT 1 FROM entitlements WHERE addin_id = ?", (out["addin_id"],)),
        10,
        "entitled",
    )
    for args in (
        ("list",),
        ("why", out["addin_id"]),
        ("query", "SELECT name FROM entitlements"),
        ("status",),
    ):
        r = agent_cli(world.cache, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        if args[0] != "status":
            assert "[/bold]" in r.stdout and "[link=https://evil.example]" in r.stdout, r.stdout
    r = server_cli(world.db, "addin", "show", out["addin_id"])
    assert r.returncode == 0 and HOSTILE_NAME in r.stdout, r.stdout


# -- after all of it -------------------------------------------------------------------------------


def test_agent_still_follows_real_changes(world: World) -> None:
    late = addin_id("late")
    world.upload(manifest("late"))
    world.call("POST", f"/v1/addins/{late}/assign", json={"target": "group", "target_id": "sales", "mode": "fixed"})  # fmt: skip
    wait_for(
        lambda: world.rows("SELECT 1 FROM pending WHERE addin_id = ? AND state = 'ready'", (late,)),
        15,
        "the new assignment is staged",
    )
    assert world.launch("Word")["installed"][late] == "1.0.0.0"
    r = agent_cli(world.cache, "doctor", "--json")
    assert world.agent_alive()
    assert TENANT in (world.tmp / "agent.toml").read_text()
    assert r.returncode in (0, 1), r.stderr
    integrity = world.rows("PRAGMA integrity_check")
    assert integrity == [{"integrity_check": "ok"}]


# Each of these moves the cursor, recolours, or reorders what follows when printed raw:
# C1 CSI (U+009B), RLO (U+202E), LRI/RLI/FSI/PDI (U+2066-U+2069), LRM/RLM, zero-width joiner.
TERMINAL_TRICKS = "\u009b\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u200d"


def test_control_and_bidi_characters_in_names_never_reach_the_terminal(
    world: World, tmp_path: Path
) -> None:
    display = "Bidi" + "".join(f"&#x{ord(c):x};" for c in TERMINAL_TRICKS) + "exe.txt"
    xml = manifest("bidi", display=display)
    out = world.upload(xml)
    world.call("POST", f"/v1/addins/{out['addin_id']}/assign", json={"target": "user", "target_id": "ann", "mode": "optional"})  # fmt: skip
    wait_for(
        lambda: world.rows("SELECT 1 FROM entitlements WHERE addin_id = ?", (out["addin_id"],)),
        10,
        "entitled",
    )
    runs = {
        f"agent {' '.join(args)}": agent_cli(world.cache, *args)
        for args in (("list",), ("why", out["addin_id"]), ("status",), ("events",))
    }
    runs |= {
        f"server {' '.join(args)}": server_cli(world.db, *args)
        for args in (
            ("addin", "list"),
            ("addin", "show", out["addin_id"]),
            ("explain", "--user", "ann", "--addin", out["addin_id"]),
            ("status", out["addin_id"]),
        )
    }
    # A bad <Id> holding the same characters: the finding quotes it.
    bad = tmp_path / "bidi.xml"
    bad.write_bytes(
        manifest("bidi", id="Bidi" + "".join(f"&#x{ord(c):x};" for c in TERMINAL_TRICKS))
    )
    runs["server manifest validate"] = server_cli(None, "manifest", "validate", str(bad))
    for what, r in runs.items():
        assert r.returncode in (0, 1), (what, r.stderr[-2000:])
        for ch in TERMINAL_TRICKS:
            assert ch not in r.stdout and ch not in r.stderr, (what, hex(ord(ch)), r.stdout)
    for what in ("agent list", "agent why", "server addin show", "server addin list"):
        shown = next(r.stdout for k, r in runs.items() if k.startswith(what))
        assert "Bidi\\u009b\\u202e\\u2066" in shown, (what, shown)
    assert "\\u202e" in runs["server manifest validate"].stdout


def test_a_newline_in_a_name_cannot_forge_a_line_of_server_output(world: World) -> None:
    # XML keeps a character reference's newline in an attribute value: the name holds "\n".
    out = world.upload(manifest("newline", display="Tables&#10;FORGED current 9.9.9.9"))
    for args in (("addin", "list"), ("addin", "show", out["addin_id"]), ("status",)):
        r = server_cli(world.db, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
        assert not any(line.startswith("FORGED") for line in r.stdout.splitlines()), r.stdout
        # Tables show the escape; `addin show` prints JSON, which escapes it as \n.
        escaped = "Tables\\nFORGED" if args[1:2] == ("show",) else "Tables\\u000aFORGED"
        assert escaped in r.stdout, (args, r.stdout)
