"""`why` gives the right verdict for each distinct cause of a missing add-in, answering from
the cache file alone (read-only connection), with a real file cache and folder applier.

State arrives through `Agent.accept` (the same path as a broker message) and manifests
through the fetcher's verification, so no broker or server is needed here.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_helpers import addin_id, manifest

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
from agent.cache import open_readonly
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify
from agent.freshness import STALE_AFTER
from agent.why import why

T = "contoso"


class World:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.rev = 0

    def r(self) -> int:
        self.rev += 1
        return self.rev

    async def catalog(
        self,
        name: str,
        version: str = "1.0.0.0",
        hosts: tuple[str, ...] = ("Word",),
        enabled: bool = True,
        perms: str | None = None,
        manifest_perms: str | None = None,
        fetch: bool | str = True,
        aid: str | None = None,
    ) -> str:
        aid = aid or addin_id(name)
        xml = manifest(name, version, hosts, permissions=manifest_perms or perms, addin_id=aid)
        digest = hashlib.sha256(xml).hexdigest()
        entry = CatalogEntry(
            revision=self.r(),
            committed_at=1.0,
            addin_id=aid,
            name=name,
            source=Source.LOB,
            version=version,
            manifest_sha256=digest,
            manifest_url=f"/v1/manifests/{digest}",
            hosts=[Host(h) for h in hosts],
            permissions=perms or ("ReadItem" if hosts == ("Outlook",) else "ReadDocument"),
            enabled=enabled,
        )
        await self.agent.accept(Topic.catalog(T, aid), entry)
        if fetch:
            body = xml if fetch is True else str(fetch).encode()
            await self.agent._record_manifest(entry, verify(entry, body))
        return aid

    async def everyone(self, aid: str, mode: Mode = Mode.FIXED) -> None:
        await self.agent.accept(
            Topic.assign_everyone(T, aid), Assignment(revision=self.r(), mode=mode)
        )

    async def groups(self, *groups: str) -> None:
        await self.agent.accept(
            Topic.member(T, "ann"), Membership(revision=self.r(), groups=list(groups))
        )

    async def parents(self, group: str, *parents: str) -> None:
        await self.agent.accept(
            Topic.group_parents(T, group), GroupParents(revision=self.r(), parents=list(parents))
        )

    async def nesting(self, on: bool) -> None:
        await self.agent.accept(Topic.policy(T), Policy(revision=self.r(), nested_groups=on))

    async def to_group(self, group: str, aid: str, mode: Mode = Mode.FIXED) -> None:
        await self.agent.accept(
            Topic.assign_group(T, group, aid), Assignment(revision=self.r(), mode=mode)
        )

    async def tombstone(self, topic: Topic) -> None:
        await self.agent.accept(topic, Tombstone(revision=self.r(), deleted=True))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    cfg = AgentConfig(
        tenant=T,
        user_id="ann",
        client_id="ann-pc",
        insecure=True,
        cache_path=str(tmp_path / "cache.sqlite"),
        hosts=(Host.WORD, Host.EXCEL, Host.OUTLOOK),
        applier="folder",
        applier_dir=str(tmp_path / "wef"),
    )
    agent = Agent(cfg)
    await agent.open()
    yield World(agent)
    await agent.stop()


async def test_why_names_the_cause(world: World) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)

    def cause(q: str, host: Host | None = Host.WORD) -> tuple[str, str]:
        rep = why(conn, q, host)
        return rep.cause, rep.verdict

    assert cause("anything")[0] == "no_state"

    # installed, then an update received but not applied yet
    up = await w.catalog("updater", "1.2.0.0")
    await w.everyone(up)
    await a.launch(Host.WORD)
    assert cause("updater") == ("installed", "Installed in Word: updater 1.2.0.0.")
    await w.catalog("updater", "1.3.0.0")
    c, v = cause("updater")
    assert c == "pending_update"
    assert v.startswith("Not in Word yet: update 1.2.0.0 → 1.3.0.0 received ")
    assert v.endswith("applies when Word next starts.")

    # 1. unknown add-in
    assert cause("no-such-addin")[0] == "unknown"
    # 2. exists, but no assignment reaches the user
    await w.catalog("lonely")
    assert cause("lonely")[0] == "not_assigned"
    # 3. turned off by the admin
    off = await w.catalog("dark", enabled=False)
    await w.everyone(off)
    assert cause("dark")[0] == "turned_off"
    # 4. removed from the catalog
    gone = await w.catalog("gone")
    await w.everyone(gone)
    await w.tombstone(Topic.catalog(T, gone))
    assert cause(gone)[0] == "removed"
    # 5. only through a nested group, nesting disabled
    nested = await w.catalog("nested")
    await a.accept(Topic.member(T, "ann"), Membership(revision=w.r(), groups=["emea"]))
    await a.accept(Topic.group_parents(T, "emea"), GroupParents(revision=w.r(), parents=["sales"]))
    await a.accept(
        Topic.assign_group(T, "sales", nested), Assignment(revision=w.r(), mode=Mode.FIXED)
    )
    c, v = cause("nested")
    assert c == "nested_disabled" and "emea" in v and "nesting is disabled" in v
    # 6. the add-in does not run in that host
    mail = await w.catalog("mailer", hosts=("Outlook",))
    await w.everyone(mail)
    assert cause("mailer")[0] == "host_unsupported"
    # 7. the host app is not installed on this computer
    pp = await w.catalog("slides", hosts=("PowerPoint",))
    await w.everyone(pp)
    assert cause("slides", Host.POWERPOINT)[0] == "host_not_installed"
    # 8. available, not installed by the user
    av = await w.catalog("avail")
    await w.everyone(av, Mode.AVAILABLE)
    c, v = cause("avail")
    assert c == "available" and "addin-agent install avail" in v
    # 9. optional, removed by the user
    opt = await w.catalog("opt")
    await w.everyone(opt, Mode.OPTIONAL)
    await a.remove("opt")
    assert cause("opt")[0] == "removed_by_user"
    # 10. manifest not downloaded yet
    slow = await w.catalog("slow", fetch=False)
    await w.everyone(slow)
    assert cause("slow")[0] == "manifest_missing"
    # 11. manifest refused (bytes do not match the catalog's hash)
    bad = await w.catalog("bad", fetch="<OfficeApp/>")
    await w.everyone(bad)
    c, v = cause("bad")
    assert c == "manifest_refused" and "does not match" in v
    # 12. an update that changes permissions waits for consent
    perm = await w.catalog("perm", "1.0.0.0")
    await w.everyone(perm)
    await a.launch(Host.WORD)
    await w.catalog("perm", "2.0.0.0", perms="ReadDocument", manifest_perms="ReadWriteDocument")
    c, v = cause("perm")
    assert c == "needs_consent" and "1.0.0.0 stays" in v
    # 13. a new add-in waiting for the next launch
    fresh = await w.catalog("fresh")
    await w.everyone(fresh)
    c, v = cause("fresh")
    assert c == "pending_install" and "applies when Word next starts" in v
    # 14. installed, but will be removed at the next launch
    await w.tombstone(Topic.assign_everyone(T, up))
    c, v = cause("updater")
    assert c == "pending_remove" and "no assignment reaches you" in v
    # 15. the catalog went back to a lower version: never applied
    low = await w.catalog("lowered", "2.0.0.0")
    await w.everyone(low)
    await a.launch(Host.WORD)
    await w.catalog("lowered", "1.0.0.0")
    assert cause("lowered")[0] == "downgrade_ignored"

    # Every cause is also available as JSON with the chain of steps.
    rep = why(conn, "fresh", Host.WORD).to_json()
    labels = [s["label"] for s in rep["steps"]]
    assert labels[:3] == ["catalog", "assignment", "mode"]
    assert "manifest" in labels and "installed in Word" in labels


@pytest.mark.parametrize("cache_path", [":memory:", ":none:"])
async def test_in_memory_caches_run_the_same_transitions(cache_path: str) -> None:
    cfg = AgentConfig(
        tenant=T, user_id="ann", client_id="sim-1", insecure=True, cache_path=cache_path
    )
    agent = Agent(cfg)
    await agent.open()
    w = World(agent)
    x = await w.catalog("mem", "1.0.0.0")
    await w.everyone(x, Mode.OPTIONAL)
    assert await agent.launch(Host.WORD) == {x: "1.0.0.0"}
    await w.catalog("mem", "1.1.0.0")
    assert agent.pending[(Host.WORD, x)].ready
    await agent.remove("mem")
    assert await agent.launch(Host.WORD) == {}
    # stop() keeps an in-memory cache, so the same Agent resumes where it was
    await agent.stop()
    await agent.open()
    assert agent.installed() == {} and agent.choices == {x: "remove"}
    await agent.stop()


async def test_why_reports_a_change_refused_for_its_signature_until_superseded(
    tmp_path: Path,
) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from addin_core.signing import public_key_text, sign_state

    key = Ed25519PrivateKey.generate()
    cfg = AgentConfig(
        tenant=T,
        user_id="ann",
        client_id="ann-pc",
        cache_path=str(tmp_path / "cache.sqlite"),
        hosts=(Host.WORD,),
        signing_key=public_key_text(key),
        insecure=True,
    )
    agent = Agent(cfg)
    await agent.open()
    try:
        conn = open_readonly(cfg.cache_path)
        aid, ghost = addin_id("signed"), addin_id("ghost")
        assign = Topic.assign_user(T, "ann", aid)

        async def send(topic: Topic, payload: bytes, signer: object = key) -> None:
            raw = sign_state(signer, str(topic), payload) if signer else payload  # type: ignore[arg-type]
            await agent.handle_message(str(topic), raw)

        # Nothing held yet, and the first message is unsigned: the verdict says why.
        await send(assign, Assignment(revision=2, mode=Mode.FIXED).to_bytes(), None)
        rep = why(conn, aid)
        assert rep.cause == "signature_refused" and "was not signed" in rep.verdict
        assert agent.state.held == {} and agent.stats["signature_refused"] == 1

        entry = CatalogEntry(
            revision=1, addin_id=aid, name="Signed", source=Source.LOB, version="1.0.0.0",
            manifest_sha256="ab" * 32, manifest_url=f"/v1/manifests/{'ab' * 32}",
            hosts=[Host.WORD], permissions="ReadDocument", enabled=True,
        )  # fmt: skip
        await send(Topic.catalog(T, aid), entry.to_bytes())
        assert why(conn, "Signed").cause == "signature_refused"  # the assignment still
        # A genuine, newer message on that topic supersedes the refusal.
        await send(assign, Assignment(revision=3, mode=Mode.FIXED).to_bytes())
        rep = why(conn, "Signed")
        assert rep.cause != "signature_refused" and not any(
            s.label == "signature" for s in rep.steps
        )
        # An add-in this computer never received, whose entry was refused: said for its id.
        other = Ed25519PrivateKey.generate()
        ghost_entry = entry.model_copy(update={"addin_id": ghost, "revision": 9})
        await send(Topic.catalog(T, ghost), ghost_entry.to_bytes(), other)
        rep = why(conn, ghost)
        assert rep.cause == "signature_refused"
        assert "its catalog entry had a signature that did not verify" in rep.verdict
        assert "No add-in called" in rep.verdict
        conn.close()
    finally:
        await agent.stop()


# -- issue 14: the true cause when the state no longer holds it, freshness, wording ---------------
def _hhmm(rep_verdict: str) -> bool:
    return re.search(r" at (\d{4}-\d\d-\d\d )?\d\d:\d\d \(revision \d+\)", rep_verdict) is not None


async def test_a_removed_addin_is_found_by_every_name_it_had_after_the_removal_applied(
    world: World,
) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)
    aid = await w.catalog("Contoso Draft", aid=addin_id("gone-for-good"))
    await w.everyone(aid)
    await a.launch(Host.WORD)
    await w.catalog("Contoso Final", "1.1.0.0", aid=aid)  # renamed by the admin
    await w.tombstone(Topic.catalog(T, aid))
    removal = w.rev
    # Still installed: removed when Word next starts, said with its name.
    rep = why(conn, "Contoso Final", Host.WORD)
    assert (rep.cause, rep.addin_id, rep.name) == ("removed", aid, "Contoso Final")
    assert "removed from Word when Word next starts" in rep.verdict
    assert await a.launch(Host.WORD) == {}
    assert a.installed() == {}
    # The removal is applied: nothing of it is installed, pending or entitled any more, and
    # every name and the id still find it, with the admin's removal, its time and revision.
    for q in ("Contoso Final", "contoso draft", "CONTOSO FINAL", aid):
        rep = why(conn, q, Host.WORD)
        assert (rep.cause, rep.addin_id, rep.name) == ("removed", aid, "Contoso Final"), q
        assert rep.verdict.startswith("Contoso Final was removed from the catalog by the admin at ")
        assert f"(revision {removal})" in rep.verdict and _hhmm(rep.verdict)
        assert aid not in rep.verdict
    # A name nobody ever had is still unknown.
    assert why(conn, "Contoso Nothing").cause == "unknown"


async def test_why_names_what_took_the_assignment_away(world: World) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)

    def rep(q: str) -> tuple[str, str]:
        r = why(conn, q, Host.WORD)
        return r.cause, r.verdict

    left, via_emea, unassigned, chain = [
        await w.catalog(n) for n in ("left", "via-emea", "unassigned", "chain")
    ]
    mine = await w.catalog("mine")
    await w.nesting(True)
    await w.groups("sales", "emea")
    await w.parents("emea", "all-staff")
    await w.to_group("sales", left)
    await w.to_group("all-staff", via_emea)
    await w.to_group("sales", unassigned)
    await a.accept(Topic.assign_user(T, "ann", mine), Assignment(revision=w.r(), mode=Mode.FIXED))
    await w.groups("sales", "emea", "emea-north")
    await w.parents("emea-north", "partners")
    await w.to_group("partners", chain)
    assert {left, via_emea, unassigned, chain, mine} <= set(a.entitlements())

    # An unassignment from a group, and from the user directly.
    await w.tombstone(Topic.assign_group(T, "sales", unassigned))
    c, v = rep("unassigned")
    assert c == "unassigned" and v.startswith(
        "The admin unassigned unassigned from group sales at "
    )
    assert _hhmm(v) and "No other assignment reaches you" in v
    await w.tombstone(Topic.assign_user(T, "ann", mine))
    c, v = rep("mine")
    assert c == "unassigned" and "unassigned mine from you at " in v
    # A nesting the admin removed from the chain.
    await w.parents("emea-north")
    c, v = rep("chain")
    assert c == "nesting_chain" and "took group emea-north out of group partners at " in v
    assert "emea-north → partners" in v
    # The user leaves a group that carried an add-in directly, and one they were in nested.
    await w.groups("emea")
    c, v = rep("left")
    assert c == "left_group" and v.startswith("You left group sales at ")
    assert "; it carried left." in v and _hhmm(v)
    await w.groups()
    c, v = rep("via-emea")
    assert c == "left_group" and "You left group emea at " in v
    assert "through it you were in group all-staff (emea → all-staff), which carried via-emea" in v
    # The cause is what the history says, not a generic "no assignment reaches you".
    for q in ("left", "via-emea", "unassigned", "chain", "mine"):
        assert "no assignment\nreaches you" not in rep(q)[1] and rep(q)[0] != "not_assigned"


async def test_why_names_the_group_left_while_still_installed_and_the_nesting_turned_off(
    world: World,
) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)
    x, n = await w.catalog("tables"), await w.catalog("clauses")
    await w.groups("sales", "emea")
    await w.to_group("sales", x)
    await w.nesting(True)
    await w.parents("emea", "legal")
    await w.to_group("legal", n)
    await a.launch(Host.WORD)
    await w.groups("emea")
    rep = why(conn, "tables", Host.WORD)
    assert rep.cause == "pending_remove"
    assert rep.verdict.startswith(
        "Still in Word: tables is removed when Word next starts, because no assignment "
        "reaches you any more: you left group sales at "
    )
    assert any(s.label == "history" and "You left group sales" in s.detail for s in rep.steps)
    await w.nesting(False)
    off = w.rev
    rep = why(conn, "clauses", Host.WORD)
    assert rep.cause == "nested_disabled"
    assert "the admin turned nested groups off at " in rep.verdict
    assert f"(revision {off})" in rep.verdict and "emea → legal" in rep.verdict


async def test_every_verdict_says_how_fresh_it_is_and_a_stale_negative_says_as_of(
    world: World,
) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)
    await w.catalog("lonely")
    x = await w.catalog("here")
    await w.everyone(x)
    # The daemon's own transition for a connection (no broker needed to record it).
    await a._on_connect(False)
    now = time.time()
    live = why(conn, "lonely", Host.WORD, running=True, now=now)
    assert live.cause == "not_assigned" and "as of" not in live.verdict
    assert live.freshness is not None
    assert live.freshness["connected"] is True and live.freshness["stale"] is False
    assert live.freshness["broker_at"] == now
    # The daemon stopped since: every answer is as of its last contact.
    stopped = why(conn, "lonely", Host.WORD, running=False, now=now)
    f = stopped.freshness
    assert f is not None and f["stale"] is True and f["daemon_running"] is False
    assert f["broker_at"] is not None and f["as_of"] == f["broker_at"]
    assert stopped.cause == "not_assigned"
    assert stopped.verdict.startswith("lonely is not assigned to you as of ")
    assert "; this machine has not synced since then (the agent is not running)" in stopped.verdict
    # A positive verdict keeps its words, and carries the freshness all the same.
    pos = why(conn, "here", Host.WORD, running=False, now=now)
    assert pos.cause == "pending_install" and "as of" not in pos.verdict
    assert pos.to_json()["freshness"]["stale"] is True
    # Running but cut off from the broker: fresh for STALE_AFTER, then stale.
    await a._on_disconnect("connection refused")
    assert why(conn, "lonely", Host.WORD, running=True, now=now).freshness["stale"] is False  # type: ignore[index]
    late = why(conn, "lonely", Host.WORD, running=True, now=now + STALE_AFTER + 1)
    assert late.freshness is not None and late.freshness["stale"] is True
    assert "(the agent is not connected to the broker)" in late.verdict


async def test_verdicts_read_as_sentences(world: World) -> None:
    w, a = world, world.agent
    conn = open_readonly(a.config.cache_path)
    av = await w.catalog("two-hosts", hosts=("Word", "Excel"))
    await w.everyone(av, Mode.AVAILABLE)
    rep = why(conn, "two-hosts")
    assert "it appears when Word and Excel next start." in rep.verdict
    assert "(s)" not in rep.verdict
    assert any(s.detail == "available (strongest of 1 assignment)" for s in rep.steps)
    both = await w.catalog("both", hosts=("Word", "Excel"))
    await w.everyone(both)
    await a.launch(Host.WORD)
    await a.launch(Host.EXCEL)
    await w.tombstone(Topic.catalog(T, both))
    rep = why(conn, "both")
    assert "it is removed from Excel, Word when Excel and Word next start." in rep.verdict
