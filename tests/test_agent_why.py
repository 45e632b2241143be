"""`why` gives the right verdict for each distinct cause of a missing add-in, answering from
the cache file alone (read-only connection), with a real file cache and folder applier.

State arrives through `Agent.accept` (the same path as a broker message) and manifests
through the fetcher's verification, so no broker or server is needed here.
"""

from __future__ import annotations

import hashlib
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
    Source,
    Tombstone,
    Topic,
)
from agent.cache import open_readonly
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify
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
    ) -> str:
        aid = addin_id(name)
        xml = manifest(name, version, hosts, permissions=manifest_perms or perms)
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
