"""The host lifecycle watcher (agent/hostwatch.py) and what the daemon does with it, with real
processes named like the host apps: start, exit, a restart while a change is pending, two
hosts at once, a crash (SIGKILL), a host already running when the daemon starts — and the
whole path through `addin-agent run`: an admin assigns an add-in, "Word" starts and exits,
the manifest is in Word's folder and `why` says it was installed at Word's launch, with no
`launch` command anywhere."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import (
    ServerProcess,
    addin_id,
    agent_config,
    lab_agent_toml,
    manifest,
    settled,
    until,
)
from harness import AgentProcess, agent_env
from host_helpers import HostApp

from addin_core.protocol import Host
from agent.config import ConfigError, load_config
from agent.daemon import Agent
from agent.hostwatch import HostEvent, HostWatcher, default_processes
from simulator.mosquitto import MosquittoBroker

POLL = 0.1
"""The watcher's interval in these tests (seconds)."""

_TAG = secrets.token_hex(2)[:3].upper()
WORD, EXCEL = f"WINWORD{_TAG}.EXE", f"EXCEL{_TAG}.EXE"
"""Host names of these tests, unique to this run: on a shared machine another test's (or a
benchmark's) "Word" must not start or stop ours. Under 15 characters, the length Linux keeps
of a process name. The daemon test at the end uses the real default names."""
NAMES = {Host.WORD: (WORD,), Host.EXCEL: (EXCEL,)}


async def _ignore(_: HostEvent) -> None:
    return None


def watcher() -> HostWatcher:
    return HostWatcher(NAMES, POLL, _ignore)


def kinds(events: list[HostEvent]) -> list[tuple[Host, str]]:
    return [(e.host, e.kind) for e in events]


# -- the watcher alone ------------------------------------------------------------------------
async def test_start_and_exit_are_reported_with_the_pid(tmp_path: Path) -> None:
    w = watcher()
    await w.start()
    try:
        assert not w.running(Host.WORD)
        word = HostApp(tmp_path / "bin", WORD)
        try:
            events = w.poll()
            assert kinds(events) == [(Host.WORD, "started")]
            assert events[0].pid == word.pid and events[0].since < events[0].at
            assert w.running(Host.WORD) and w.pids(Host.WORD) == [word.pid]
            assert w.poll() == []  # nothing new
        finally:
            word.exit()
        events = w.poll()
        assert kinds(events) == [(Host.WORD, "exited")] and events[0].pid == word.pid
        assert not w.running(Host.WORD)
    finally:
        await w.stop()


async def test_a_host_running_before_the_watcher_is_running_without_a_start(
    tmp_path: Path,
) -> None:
    word = HostApp(tmp_path / "bin", WORD)
    try:
        w = watcher()
        await w.start()
        try:
            assert w.running(Host.WORD)
            assert w.poll() == []
        finally:
            await w.stop()
    finally:
        word.exit()


async def test_two_hosts_and_a_crash(tmp_path: Path) -> None:
    w = watcher()
    await w.start()
    word = HostApp(tmp_path / "bin", WORD)
    excel = HostApp(tmp_path / "bin", EXCEL)
    try:
        assert set(kinds(w.poll())) == {(Host.WORD, "started"), (Host.EXCEL, "started")}
        word.crash()  # SIGKILL: no orderly shutdown, just gone
        assert kinds(w.poll()) == [(Host.WORD, "exited")]
        assert w.running(Host.EXCEL)
    finally:
        word.exit()
        excel.exit()
        await w.stop()
    assert kinds(w.poll()) == [(Host.EXCEL, "exited")]


async def test_a_killed_host_not_yet_reaped_has_exited(tmp_path: Path) -> None:
    """A zombie (dead, its parent has not collected it) is not a running Word."""
    w = watcher()
    await w.start()
    word = HostApp(tmp_path / "bin", WORD)
    try:
        assert kinds(w.poll()) == [(Host.WORD, "started")]
        word.proc.kill()
        ok = False
        for _ in range(100):  # bounded: the kernel needs a moment to make it a zombie
            if kinds(w.poll()) == [(Host.WORD, "exited")]:
                ok = True
                break
            await asyncio.sleep(0.02)
        assert ok and word.proc.poll() is not None
    finally:
        word.exit()
        await w.stop()


async def test_a_second_process_of_a_host_is_not_a_new_start(tmp_path: Path) -> None:
    w = watcher()
    await w.start()
    one = HostApp(tmp_path / "bin", WORD)
    try:
        assert kinds(w.poll()) == [(Host.WORD, "started")]
        two = HostApp(tmp_path / "bin", WORD)
        try:
            assert w.poll() == [] and w.pids(Host.WORD) == sorted([one.pid, two.pid])
            one.exit()
            assert w.poll() == []  # Word still runs
        finally:
            two.exit()
        assert kinds(w.poll()) == [(Host.WORD, "exited")]
    finally:
        one.exit()
        await w.stop()


async def test_names_are_matched_whole_and_without_case(tmp_path: Path) -> None:
    w = watcher()
    await w.start()
    other = HostApp(tmp_path / "bin", WORD.removesuffix(".EXE"))
    lower = HostApp(tmp_path / "bin2", WORD.lower())
    try:
        assert kinds(w.poll()) == [(Host.WORD, "started")]
        assert w.pids(Host.WORD) == [lower.pid]
    finally:
        other.exit()
        lower.exit()
        await w.stop()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to setuid")
async def test_another_users_office_does_not_count(tmp_path: Path) -> None:
    """On a shared machine only the agent's own user's Word is Word."""
    nobody = pwd.getpwnam("nobody").pw_uid
    with tempfile.TemporaryDirectory() as shared:  # the test's tmp_path is private to root
        w = watcher()
        await w.start()
        theirs = HostApp(Path(shared), WORD, user=nobody)
        try:
            assert w.poll() == [] and not w.running(Host.WORD)
            mine = HostApp(Path(shared), WORD)
            try:
                assert kinds(w.poll()) == [(Host.WORD, "started")]
                assert w.pids(Host.WORD) == [mine.pid]
            finally:
                mine.exit()
        finally:
            theirs.crash()
            await w.stop()


async def test_the_loop_delivers_events_to_the_callback(tmp_path: Path) -> None:
    got: list[HostEvent] = []

    async def record(e: HostEvent) -> None:
        got.append(e)

    w = HostWatcher(NAMES, POLL, record)
    await w.start()
    try:
        word = HostApp(tmp_path / "bin", WORD)
        try:
            await until(lambda: kinds(got) == [(Host.WORD, "started")], 10, "the start")
        finally:
            word.exit()
        await until(lambda: len(got) == 2, 10, "the exit")
        assert kinds(got)[1] == (Host.WORD, "exited")
    finally:
        await w.stop()


def test_default_names_per_platform_and_configured_ones(tmp_path: Path) -> None:
    assert default_processes("win32")[Host.POWERPOINT] == ("POWERPNT.EXE",)
    assert default_processes("darwin")[Host.OUTLOOK] == ("Microsoft Outlook",)
    assert default_processes("linux")[Host.WORD] == ("WINWORD.EXE",)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'tenant = "contoso"\nuser_id = "ann"\nclient_id = "ann-pc"\ninsecure = true\n'
        'hosts = ["Word", "Excel"]\nwatch_hosts = true\n'
        'host_processes = {Word = ["WINWORD.EXE", "Word Beta"]}\n'
    )
    c = load_config(cfg, env={})
    assert c.watch_hosts and c.processes() == {
        Host.WORD: ("WINWORD.EXE", "Word Beta"),
        Host.EXCEL: ("EXCEL.EXE",),
    }
    env = {"ADDIN_AGENT_HOST_PROCESSES": '{"Excel": ["excel-test"]}'}
    assert load_config(cfg, env=env).processes()[Host.EXCEL] == ("excel-test",)
    cfg.write_text(cfg.read_text().replace('"Word Beta"', '""'))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, env={})
    assert e.value.problems == [
        f"invalid agent configuration in {cfg}: host_processes: Word: give at least one "
        'non-empty process name, e.g. Word = ["WINWORD.EXE"]'
    ]


# -- the daemon with the watcher ----------------------------------------------------------------
@pytest.fixture
async def server(tmp_path: Path, broker: MosquittoBroker) -> AsyncIterator[ServerProcess]:
    srv = ServerProcess(tmp_path, broker)
    await srv.user("ann")
    yield srv
    await srv.aclose()


@pytest.fixture
async def agent(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> AsyncIterator[Agent]:
    a = Agent(watched_config(tmp_path, broker, server))
    yield a
    await a.stop()


def watched_config(tmp: Path, broker: MosquittoBroker, server: ServerProcess) -> Any:
    return agent_config(
        tmp,
        broker,
        server,
        hosts=(Host.WORD, Host.EXCEL),
        watch_hosts=True,
        host_processes=NAMES,
        host_poll_interval=POLL,
    )


def in_folder(agent: Agent, host: Host) -> set[str]:
    d = Path(agent.config.applier_dir or "") / host.value
    return {p.stem for p in d.glob("*.xml")} if d.is_dir() else set()


def installed(agent: Agent, host: Host) -> set[str]:
    return set(agent.installed().get(host, {}))


async def assign_notes(server: ServerProcess, agent: Agent) -> str:
    notes = addin_id("notes")
    await server.upload(manifest("notes", hosts=("Word", "Excel")))
    await server.assign(notes, "everyone", mode="fixed")
    await until(lambda: sum(p.ready for p in agent.pending.values()) == 2, what="two ready changes")
    await settled(agent, server)
    return notes


async def test_ready_changes_are_written_while_the_host_is_not_running_and_applied_at_its_start(
    tmp_path: Path, server: ServerProcess, agent: Agent
) -> None:
    await agent.start()
    notes = await assign_notes(server, agent)
    # Written for the next start, not yet applied: Word has not started since.
    assert in_folder(agent, Host.WORD) == {notes} and in_folder(agent, Host.EXCEL) == {notes}
    assert agent.installed() == {}
    word = HostApp(tmp_path / "bin", WORD)
    try:
        await until(lambda: installed(agent, Host.WORD) == {notes}, 10, "Word's launch")
        assert (Host.EXCEL, notes) in agent.pending  # Excel has not started
    finally:
        word.exit()
    await until(lambda: not agent.watcher or not agent.watcher.running(Host.WORD), 10, "exit")
    assert in_folder(agent, Host.WORD) == {notes}  # an exit changes nothing


async def test_restart_while_a_change_is_pending(
    tmp_path: Path, server: ServerProcess, agent: Agent
) -> None:
    word = HostApp(tmp_path / "bin", WORD)
    try:
        await agent.start()  # Word already runs: nothing is written under it
        assert agent.watcher is not None and agent.watcher.running(Host.WORD)
        notes = await assign_notes(server, agent)
        assert in_folder(agent, Host.WORD) == set() and agent.installed() == {}
        assert in_folder(agent, Host.EXCEL) == {notes}  # Excel is not running
        word.exit()
        await until(lambda: in_folder(agent, Host.WORD) == {notes}, 10, "written at Word's exit")
        assert Host.WORD not in agent.installed()  # written, but Word has not loaded it
        word = HostApp(tmp_path / "bin", WORD)
        await until(lambda: installed(agent, Host.WORD) == {notes}, 10, "applied at the restart")
        assert Host.EXCEL not in agent.installed()
    finally:
        word.exit()


async def test_two_hosts_at_once_and_a_crash(
    tmp_path: Path, server: ServerProcess, agent: Agent
) -> None:
    word = HostApp(tmp_path / "bin", WORD)
    excel = HostApp(tmp_path / "bin", EXCEL)
    try:
        await agent.start()
        notes = await assign_notes(server, agent)
        assert in_folder(agent, Host.WORD) == set() == in_folder(agent, Host.EXCEL)
        excel.exit()
        await until(lambda: in_folder(agent, Host.EXCEL) == {notes}, 10, "Excel's exit")
        assert in_folder(agent, Host.WORD) == set()  # Word still runs
        word.crash()  # SIGKILL: a crash is an exit
        await until(lambda: in_folder(agent, Host.WORD) == {notes}, 10, "Word's crash")
        assert agent.installed() == {}
        word = HostApp(tmp_path / "bin", WORD)
        excel = HostApp(tmp_path / "bin", EXCEL)
        await until(
            lambda: installed(agent, Host.WORD) == {notes} == installed(agent, Host.EXCEL),
            10,
            "both launches",
        )
        assert not agent.pending
    finally:
        word.exit()
        excel.exit()


async def test_a_removal_waits_for_the_host_to_exit(
    tmp_path: Path, server: ServerProcess, agent: Agent
) -> None:
    await agent.start()
    notes = await assign_notes(server, agent)
    word = HostApp(tmp_path / "bin", WORD)
    try:
        await until(lambda: installed(agent, Host.WORD) == {notes}, 10, "Word's launch")
        await server.unassign(notes, "everyone")
        await until(lambda: (Host.WORD, notes) in agent.pending, what="the removal")
        await settled(agent, server)
        assert in_folder(agent, Host.WORD) == {notes}  # not taken away under a running Word
        assert in_folder(agent, Host.EXCEL) == set()  # Excel is not running: gone already
    finally:
        word.exit()
    await until(lambda: in_folder(agent, Host.WORD) == set(), 10, "removed at Word's exit")
    assert installed(agent, Host.WORD) == {notes}  # until Word starts without it
    word = HostApp(tmp_path / "bin", WORD)
    try:
        await until(lambda: installed(agent, Host.WORD) == set(), 10, "the launch without it")
    finally:
        word.exit()


async def test_a_start_that_may_have_read_the_folder_before_the_write_does_not_count(
    server: ServerProcess, agent: Agent
) -> None:
    """The daemon's side of the rule, given the watcher's events directly: a start noticed
    with `since` before the write may have loaded the old set, so the change stays pending
    (its file is in place); the next start, after the write, counts it."""
    await agent.start()
    notes = await assign_notes(server, agent)
    assert in_folder(agent, Host.WORD) == {notes}
    written = agent._staged[Host.WORD].at[notes]
    early = HostEvent(Host.WORD, "started", 1, written + 0.5, since=written - 0.5)
    await agent._host_event(early)
    assert Host.WORD not in agent.installed() and agent.pending[(Host.WORD, notes)].ready
    later = HostEvent(Host.WORD, "started", 2, written + 2, since=written + 1)
    await agent._host_event(later)
    assert installed(agent, Host.WORD) == {notes}


# -- "Done when": the real daemon, no `launch` anywhere --------------------------------------------
def agent_cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=agent_env(),
    )


async def test_daemon_installs_at_words_launch_without_a_launch_command(
    tmp_path: Path, broker: MosquittoBroker, server: ServerProcess
) -> None:
    cfg = lab_agent_toml(
        tmp_path, broker, server, "watch_hosts = true\nhost_poll_interval = 0.2\n"
    )
    daemon = AgentProcess(cfg, tmp_path / "daemon.log")
    notes = addin_id("notes")
    target = tmp_path / "wef" / "Word" / f"{notes}.xml"
    word: HostApp | None = None
    try:
        await until(lambda: (tmp_path / "cache.sqlite").exists(), 20, "the daemon's cache")
        await server.upload(manifest("notes", hosts=("Word",)))
        await server.assign(notes, "everyone", mode="fixed")  # the admin assigns it
        await until(target.exists, 20, "the manifest written for Word's next start")
        word = HostApp(tmp_path / "bin", "WINWORD.EXE")  # the user starts Word ...

        def launched() -> bool:
            with sqlite3.connect(tmp_path / "cache.sqlite") as db:
                return bool(db.execute("SELECT 1 FROM installed WHERE host = 'Word'").fetchall())

        await until(launched, 20, "the daemon noticing Word's start")
        st = json.loads(agent_cli(cfg, "status", "--json").stdout)
        assert st["hosts_running"] == {"Word": [word.pid]}
        assert f"Apps    running: Word (pid {word.pid})" in agent_cli(cfg, "status").stdout
        word.exit()  # ... and quits it
        word = None
        assert target.read_bytes() == manifest("notes", hosts=("Word",))
        r = agent_cli(cfg, "why", "notes", "--host", "Word")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "Installed in Word: notes 1.0.0.0, installed at Word's launch at " in text, text
        rep = json.loads(agent_cli(cfg, "why", "notes", "--host", "Word", "--json").stdout)
        assert rep["cause"] == "installed"

        # What was applied reached the server in the agent's report.
        async def reported() -> bool:
            x = await server.call("GET", f"/v1/explain?user=ann&addin={notes}")
            return any(
                a == {"addin_id": notes, "version": "1.0.0.0", "host": "Word"}
                for rep in x.get("reports", [])
                for a in rep["applied"]
            )

        await until(reported, 20, "the report reaching the server")
        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            launches = [d for (d,) in db.execute("SELECT detail FROM events WHERE kind='launch'")]
        assert launches and all("(detected, pid " in d for d in launches), launches
    finally:
        if word is not None:
            word.exit()
        assert daemon.stop() == 0, daemon.log.read_text()
