"""A transition the cache refuses (disk full: SQLite's "database or disk is full") leaves the
agent's memory equal to its cache, so it recovers by itself once there is room: a message
redelivered is accepted, and a manifest whose bytes never reached the cache is fetched again
instead of every launch failing with "no manifest XML". A real cache file and folder applier;
only the cache's commit is made to fail, as a full disk makes it fail."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import addin_id, manifest

from addin_core.protocol import Assignment, CatalogEntry, Host, Mode, Source, Topic
from agent.cache import Tx
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.fetcher import verify

T = "contoso"


class DiskFull:
    """While `full`, every commit fails the way SQLite does on ENOSPC."""

    def __init__(self, agent: Agent) -> None:
        assert agent.cache is not None
        self.real = agent.cache.commit
        self.full = False
        agent.cache.commit = self.commit  # type: ignore[method-assign]

    async def commit(self, tx: Tx) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        await self.real(tx)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(
        tenant=T, user_id="ann", client_id="ann-pc", insecure=True,
        broker_url="mqtt://127.0.0.1:1", server_url="http://127.0.0.1:1",
        cache_path=str(tmp_path / "cache.sqlite"), applier="folder",
        applier_dir=str(tmp_path / "wef"), control=None,
    )  # fmt: skip
    yield Agent(config)


def catalog(name: str, rev: int) -> tuple[CatalogEntry, bytes]:
    xml = manifest(name)
    digest = hashlib.sha256(xml).hexdigest()
    entry = CatalogEntry(
        revision=rev, addin_id=addin_id(name), name=name, source=Source.LOB,
        version="1.0.0.0", manifest_sha256=digest, manifest_url=f"/v1/manifests/{digest}",
        hosts=[Host.WORD], permissions="ReadDocument", enabled=True,
    )  # fmt: skip
    return entry, xml


async def deliver(agent: Agent, topic: Topic, payload: Any) -> None:
    await agent.handle_message(str(topic), payload.to_bytes())


async def test_manifest_lost_to_a_full_disk_is_fetched_again_and_launch_works(
    agent: Agent,
) -> None:
    await agent.open()
    disk = DiskFull(agent)
    entry, xml = catalog("crm", 1)
    await deliver(agent, Topic.catalog(T, entry.addin_id), entry)
    await deliver(agent, Topic.assign_everyone(T, entry.addin_id), Assignment(revision=2, mode=Mode.FIXED))  # fmt: skip
    disk.full = True
    with pytest.raises(sqlite3.OperationalError):
        await agent._record_manifest(entry, verify(entry, xml))
    disk.full = False
    # Memory did not keep a manifest the cache lacks: it is still to fetch, and a launch now
    # waits for it instead of failing.
    assert entry.manifest_sha256 not in agent.manifests
    assert await agent.launch(Host.WORD) == {}
    await agent._record_manifest(entry, verify(entry, xml))
    assert await agent.launch(Host.WORD) == {entry.addin_id: "1.0.0.0"}
    assert await agent.cache.manifest_xml(entry.manifest_sha256) == xml  # type: ignore[union-attr]
    await agent.stop()


async def test_message_refused_by_a_full_disk_is_accepted_when_redelivered(agent: Agent) -> None:
    await agent.open()
    disk = DiskFull(agent)
    entry, _ = catalog("crm", 1)
    await deliver(agent, Topic.catalog(T, entry.addin_id), entry)
    assign = Assignment(revision=2, mode=Mode.FIXED)
    disk.full = True
    with pytest.raises(sqlite3.OperationalError):
        await deliver(agent, Topic.assign_everyone(T, entry.addin_id), assign)
    assert agent.revision == 1 and entry.addin_id not in agent.entitlements()
    disk.full = False
    # The broker redelivers what was not acknowledged: it must not look stale now.
    await deliver(agent, Topic.assign_everyone(T, entry.addin_id), assign)
    assert agent.revision == 2 and entry.addin_id in agent.entitlements()
    assert agent.cache is not None
    rows = await agent.cache.fetchall("SELECT addin_id FROM entitlements")
    assert [r["addin_id"] for r in rows] == [entry.addin_id]
    await agent.stop()
