"""Numbered schema migrations (server_stub/migrations.py) on both backends, and the upgrade of
a database made by the server at commit 6543017 (tests/data/server-6543017.sql)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from addin_core.protocol import AgentReport, AppliedAddin, Host
from server_stub import db, migrations
from server_stub.service import Service

OLD_DUMP = Path(__file__).parent / "data" / "server-6543017.sql"
SHEETS = "9475b9bb-ff88-476f-917d-33a9c632508a"


def _old_database(path: Path) -> Path:
    with sqlite3.connect(path) as c:
        c.executescript(OLD_DUMP.read_text())
    return path


async def _applied(database: db.Database) -> list[int]:
    return [int(r[0]) for r in await database.rows(
        "SELECT number FROM schema_migrations ORDER BY number")]  # fmt: skip


@pytest.fixture
async def fresh(db_target: str) -> AsyncIterator[db.Database]:
    database = await db.Database.open(db_target)
    yield database
    await database.close()


async def test_a_new_database_gets_every_migration_once(db_target: str, fresh: db.Database) -> None:
    numbers = [m.number for m in migrations.MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1)), "numbered 1, 2, 3... in order"
    assert await _applied(fresh) == numbers
    await fresh.close()
    again = await db.Database.open(db_target)  # opening again applies nothing twice
    try:
        assert await _applied(again) == numbers
        assert (await again.rows("SELECT value FROM meta WHERE key='schema'"))[0][0] == str(
            migrations.LATEST
        )
    finally:
        await again.close()


async def test_a_schema_newer_than_this_server_is_refused(db_target: str) -> None:
    database = await db.Database.open(db_target)
    async with database.write() as conn:
        await conn.execute(
            "INSERT INTO schema_migrations(number, what, applied_at) VALUES (?, 'future', 0)",
            (migrations.LATEST + 1,),
        )
    await database.close()
    with pytest.raises(db.DatabaseError, match=f"schema {migrations.LATEST + 1} is newer"):
        await db.Database.open(db_target)


async def test_the_database_of_commit_6543017_upgrades_and_keeps_its_data(tmp_path: Path) -> None:
    path = _old_database(tmp_path / "old.db")
    with sqlite3.connect(path) as c:
        assert "role" not in {r[1] for r in c.execute("PRAGMA table_info(audit)")}
        assert not c.execute("SELECT 1 FROM sqlite_master WHERE name='rollouts'").fetchall()
    database = await db.Database.open(path)
    try:
        assert await _applied(database) == [m.number for m in migrations.MIGRATIONS]
        service = Service(database, "contoso")
        assert await database.stored_tenant() == "contoso"
        assert await service.revision() == 6
        assert await database.published_revision() == 4
        assert await database.outbox_waiting() == 2  # revisions 5 and 6, still to publish
        assert (await service.get_user("bob"))["groups"] == ["sales"]
        old_audit = await database.rows("SELECT role, via FROM audit ORDER BY id")
        assert [tuple(r) for r in old_audit] == [("admin", "")] * 6
        report = await database.rows("SELECT revision, failed, cached FROM reports")
        assert [tuple(r) for r in report] == [(6, "[]", "[]")]
        # The new tables and columns work: a rollout, an exclusion, a report with cache.
        await service.create_user("cat", "Cat")
        await service.add_member("sales", "cat")
        await service.assign(SHEETS, "group", "sales", "fixed", ["user:cat"])
        assert (await service.explain("cat", SHEETS))["entitled"] is False
        await service.record_reports([AgentReport(
            client_id="bob-pc", user_id="bob", revision=await service.revision(),
            reported_at=1.0, applied=[], cached=[AppliedAddin(
                addin_id=SHEETS, version="1.0.0.0", host=Host.EXCEL)])])  # fmt: skip
        cached = await database.rows("SELECT cached FROM reports WHERE client_id='bob-pc'")
        assert SHEETS in cached[0][0]
        assert (await database.rows("SELECT count(*) FROM rollouts"))[0][0] == 0
    finally:
        await database.close()


async def test_a_database_whose_columns_were_added_on_open_upgrades_too(tmp_path: Path) -> None:
    """Code between 6543017 and numbered migrations added columns on open, without a record:
    such a database has some of migration 2-3's columns already."""
    path = _old_database(tmp_path / "between.db")
    with sqlite3.connect(path) as c:
        c.execute("ALTER TABLE audit ADD COLUMN role TEXT NOT NULL DEFAULT 'admin'")
        c.execute("ALTER TABLE reports ADD COLUMN cached TEXT NOT NULL DEFAULT '[]'")
    database = await db.Database.open(path)
    try:
        assert await _applied(database) == [m.number for m in migrations.MIGRATIONS]
        cols = {str(r[0]) for r in await database.rows("SELECT name FROM pragma_table_info('reports')")}
        assert {"failed", "cached"} <= cols
    finally:
        await database.close()


async def test_an_unreachable_postgresql_is_one_clear_error() -> None:
    with pytest.raises(db.DatabaseError, match=r"cannot connect to postgresql://nobody@127.0.0.1:1/x"):
        await db.Database.open("postgresql://nobody:secret@127.0.0.1:1/x")


async def test_concurrent_writers_on_two_connections_get_one_revision_each_in_order(
    db_target: str,
) -> None:
    """Two `Database`s on one database (two replicas, or serve and a CLI), 2 x 20 writes at
    once: revisions 1..40 each once, and the outbox in commit order (ids follow revisions)."""
    first = await db.Database.open(db_target)
    await first.bind_tenant("contoso")
    second = await db.Database.open(db_target)
    try:
        services = [Service(first, "contoso"), Service(second, "contoso")]
        results = await asyncio.gather(*(
            services[i % 2].create_user(f"u{i}", f"U{i}") for i in range(40)))  # fmt: skip
        assert sorted(int(r["revision"]) for r in results) == list(range(1, 41))
        outbox = [int(r[0]) for r in await first.rows("SELECT revision FROM outbox ORDER BY id")]
        assert outbox == sorted(outbox) and set(outbox) == set(range(1, 41))
        assert await services[1].revision() == 40
    finally:
        await first.close()
        await second.close()
