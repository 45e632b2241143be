"""Group commit of admin writes (`server_stub/service/unit_of_work.py`): concurrent writes
share a transaction, each in its own savepoint, on SQLite and PostgreSQL; a refused write
does not take its group mates down; revisions, audit lines and retained messages stay one
per write and in order; a reply means the write is committed (a SIGKILLed server keeps
every write it acknowledged)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_helpers import ServerProcess, manifest
from server_helpers import retained_state

from server_stub import db
from server_stub.service import NotFound, Service
from simulator.mosquitto import MosquittoBroker

NOTES = manifest("Notes")




async def _audit(service: Service) -> dict[int, tuple[str, dict[str, Any]]]:
    rows = await service.database.rows("SELECT revision, operation, detail FROM audit")
    return {int(r[0]): (str(r[1]), json.loads(r[2])) for r in rows}


async def test_concurrent_writes_share_one_commit_and_keep_their_own_revisions(
    service: Service,
) -> None:
    for i in range(20):
        await service.create_user(f"u{i:02d}", f"U {i}")
    before, commits = await service.revision(), service._uow.commits
    results = await asyncio.gather(
        *(service.create_group(f"g{i:02d}", f"G {i}") for i in range(20))
    )
    # Started in one turn of the event loop: one transaction for all twenty.
    assert service._uow.commits - commits == 1
    revisions = [r["revision"] for r in results]
    assert sorted(revisions) == list(range(before + 1, before + 21))
    assert await service.revision() == before + 20
    audit = await _audit(service)
    for r in results:
        assert audit[r["revision"]] == ("create_group", {"id": r["id"], "name": r["name"]})
    # One outbox row per write, in revision order, each naming its own group.
    rows = await service.database.rows(
        "SELECT revision, topic FROM outbox WHERE revision > ? ORDER BY id", (before,)
    )
    assert [int(r[0]) for r in rows] == sorted(revisions)
    by_rev = {r["revision"]: r["id"] for r in results}
    assert all(by_rev[int(rev)] in str(t).split("/") for rev, t in rows)


async def test_a_refused_write_does_not_fail_its_group_mates(service: Service) -> None:
    for name in ("ann", "bob", "cid"):
        await service.create_user(name, name)
    before, commits = await service.revision(), service._uow.commits

    async def broken_statement() -> None:
        # Fails inside the database (on PostgreSQL this aborts the transaction unless
        # the write's savepoint is rolled back to).
        async with service._uow.write("broken", {}) as tx:
            await tx.execute("INSERT INTO no_such_table VALUES (1)")

    results = await asyncio.gather(
        service.create_group("g1", "G1"),
        service.delete_user("nobody"),  # refused: NotFound
        service.add_member("nobody", "ann"),  # refused: no such group
        broken_statement(),
        service.create_group("g2", "G2"),
        service.add_member("g1", "bob"),  # sees g1, created earlier in the same transaction
        return_exceptions=True,
    )
    assert service._uow.commits - commits == 1
    g1, gone, no_group, broken, g2, member = results
    assert isinstance(gone, NotFound) and isinstance(no_group, NotFound)
    assert isinstance(broken, Exception) and not isinstance(broken, NotFound)
    assert isinstance(g1, dict) and isinstance(g2, dict) and isinstance(member, dict)
    # Refused writes take no revision: the three that committed are the next three.
    assert [g1["revision"], g2["revision"], member["revision"]] == [before + 1, before + 2,
                                                                     before + 3]  # fmt: skip
    assert (await service.get_group("g1"))["members"] == ["bob"]
    assert "nobody" not in await service.user_ids()
    audit = await _audit(service)
    assert [audit[before + i][0] for i in (1, 2, 3)] == ["create_group", "create_group",
                                                           "add_member"]  # fmt: skip
    assert max(audit) == before + 3


async def test_sequential_writes_each_commit_before_returning(
    service: Service, db_target: str
) -> None:
    commits = service._uow.commits
    for i in range(3):
        r = await service.create_user(f"s{i}", "S")
        # Committed: another connection sees it at once.
        other = await db.Database.open(db_target)
        try:
            assert int((await other.rows("SELECT value FROM meta WHERE key='revision'"))[0][0]) \
                == r["revision"]  # fmt: skip
        finally:
            await other.close()
    assert service._uow.commits - commits == 3


# -- a real server over HTTP ----------------------------------------------------------------


@pytest.fixture
async def server(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker, db=db_target)
    yield srv
    await srv.aclose()


async def test_concurrent_http_writes_all_commit_and_publish_in_order(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    addin = (await server.upload(NOTES))["addin_id"]
    users = [f"u{i:02d}" for i in range(32)]
    for u in users:
        await server.user(u)
    sem = asyncio.Semaphore(16)

    async def assign(u: str, mode: str) -> httpx.Response:
        async with sem:
            body = {"target": "user", "target_id": u, "mode": mode}
            return await server.http.post(f"/v1/addins/{addin}/assign", json=body)

    # Every user twice (optional, then fixed) and eight refused writes among them.
    calls = [assign(u, "optional") for u in users] + [assign(f"ghost{i}", "fixed")
                                                      for i in range(8)]  # fmt: skip
    random.Random(7).shuffle(calls)
    first = await asyncio.gather(*calls)
    second = await asyncio.gather(*(assign(u, "fixed") for u in users))
    ok = [r for r in first + second if r.status_code == 200]
    refused = [r for r in first if r.status_code != 200]
    assert len(ok) == 64 and len(refused) == 8
    assert all(r.status_code == 404 and "unknown user 'ghost" in r.text for r in refused)
    revisions = sorted(r.json()["revision"] for r in ok)
    assert len(set(revisions)) == 64 and revisions[-1] - revisions[0] == 63  # no gaps
    audit = {a["revision"]: a for a in await server.call("GET", "/v1/audit?limit=1000")}  # type: ignore[union-attr]
    for r in ok:
        reply = r.json()
        line = audit[reply["revision"]]
        assert line["operation"] == "assign"
        assert (line["detail"]["target_id"], line["detail"]["mode"]) == (reply["target_id"],
                                                                          reply["mode"])  # fmt: skip
    # The broker holds each user's latest write: the fixed one, with its revision.
    latest = {r.json()["target_id"]: r.json()["revision"] for r in second}

    async def published() -> bool:
        state = await retained_state(broker.port)
        got = {t.split("/")[-2]: p["revision"] for t, p in state.items() if t.startswith("assign/user/")}
        return got == latest

    for _ in range(100):
        if await published():
            break
        await asyncio.sleep(0.2)
    state = await retained_state(broker.port)
    assert {t.split("/")[-2]: (p["revision"], p["mode"]) for t, p in state.items()
            if t.startswith("assign/user/")} == {u: (rev, "fixed") for u, rev in latest.items()}  # fmt: skip


async def test_a_killed_server_keeps_every_write_it_acknowledged(
    server: ServerProcess, broker: MosquittoBroker
) -> None:
    addin = (await server.upload(NOTES))["addin_id"]
    users = [f"k{i:03d}" for i in range(200)]
    await server.call("POST", "/v1/org", json={"users": [{"id": u} for u in users]})
    acked: dict[str, int] = {}
    stop, enough = asyncio.Event(), asyncio.Event()

    async def writer(mine: list[str]) -> None:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.http.headers, timeout=20
        ) as http:
            for u in mine:
                if stop.is_set():
                    return
                body = {"target": "user", "target_id": u, "mode": "fixed"}
                try:
                    r = await http.post(f"/v1/addins/{addin}/assign", json=body)
                except httpx.HTTPError:
                    return  # the server died with this write in flight: no reply, no promise
                assert r.status_code == 200, r.text
                acked[u] = r.json()["revision"]
                if len(acked) >= 60:
                    enough.set()

    writers = [asyncio.create_task(writer(users[i::16])) for i in range(16)]
    async with asyncio.timeout(30):
        await enough.wait()
    server.kill()  # SIGKILL, writes in flight
    stop.set()
    await asyncio.gather(*writers)
    assert 60 <= len(acked) < len(users)
    server.start()
    assigned = {a["target_id"] for a in (await server.call("GET", f"/v1/addins/{addin}"))["assignments"]}  # type: ignore[union-attr]
    assert set(acked) <= assigned, f"acknowledged and lost: {sorted(set(acked) - assigned)}"
    audit = {a["revision"]: a["detail"]["target_id"]
             for a in await server.call("GET", "/v1/audit?operation=assign&limit=1000")}  # type: ignore[union-attr]  # fmt: skip
    assert all(audit[rev] == u for u, rev in acked.items())
    # And the restarted server publishes all of it.
    for _ in range(50):
        state = await retained_state(broker.port)
        held = {t.split("/")[-2]: p["revision"] for t, p in state.items() if t.startswith("assign/user/")}
        if set(acked) <= set(held):
            break
        await asyncio.sleep(0.2)
    assert all(held.get(u, -1) >= rev for u, rev in acked.items())
