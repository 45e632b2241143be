"""Host lifecycle watcher: notices when each host app (Word, Excel, ...) starts and exits.

It knows nothing of add-ins: it polls the process table and reports
``HostEvent(host, "started" | "exited", pid, at, since)`` to a callback (the daemon).

Cost. A poll lists the process ids (one directory read on Linux) and looks at the name of a
process only the first time its pid is seen; a name that matches a host app is then checked
for its owner (only the agent's own user's Office counts on a shared machine). Known host
pids are re-checked each poll (exited, zombie, or the pid reused by another process). Every
`rescan` seconds all names are read again, so a pid reused by a host app within one poll
interval is still noticed, late. The idle daemon stays near 0 % CPU (docs/benchmarks.md).

A host is running while at least one of its processes runs: "started" is reported when the
first one appears, "exited" when the last one is gone — a crash is just an exit. The first
poll (`start`) is a baseline: hosts already running are running, without a "started" event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import psutil

from addin_core.protocol import Host

log = logging.getLogger("addin_agent")

HostEventKind = Literal["started", "exited"]

_WINDOWS = {
    Host.WORD: ("WINWORD.EXE",),
    Host.EXCEL: ("EXCEL.EXE",),
    Host.POWERPOINT: ("POWERPNT.EXE",),
    Host.OUTLOOK: ("OUTLOOK.EXE",),
}
_MACOS = {
    Host.WORD: ("Microsoft Word",),
    Host.EXCEL: ("Microsoft Excel",),
    Host.POWERPOINT: ("Microsoft PowerPoint",),
    Host.OUTLOOK: ("Microsoft Outlook",),
}


def default_processes(platform: str = sys.platform) -> dict[Host, tuple[str, ...]]:
    """The process names of each host app on `platform`. Office does not run on Linux; there
    the Windows names are used, so that tests (and Wine) can run processes named like them."""
    return dict(_MACOS if platform == "darwin" else _WINDOWS)


@dataclass(frozen=True, slots=True)
class HostEvent:
    host: Host
    kind: HostEventKind
    pid: int
    at: float
    """When the poll noticed it."""
    since: float
    """The previous poll, which did not see it yet: the change happened after this moment."""


def _own_user() -> tuple[int | None, str | None]:
    if hasattr(os, "getuid"):
        return os.getuid(), None
    # Windows has no uids: compare the owner's account name (read only for matching names).
    try:
        return None, psutil.Process().username()
    except psutil.Error:
        return None, None


class HostWatcher:
    """Polls the process table every `interval` seconds; `on_event` is awaited for each
    start and exit, in the order they were noticed."""

    def __init__(
        self,
        processes: Mapping[Host, Sequence[str]],
        interval: float,
        on_event: Callable[[HostEvent], Awaitable[None]],
        rescan: float = 60.0,
    ) -> None:
        # Names compare case-insensitively: Windows does not care about WINWORD.EXE's case.
        self._names = {n.casefold(): host for host, names in processes.items() for n in names}
        self.interval = interval
        self.rescan = rescan
        self._on_event = on_event
        self._uid, self._username = _own_user()
        self._seen: dict[int, Host | None] = {}
        """Every pid seen at the last poll: the host it belongs to, or None."""
        self._running: set[Host] = set()
        """The hosts of `_seen`."""
        self._procs: dict[int, psutil.Process] = {}
        """The host processes being followed (they also detect a reused pid)."""
        self._last = 0.0
        self._last_full = 0.0
        self._task: asyncio.Task[None] | None = None
        self._queue: list[HostEvent] = []
        """Noticed, not yet delivered (a poll made outside the loop, see `poll`)."""

    # -- queries ---------------------------------------------------------------------------
    def running(self, host: Host) -> bool:
        # A set kept by each poll: the daemon asks for every host after every transition
        # (a launch included), and `_seen` holds every pid of the machine.
        return host in self._running

    def pids(self, host: Host) -> list[int]:
        return sorted(p for p, h in self._seen.items() if h == host)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Take the baseline (hosts running now are running, no event) and start polling."""
        self.poll()
        self._queue.clear()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="host-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:  # a psutil surprise must not end the watching
                log.exception("host watcher poll failed")
            events, self._queue = self._queue, []
            for e in events:
                try:
                    await self._on_event(e)
                except Exception:
                    log.exception("handling %s %s failed", e.host, e.kind)

    # -- one poll --------------------------------------------------------------------------
    def poll(self) -> list[HostEvent]:
        """Look once; return what started and exited since the last look (nothing on the
        first look). The events are also delivered to `on_event` by the polling loop, so a
        caller may look between two polls (the daemon does right after writing a host's
        add-ins: a start noticed later then happened after the write)."""
        events = self._poll()
        self._queue.extend(events)
        return events

    def _poll(self) -> list[HostEvent]:
        now = time.time()
        first = self._last == 0.0
        since = self._last or now
        full = now - self._last_full >= self.rescan
        before: dict[Host, int] = {}
        for pid, h in self._seen.items():
            if h is not None:
                before[h] = min(pid, before.get(h, pid))
        current: dict[int, Host | None] = {}
        for pid in psutil.pids():
            known = pid in self._seen
            if known and self._seen[pid] is not None:
                if self._still_host(pid):
                    current[pid] = self._seen[pid]
                    continue
                known = False  # gone (zombie) or the pid was reused: look at it afresh
            if known and not full:
                current[pid] = None
                continue
            current[pid] = self._classify(pid)
        for pid in self._procs.keys() - {p for p, h in current.items() if h is not None}:
            del self._procs[pid]
        self._seen = current
        self._running = {h for h in current.values() if h is not None}
        self._last = now
        if full:
            self._last_full = now
        if first:
            return []
        after = {h for h in current.values() if h is not None}
        events = [
            HostEvent(h, "started", min(self.pids(h)), now, since)
            for h in sorted(after - before.keys())
        ]
        events += [
            HostEvent(h, "exited", before[h], now, since) for h in sorted(before.keys() - after)
        ]
        return events

    def _still_host(self, pid: int) -> bool:
        proc = self._procs.get(pid)
        if proc is None:
            return False
        try:
            # is_running() compares the start time: False when the pid now names another
            # process. A zombie (killed, not yet reaped by its parent) has exited.
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _classify(self, pid: int) -> Host | None:
        """The host app `pid` is, if it is one and belongs to this user."""
        try:
            proc = psutil.Process(pid)
            host = self._names.get(proc.name().casefold())
            if host is None or not self._ours(proc):
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:  # gone meanwhile, or not ours to look at
            return None
        self._procs[pid] = proc
        return host

    def _ours(self, proc: psutil.Process) -> bool:
        if self._uid is not None:
            return bool(proc.uids().real == self._uid)
        return self._username is not None and proc.username() == self._username


__all__ = ["HostEvent", "HostWatcher", "default_processes"]
