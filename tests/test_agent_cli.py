"""`addin-agent` as a user runs it: the daemon as a real process (SIGTERM shutdown), the
control endpoint on a unix socket, and every troubleshooting command on the cache file."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_helpers import ServerProcess, addin_id, lab_agent_toml, manifest, until
from click.testing import CliRunner
from harness import AgentProcess

from agent.cache import Cache, Tx
from agent.cli import main
from simulator.mosquitto import MosquittoBroker


@pytest.fixture
async def server(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker)
    await srv.user("ann")
    yield srv
    await srv.aclose()


def cli(cfg: Path, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["--config", str(cfg), *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def cli_json(cfg: Path, *args: str) -> object:
    code, out = cli(cfg, *args, "--json")
    assert code == 0, out
    return json.loads(out)


async def test_daemon_and_commands(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    notes, avail = addin_id("notes"), addin_id("avail")
    await server.upload(manifest("notes", hosts=("Word", "Excel")))
    await server.upload(manifest("avail"))
    await server.assign(notes, "everyone", mode="fixed")
    await server.assign(avail, "everyone", mode="available")
    cfg = lab_agent_toml(tmp_path, broker, server)
    daemon = AgentProcess(
        cfg, tmp_path / "daemon.log", env={**os.environ, "ADDIN_AGENT_CONFIG": ""}
    )
    proc = daemon.proc
    try:

        def ready() -> bool:
            if not (tmp_path / "cache.sqlite").exists():
                return False
            try:
                st = cli_json(cfg, "status")
            except (AssertionError, json.JSONDecodeError):
                return False
            assert isinstance(st, dict)
            return (
                bool(st["connected"]) and st["pending_per_host"].get("Word", {}).get("ready") == 1
            )

        await until(ready, timeout=20, what="daemon connected with a ready change")
        # launch goes through the daemon's unix socket
        body = cli_json(cfg, "launch", "Word")
        assert body == {
            "host": "Word",
            "installed": {notes: "1.0.0.0"},
            "applied": 1,
            "via": "daemon",
        }
        assert (tmp_path / "wef" / "Word" / f"{notes}.xml").exists()
        code, out = cli(cfg, "remove", "notes")
        assert code == 1 and "fixed" in out
        assert "will be installed" in str(cli_json(cfg, "install", "avail"))
        assert set(cli_json(cfg, "launch", "Word")["installed"]) == {notes, avail}  # type: ignore[index]

        rows = cli_json(cfg, "list", "--host", "Word")
        assert isinstance(rows, list)
        assert {(r["name"], r["mode"], r["installed_version"]) for r in rows} == {
            ("notes", "fixed", "1.0.0.0"),
            ("avail", "available", "1.0.0.0"),
        }
        rep = cli_json(cfg, "why", "notes", "--host", "Excel")
        assert isinstance(rep, dict) and rep["cause"] == "pending_install"
        # Every answer says how fresh it is: live while the daemon runs, connected.
        fresh = rep["freshness"]
        assert (fresh["daemon_running"], fresh["connected"], fresh["stale"]) == (True, True, False)
        code, out = cli(cfg, "why", "notes", "--host", "Excel")
        assert code == 0 and "applies when Excel next starts" in out.replace("\n", " ")
        assert "data: live: the agent is running and connected to the broker" in out
        evs = cli_json(cfg, "events", "--since", "1h")
        assert isinstance(evs, list)
        kinds = {e["kind"] for e in evs}
        assert {"connected", "received", "manifest_verified", "applied", "user_choice"} <= kinds
        assert cli_json(cfg, "query", "select count(*) as n from installed") == [{"n": 2}]
        code, out = cli(cfg, "query", "delete from events")
        assert code == 1 and "readonly" in out
        checks = cli_json(cfg, "doctor")
        assert isinstance(checks, list)
        assert {c["name"]: c["status"] for c in checks}["cache integrity"] == "ok"
        assert all(c["status"] != "fail" for c in checks), checks

        # SIGTERM: clean shutdown, socket removed, cache closed and consistent.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not (tmp_path / "agent.sock").exists()
        conn = sqlite3.connect(tmp_path / "cache.sqlite")
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT value FROM sync WHERE key='connected'").fetchone()[0] == "0"
        conn.close()

        # With the daemon stopped, everything still answers from the cache alone.
        st = cli_json(cfg, "status")
        assert isinstance(st, dict) and st["daemon_running"] is False
        # ... as of the daemon's last contact with the broker, which its stop recorded.
        rep = cli_json(cfg, "why", "notes")
        assert isinstance(rep, dict)
        fresh = rep["freshness"]
        assert (fresh["daemon_running"], fresh["connected"], fresh["stale"]) == (False, False, True)
        assert fresh["broker_at"] >= st["last_message_at"] and fresh["as_of"] == fresh["broker_at"]
        code, out = cli(cfg, "why", "notes")
        assert code == 0 and "data: STALE: the agent is not running" in out.replace("\n", " ")
        # (in a thread: the command runs its own event loop, as it does in a shell)
        body = await asyncio.to_thread(cli_json, cfg, "launch", "Excel")
        assert body == {
            "host": "Excel",
            "installed": {notes: "1.0.0.0"},
            "applied": 1,
            "via": "cache",
        }
    finally:
        daemon.kill()


def test_bad_config_and_missing_cache(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('tenant = "contoso"\nuser_id = "a b"\n')
    code, out = cli(bad, "status")
    assert code == 1 and "user_id" in out and "client_id" in out
    ok = tmp_path / "ok.toml"
    ok.write_text(
        f'tenant = "contoso"\nuser_id = "ann"\nclient_id = "pc"\ninsecure = true\ncache_path = "{tmp_path / "none.sqlite"}"\n'
    )
    code, out = cli(ok, "why", "x")
    assert code == 1 and "no agent cache" in out
    assert not (tmp_path / "none.sqlite").exists()  # read-only commands never create it


@pytest.mark.parametrize(
    "name", ["c?mode=rwc", "c#frag.sqlite", "c%41.sqlite", "c?mode=memory&cache=shared"]
)
def test_read_only_commands_open_a_cache_whose_name_looks_like_uri_syntax(
    tmp_path: Path, name: str
) -> None:
    # SQLite reads "?" as the start of URI parameters, "#" as a fragment and decodes "%41":
    # unescaped, "c?mode=rwc" opened (and created) "c" read-write instead of the cache.
    folder = tmp_path / "caches"
    folder.mkdir()
    cache = folder / name

    async def fill() -> None:
        c = await Cache.open(cache)
        tx = Tx()
        tx.event("disconnected", "written to the oddly named cache")
        await c.commit(tx)
        await c.close()

    asyncio.run(fill())
    before = sorted(p.name for p in folder.iterdir())
    r = CliRunner().invoke(main, ["--cache", str(cache), "events", "--json"])
    assert r.exit_code == 0, r.output
    assert any(e["detail"] == "written to the oddly named cache" for e in json.loads(r.output))
    for args in (["status"], ["list"], ["why", "x"], ["query", "SELECT count(*) FROM events"]):
        r = CliRunner().invoke(main, ["--cache", str(cache), *args])
        assert r.exit_code in (0, 2), (args, r.output)
    # A WAL reader may bring back the cache's own -wal/-shm sidecars; nothing else appears.
    created = {p.name for p in folder.iterdir()} - set(before)
    assert created <= {f"{name}-wal", f"{name}-shm"}, created
