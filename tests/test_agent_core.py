"""The agent's pure core: received state, resolver, subscriptions, pending changes.

Plain function calls on hand-built state: no broker, no files, no clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import cast

import pytest
from agent_helpers import offline_agent
from hypothesis import given
from hypothesis import strategies as st

from addin_core.protocol import (
    Assignment,
    CatalogEntry,
    GroupParents,
    Host,
    Membership,
    Mode,
    Policy,
    Source,
    Tombstone,
    Topic,
)
from agent.cache import Tx
from agent.pending import InstalledAddin, ManifestRecord, PendingChange, plan
from agent.resolver import explain, group_paths, resolve
from agent.state import ReceivedState
from agent.subscriptions import desired_filters, reconcile
from server_stub.entitlement import AssignmentRow, paths_for_user
from server_stub.entitlement import exclusion as server_exclusion

T = "contoso"
U = "ann"


def sha(c: str) -> str:
    return c * 64


def entry(
    addin: str,
    rev: int = 1,
    version: str = "1.0.0.0",
    hosts: tuple[Host, ...] = (Host.WORD, Host.EXCEL),
    enabled: bool = True,
    perms: str = "ReadDocument",
    digest: str | None = None,
) -> CatalogEntry:
    d = digest or sha("a")
    return CatalogEntry(
        revision=rev,
        addin_id=addin,
        name=addin.title(),
        source=Source.LOB,
        version=version,
        manifest_sha256=d,
        manifest_url=f"/v1/manifests/{d}",
        hosts=list(hosts),
        permissions=perms,
        enabled=enabled,
    )


class S:
    """A tiny builder: every call publishes the next revision."""

    def __init__(self) -> None:
        self.state = ReceivedState(T)
        self.rev = 0

    def r(self) -> int:
        self.rev += 1
        return self.rev

    def cat(self, addin: str, **kw: object) -> S:
        self.state.apply(Topic.catalog(T, addin), entry(addin, rev=self.r(), **kw))  # type: ignore[arg-type]
        return self

    def everyone(self, addin: str, mode: Mode = Mode.FIXED) -> S:
        self.state.apply(Topic.assign_everyone(T, addin), Assignment(revision=self.r(), mode=mode))
        return self

    def user(self, addin: str, mode: Mode = Mode.FIXED, user: str = U) -> S:
        self.state.apply(
            Topic.assign_user(T, user, addin), Assignment(revision=self.r(), mode=mode)
        )
        return self

    def group(self, g: str, addin: str, mode: Mode = Mode.FIXED) -> S:
        self.state.apply(Topic.assign_group(T, g, addin), Assignment(revision=self.r(), mode=mode))
        return self

    def member(self, *groups: str) -> S:
        self.state.apply(Topic.member(T, U), Membership(revision=self.r(), groups=list(groups)))
        return self

    def parents(self, g: str, *ps: str) -> S:
        self.state.apply(
            Topic.group_parents(T, g), GroupParents(revision=self.r(), parents=list(ps))
        )
        return self

    def nested(self, on: bool) -> S:
        self.state.apply(Topic.policy(T), Policy(revision=self.r(), nested_groups=on))
        return self


# -- received state ------------------------------------------------------------------------


def test_stale_and_duplicate_messages_are_ignored() -> None:
    st = ReceivedState(T)
    topic = Topic.assign_everyone(T, "notes")
    assert st.apply(topic, Assignment(revision=5, mode=Mode.OPTIONAL))
    assert not st.apply(topic, Assignment(revision=5, mode=Mode.FIXED))  # duplicate revision
    assert not st.apply(topic, Assignment(revision=3, mode=Mode.FIXED))  # older, queued
    assert st.assign_everyone["notes"].mode == Mode.OPTIONAL
    assert st.apply(topic, Tombstone(revision=6, deleted=True))
    assert "notes" not in st.assign_everyone
    # An older assignment arriving after the tombstone does not resurrect it.
    assert not st.apply(topic, Assignment(revision=4, mode=Mode.FIXED))
    assert "notes" not in st.assign_everyone
    assert st.revision == 6


def test_messages_of_another_tenant_are_ignored() -> None:
    st = ReceivedState(T)
    assert not st.apply(
        Topic.assign_everyone("fabrikam", "x"), Assignment(revision=1, mode=Mode.FIXED)
    )
    assert st.held == {}


def test_forget_groups_drops_their_topics() -> None:
    s = S().member("sales").group("sales", "a").parents("sales", "all")
    gone = s.state.forget_groups({"sales"})
    assert {str(t) for t in gone} == {
        str(Topic.assign_group(T, "sales", "a")),
        str(Topic.group_parents(T, "sales")),
    }
    assert s.state.assign_group == {} and s.state.parents == {}


# -- resolver ------------------------------------------------------------------------------


def test_everyone_user_and_group_targets() -> None:
    s = S().cat("a").cat("b").cat("c").cat("d").everyone("a").user("b").group("sales", "c")
    s.group("other", "d").member("sales")
    ents = resolve(s.state, U)
    assert set(ents) == {"a", "b", "c"}
    assert ents["a"].grants[0].target == "everyone"
    assert ents["b"].grants[0].target == "user"
    assert ents["c"].grants[0].group_id == "sales" and ents["c"].grants[0].path == ("sales",)
    # Another user's assignment never reaches ann.
    s.user("d", user="bob")
    assert "d" not in resolve(s.state, U)


def test_strongest_mode_wins_and_all_provenance_is_kept() -> None:
    s = (
        S()
        .cat("a")
        .everyone("a", Mode.AVAILABLE)
        .group("sales", "a", Mode.OPTIONAL)
        .member("sales")
    )
    assert resolve(s.state, U)["a"].mode == Mode.OPTIONAL
    s.user("a", Mode.FIXED)
    e = resolve(s.state, U)["a"]
    assert e.mode == Mode.FIXED
    assert sorted(g.target for g in e.grants) == ["everyone", "group", "user"]


def test_nested_groups_follow_the_policy_and_why_explains() -> None:
    s = S().cat("a").member("emea").parents("emea", "sales").group("sales", "a")
    assert resolve(s.state, U) == {}
    x = explain(s.state, U, "a")
    assert x.entitlement is None and x.grants == ()
    assert x.blocked[0].group_id == "sales" and x.blocked[0].path == ("emea", "sales")
    s.nested(True)
    e = resolve(s.state, U)["a"]
    assert e.grants[0].path == ("emea", "sales") and e.grants[0].nested
    s.nested(False)
    assert resolve(s.state, U) == {}


def test_cycles_terminate_and_a_deep_chain_is_followed_to_its_end() -> None:
    s = S().nested(True).member("g0").parents("g0", "g1").parents("g1", "g2").parents("g2", "g0")
    assert set(group_paths(s.state, U)) == {"g0", "g1", "g2"}
    chain = S().nested(True).member("c0")
    for i in range(60):
        chain.parents(f"c{i}", f"c{i + 1}")
    chain.parents("c60", "c0")  # and a cycle back at the top
    paths = group_paths(chain.state, U)
    assert len(paths) == 61
    assert paths["c60"] == tuple(f"c{i}" for i in range(61))


def test_an_exclusion_far_up_a_nesting_chain_agrees_with_the_server() -> None:
    """The agent reaches the same groups as the server's evaluator, however deep: an
    exclusion of a group 40 levels up takes the add-in away on both sides, and an
    assignment to it reaches the user on both."""
    depth = 40
    s = S().nested(True).member("c0").cat("a").cat("b")
    parents: dict[str, list[str]] = {}
    for i in range(depth):
        s.parents(f"c{i}", f"c{i + 1}")
        parents[f"c{i}"] = [f"c{i + 1}"]
    top = f"c{depth}"
    s.state.apply(
        Topic.assign_everyone(T, "a"),
        Assignment(revision=s.r(), mode=Mode.FIXED, except_groups=[top]),
    )
    s.group(top, "b")
    server_a = AssignmentRow("everyone", "", Mode.FIXED, frozenset({top}))
    server_b = AssignmentRow("group", top, Mode.FIXED)
    reached_a = paths_for_user(U, ["c0"], parents, [server_a], True)
    assert server_exclusion(U, reached_a, ["c0"], parents, True) is not None
    assert paths_for_user(U, ["c0"], parents, [server_b], True)[0].counts
    assert set(resolve(s.state, U)) == {"b"}
    why = explain(s.state, U, "a")
    assert why.excluded is not None and why.excluded.ident == top


def test_turned_off_excluded_but_explainable() -> None:
    s = S().cat("a", enabled=False).everyone("a")
    assert resolve(s.state, U) == {}
    x = explain(s.state, U, "a")
    assert x.entry is not None and not x.entry.enabled and x.grants
    s.cat("a", enabled=True)
    assert "a" in resolve(s.state, U)


def test_host_filter() -> None:
    s = S().cat("mail", hosts=(Host.OUTLOOK,)).cat("doc", hosts=(Host.WORD, Host.EXCEL))
    s.everyone("mail").everyone("doc")
    ents = resolve(s.state, U, hosts=(Host.WORD,))
    assert set(ents) == {"doc"} and ents["doc"].hosts == (Host.WORD,)
    assert ents["doc"].catalog_hosts == (Host.WORD, Host.EXCEL)


def test_removed_from_catalog_is_explained() -> None:
    s = S().cat("a").everyone("a")
    s.state.apply(Topic.catalog(T, "a"), Tombstone(revision=s.r(), deleted=True))
    assert resolve(s.state, U) == {}
    assert explain(s.state, U, "a").removed_from_catalog


# -- subscriptions -------------------------------------------------------------------------


def test_subscriptions_follow_ancestry_whatever_the_policy() -> None:
    s = S().member("emea").parents("emea", "sales")
    want = desired_filters(s.state, U)
    assert f"addins/v1/{T}/assign/group/sales/+" in want
    assert f"addins/v1/{T}/group/sales/parents" in want
    assert f"addins/v1/{T}/member/{U}" in want and f"addins/v1/{T}/catalog/+" in want
    s.nested(True)
    assert desired_filters(s.state, U) == want
    s.member("hr")
    diff = reconcile(want, desired_filters(s.state, U))
    assert f"addins/v1/{T}/assign/group/hr/+" in diff.subscribe
    assert f"addins/v1/{T}/assign/group/emea/+" in diff.unsubscribe
    assert f"addins/v1/{T}/assign/group/sales/+" in diff.unsubscribe
    assert not reconcile(want, want)


# -- pending changes -----------------------------------------------------------------------


def rec(e: CatalogEntry, status: str = "verified", perms: str | None = None) -> ManifestRecord:
    return ManifestRecord(
        e.manifest_sha256,
        e.addin_id,
        e.version,
        status,
        None if status == "verified" else "bad",  # type: ignore[arg-type]
        perms or e.permissions,
        tuple(e.hosts),
        0.0,
    )


def inst(e: CatalogEntry, host: Host = Host.WORD, version: str | None = None) -> InstalledAddin:
    return InstalledAddin(
        host,
        e.addin_id,
        e.name,
        version or e.version,
        sha("0"),
        e.permissions,
        tuple(e.hosts),
        0.0,
        1,
    )


def gone(addin: str, host: Host) -> str:
    return "unassigned"


def test_plan_install_waits_for_manifest_then_is_ready() -> None:
    s = S().cat("a").everyone("a")
    ents = resolve(s.state, U, (Host.WORD,))
    p = plan(ents, {}, {}, {}, (Host.WORD,), gone)
    assert p[(Host.WORD, "a")].state == "waiting" and p[(Host.WORD, "a")].action == "install"
    e = s.state.catalog["a"]
    p = plan(ents, {}, {e.manifest_sha256: rec(e)}, {}, (Host.WORD,), gone)
    assert p[(Host.WORD, "a")].ready
    p = plan(ents, {}, {e.manifest_sha256: rec(e, "refused")}, {}, (Host.WORD,), gone)
    assert p[(Host.WORD, "a")].state == "waiting" and "refused" in p[(Host.WORD, "a")].reason


def test_plan_updates_only_to_strictly_greater_versions() -> None:
    s = S().cat("a", version="1.10.0.0").everyone("a")
    e = s.state.catalog["a"]
    ents = resolve(s.state, U, (Host.WORD,))
    m = {e.manifest_sha256: rec(e)}
    up = plan(ents, {Host.WORD: {"a": inst(e, version="1.9.0.0")}}, m, {}, (Host.WORD,), gone)
    assert up[(Host.WORD, "a")].action == "update" and up[(Host.WORD, "a")].ready
    down = plan(ents, {Host.WORD: {"a": inst(e, version="2.0.0.0")}}, m, {}, (Host.WORD,), gone)
    assert down == {}
    same = plan(ents, {Host.WORD: {"a": inst(e, version="1.10.0.0")}}, m, {}, (Host.WORD,), gone)
    assert same == {}


def test_plan_permission_change_needs_consent() -> None:
    s = S().cat("a", version="2.0.0.0").everyone("a")
    e = s.state.catalog["a"]
    ents = resolve(s.state, U, (Host.WORD,))
    m = {e.manifest_sha256: rec(e, perms="ReadWriteDocument")}
    p = plan(ents, {Host.WORD: {"a": inst(e, version="1.0.0.0")}}, m, {}, (Host.WORD,), gone)
    assert p[(Host.WORD, "a")].state == "needs_consent"


def test_plan_modes_and_user_choices() -> None:
    s = S().cat("f").cat("o").cat("v").everyone("f", Mode.FIXED).everyone("o", Mode.OPTIONAL)
    s.everyone("v", Mode.AVAILABLE)
    ents = resolve(s.state, U, (Host.WORD,))
    m = {e.manifest_sha256: rec(e) for e in s.state.catalog.values()}
    keys = lambda p: {a for (_, a), c in p.items() if c.action == "install"}  # noqa: E731
    assert keys(plan(ents, {}, m, {}, (Host.WORD,), gone)) == {"f", "o"}
    choices = {"o": "remove", "v": "install", "f": "remove"}
    assert keys(plan(ents, {}, m, choices, (Host.WORD,), gone)) == {"f", "v"}


def test_plan_removes_only_what_is_no_longer_wanted() -> None:
    s = S().cat("a").cat("b").everyone("a")
    a, b = s.state.catalog["a"], s.state.catalog["b"]
    ents = resolve(s.state, U, (Host.WORD,))
    have = {Host.WORD: {"a": inst(a, version="1.0.0.0"), "b": inst(b)}}
    have[Host.WORD]["a"] = InstalledAddin(
        Host.WORD, "a", "A", "1.0.0.0", a.manifest_sha256, a.permissions, tuple(a.hosts), 0.0, 1
    )
    p = plan(ents, have, {}, {}, (Host.WORD,), gone)
    assert list(p) == [(Host.WORD, "b")] and p[(Host.WORD, "b")].action == "remove"
    assert p[(Host.WORD, "b")].reason == "unassigned"


@given(
    st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
        st.lists(st.text(max_size=4), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
        st.booleans(),
        st.none(),
    )
)
def test_sync_values_are_stored_as_json(value: object) -> None:
    """Numbers take a shortcut (repr) in `Tx.sync`; what is stored must read back as JSON."""
    tx = Tx()
    tx.sync("k", value)
    text = tx.sync_values["k"]
    assert text == (value if isinstance(value, str) else json.dumps(value))
    assert tx.statements == [
        ("INSERT OR REPLACE INTO sync (key, value) VALUES (?, ?)", ("k", text))
    ]


def test_upsert_and_delete_statements() -> None:
    tx = Tx()
    tx.upsert("pending", {"host": "Word", "addin_id": "a", "revision": 3})
    tx.delete("pending", host="Word", addin_id="a")
    assert tx.statements == [
        ("INSERT OR REPLACE INTO pending (host, addin_id, revision) VALUES (?, ?, ?)",
         ("Word", "a", 3)),
        ("DELETE FROM pending WHERE host = ? AND addin_id = ?", ("Word", "a")),
    ]  # fmt: skip


def test_stamped_pending_change_equals_dataclasses_replace() -> None:
    p = PendingChange(
        Host.WORD, "a", "A", "update", "1.0", "2.0", "ab" * 32, "ready", "r", 1.0, 2, 3.0
    )
    assert p.stamped(9.0, 8, None) == dataclasses.replace(
        p, since=9.0, revision=8, committed_at=None
    )
    assert [f.name for f in dataclasses.fields(p)][-3:] == ["since", "revision", "committed_at"]


def test_verification_reads_each_digest_once_and_still_checks_every_download() -> None:
    from agent import fetcher
    from simulator.orggen import make_manifest

    addin = "0b5cb8a0-1f53-4e4e-8a60-1d1a8cd8e0aa"
    xml = make_manifest(
        addin, name="Memo", version="1.0.0.0", hosts=[Host.WORD], permissions="ReadDocument"
    )
    bad = xml.replace(b"<Version>1.0.0.0</Version>", b"<Version>one</Version>")

    def entry_for(body: bytes) -> CatalogEntry:
        sha = hashlib.sha256(body).hexdigest()
        return CatalogEntry(
            addin_id=addin, name="Memo", source=Source.LOB, version="1.0.0.0",
            manifest_sha256=sha, manifest_url=f"/v1/manifests/{sha}", hosts=[Host.WORD],
            permissions="ReadDocument", enabled=True, revision=1,
        )  # fmt: skip

    good_entry, bad_entry = entry_for(xml), entry_for(bad)
    first, second = fetcher.verify(good_entry, xml), fetcher.verify(good_entry, bytes(xml))
    assert first.status == second.status == "verified" and first.hosts == second.hosts
    assert good_entry.manifest_sha256 in fetcher._read_memo
    # A refusal is remembered too, with its reason, and other bytes are never taken for it.
    refused = [fetcher.verify(bad_entry, bad) for _ in range(2)]
    assert {r.status for r in refused} == {"refused"}
    assert refused[0].reason == refused[1].reason and "reader rejected" in str(refused[0].reason)
    tampered = fetcher.verify(good_entry, bad)
    assert tampered.status == "refused" and "does not match" in str(tampered.reason)
    # Without the memo (a daemon: one agent per process) the verdict is the same and nothing
    # is kept.
    fetcher._read_memo.clear()
    alone = fetcher.verify(good_entry, xml, memo=False)
    assert (alone.status, alone.hosts) == (first.status, first.hosts)
    assert fetcher.verify(bad_entry, bad, memo=False).reason == refused[0].reason
    assert not fetcher._read_memo


def test_a_transition_for_a_cache_without_tables_keeps_only_what_is_read_back() -> None:
    tx = Tx(rows=False)
    tx.upsert("manifests", {"sha256": "ab" * 32, "xml": b"<OfficeApp/>"})
    tx.upsert("pending", {"host": "Word", "addin_id": "a"})
    tx.event("received", "x")
    tx.sync("revision", 7)
    assert tx.statements == [] and not tx
    assert tx.sync_values == {"revision": "7"} and tx.xml == {"ab" * 32: b"<OfficeApp/>"}


async def test_repeated_messages_decode_once_and_bad_ones_are_refused_every_time(
    tmp_path: Path,
) -> None:
    agents = []
    for n in range(2):
        agent = offline_agent(f"u{n}", f"c{n}", ":memory:")
        await agent.open()
        agents.append(agent)
    topic = str(Topic.assign_everyone("contoso", "addin-1"))
    body = Assignment(revision=3, mode=Mode.FIXED).to_bytes()
    for agent in agents:
        await agent.handle_message(topic, body)
    held = [a.state.held[Topic.parse(topic)].payload for a in agents]
    assert held[0] is held[1]  # one decoded (immutable) model shared by both agents
    bad = b'{"revision": 4, "mode": "mandatory"}'
    for agent in agents:
        for _ in range(2):
            await agent.handle_message(topic, bad)
        assert agent.stats["invalid"] == 2 and agent.revision == 3
        rows = await agent.cache.fetchall("SELECT detail FROM events WHERE kind = 'invalid'")
        assert len(rows) == 2 and "mode" in rows[0]["detail"]
    for agent in agents:
        await agent.cache.close()


async def test_a_report_after_a_download_is_spread_and_a_launch_brings_it_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent import daemon

    agent = offline_agent()
    published: list[float] = []

    async def publish() -> bool:
        published.append(time.monotonic())
        return True

    monkeypatch.setattr(agent, "publish_report", publish)
    monkeypatch.setattr(daemon, "REPORT_DELAY", 0.0)
    # After a download: due somewhere in the spread, not at once.
    spread = []
    for _ in range(20):
        before = time.monotonic()
        agent._schedule_report(daemon.CACHED_REPORT_SPREAD)
        spread.append(agent._report_due - before)
        cast(asyncio.Task[None], agent._report_task).cancel()
        agent._report_task = None
    assert all(0 <= s <= daemon.CACHED_REPORT_SPREAD + 0.1 for s in spread)
    assert len({round(s, 3) for s in spread}) > 1  # spread at random, not one fixed delay
    # A spread report is waiting; a launch's report (no spread) replaces it, due at once ...
    monkeypatch.setattr(daemon.random, "uniform", lambda lo, hi: hi)
    agent._schedule_report(daemon.CACHED_REPORT_SPREAD)
    waiting = agent._report_task
    agent._schedule_report()
    assert waiting is not None and waiting is not agent._report_task
    with pytest.raises(asyncio.CancelledError):
        await waiting
    # ... and a later download's report does not push it back.
    current = agent._report_task
    agent._schedule_report(daemon.CACHED_REPORT_SPREAD)
    assert agent._report_task is current
    assert current is not None
    await current
    assert len(published) == 1
