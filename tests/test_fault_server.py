"""Fault suite, server side: the server killed between its commit and its publish (20 times,
through its ADDIN_SERVER_CRASH_AFTER_COMMIT hook), its database locked by another writer,
and its disk full (a tiny file-size limit). The admin gets a clear error, nothing is
half-written, and it recovers: every committed change reaches the broker exactly once and
every client converges to the oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import resource
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
from fault_helpers import (
    ADMIN_TOKEN,
    REPO,
    TENANT,
    USERS,
    Rollout,
    converge,
    integrity,
    nothing_lost,
    org_actions,
    regressions,
    start_agents,
    start_system,
    stop_agents,
)
from server_helpers import Collector, eventually

from server_stub.publisher import Publisher
from simulator.mosquitto import MosquittoBroker

CRASHES = 20


async def test_server_killed_between_commit_and_publish_20_times(
    tmp_path: Path, broker: MosquittoBroker, db_target: str
) -> None:
    # On both backends: PostgreSQL's outbox is drained under an advisory lock, SQLite's by
    # the one process that opened it.
    server, admin, _ = await start_system(tmp_path, broker, db=db_target)
    rollout = Rollout(seed=630)
    await admin.apply(rollout.step())
    await eventually(lambda: server.unpublished() == 0, 20, "the initial outbox to drain")
    server.kill()
    async with Collector(broker.port) as wire:
        try:
            for i in range(CRASHES):
                server.start(crash_after_commit=True)
                await admin.apply(rollout.step())
                rev = admin.revisions[-1]
                assert server.wait_exit() == 70, server.log_tail()
                # Committed, and not one of its messages published.
                assert server.unpublished() > 0, f"crash {i}"
                assert not wire.by_revision(rev), f"crash {i}: published before the crash"
                # Recovery is the server's own publisher on the same database (run here,
                # in-process, to keep 20 cycles cheap; the real `serve` restarts below).
                publisher = Publisher(str(server.db), TENANT, broker.url)
                task = asyncio.create_task(publisher.run())
                try:
                    await eventually(lambda: server.unpublished() == 0, 20, f"crash {i}: publish")
                    await eventually(lambda r=rev: bool(wire.by_revision(r)), 10, "the messages")  # type: ignore[misc]
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                # Exactly once: one message per topic of that revision.
                topics = [wire.short(t) for t, p, _ in wire.messages if p.get("revision") == rev]
                assert len(topics) == len(set(topics)), (i, topics)
            server.start()
            users = USERS[:6]
            agents = await start_agents(tmp_path, broker, server, users)
            try:
                assert await converge(agents, admin.truth, timeout=60) == {}
            finally:
                await stop_agents(agents)
            await nothing_lost(server, broker)
        finally:
            server.kill()
    for u in users:
        cache = tmp_path / f"{u}-pc.sqlite"
        assert integrity(cache) == "ok"
        assert regressions(cache) == []
    # Every committed revision was published (0 lost changes).
    published = {p.get("revision") for _, p, _ in wire.messages}
    assert set(admin.revisions[-CRASHES:]) <= published


def _cli(db: Path, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess[str]:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = dict(os.environ, ADDIN_SERVER_BUSY_TIMEOUT="1")
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        preexec_fn=limit,
    )


def _largest_file(db: Path) -> int:
    """The largest of the database, its WAL and shared-memory files."""
    return max(os.path.getsize(p) for p in glob.glob(f"{db}*"))


async def test_database_locked_clear_error_then_recovers(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    server, admin, _ = await start_system(tmp_path, broker, org=4, busy_timeout=1)
    try:
        before = server.db_revision()
        locker = sqlite3.connect(server.db, timeout=5, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            async with httpx.AsyncClient(
                base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as http:
                r = await http.post("/v1/users", json={"id": "zed"}, timeout=30)
            assert r.status_code == 503, r.text
            assert "nothing was changed" in r.json()["detail"]
            assert "locked" in r.json()["detail"]
            cli = _cli(server.db, "user", "add", "zoe")
            assert cli.returncode == 1
            assert "nothing was changed" in cli.stderr and "Traceback" not in cli.stderr
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert server.db_revision() == before
        # Recovered: the same requests now succeed and are published.
        await admin.apply(org_actions()[4])
        assert _cli(server.db, "user", "add", "zoe").returncode == 0
        assert server.proc is not None and server.proc.poll() is None
        await nothing_lost(server, broker)
        assert integrity(server.db) == "ok"
    finally:
        server.kill()


async def test_disk_full_clear_error_nothing_half_written_then_recovers(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    server, _, _ = await start_system(tmp_path, broker)
    try:
        await eventually(lambda: server.unpublished() == 0, 20, "the outbox to drain")
        org = {
            "users": [{"id": f"bulk{i:05d}", "name": f"Bulk user {i}"} for i in range(3000)],
            "groups": [{"id": "bulk", "members": [f"bulk{i:05d}" for i in range(3000)]}],
        }
        org_file = tmp_path / "org.yaml"
        org_file.write_text(json.dumps(org))  # JSON is YAML
        before = server.db_revision()
        # A disk with room for what exists plus 32 KiB: the bulk load cannot fit.
        full = _cli(server.db, "load", str(org_file), fsize=_largest_file(server.db) + 32 * 1024)
        assert full.returncode == 1, (full.stdout, full.stderr)
        assert "nothing was changed" in full.stderr and "Traceback" not in full.stderr
        assert "full" in full.stderr or "I/O" in full.stderr, full.stderr
        assert server.db_revision() == before
        assert integrity(server.db) == "ok"
        with contextlib.closing(sqlite3.connect(server.db)) as c:
            assert c.execute("SELECT count(*) FROM users WHERE id LIKE 'bulk%'").fetchone()[0] == 0
        # The server kept running and serving; with room again the same load succeeds.
        assert server.proc is not None and server.proc.poll() is None
        ok = _cli(server.db, "load", str(org_file))
        assert ok.returncode == 0, ok.stderr
        assert server.db_revision() == before + 1
        await nothing_lost(server, broker)
        assert integrity(server.db) == "ok"
    finally:
        server.kill()
