"""The agents' reports summed up for `status`: per (add-in, version), the users with a device
reporting it applied; the users with a device reporting at all.

Kept up to date as reports are stored, not recomputed: every stored report carries the
reports generation of the write that stored it (`Database.record_reports`), so the summary
catches up by reading only the reports of a later generation than the one it reflects,
whoever wrote them (this process's report intake, another replica's, a CLI). Recomputing
meant reading and parsing every report's JSON (10,000 devices: ~200 ms) on the first
`status` after any report arrived, which on a fleet that keeps reporting is most of them.

A device's latest report replaces its previous one, so the summary keeps each device's
last applied set and counts devices per user: a user with two devices stays "applied" for an
add-in while either of them reports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import KeysView

from server_stub.db import Database

log = logging.getLogger("addin_server.status")

Key = tuple[str, str]
"""(add-in id, version)."""

_NONE: dict[str, int] = {}


class ReportSummary:
    """Users per (add-in, version) applied and users reporting, from the devices' reports."""

    def __init__(self) -> None:
        self.generation = -1
        """The reports generation this summary reflects (-1: none, not even the empty one)."""
        # Tuples of str only, not frozensets: the garbage collector stops tracking them, so a
        # full collection does not walk 10,000 devices' entries (it cost ~100 ms at times).
        self._devices: dict[str, tuple[str, tuple[Key, ...]]] = {}
        self._reporting: dict[str, int] = {}  # user -> devices reporting
        self._applied: dict[Key, dict[str, int]] = {}  # key -> user -> devices with it applied

    def store(self, client_id: str, user_id: str, applied: tuple[Key, ...]) -> None:
        """The device's latest report (replacing any before it). Idempotent."""
        old = self._devices.get(client_id)
        if old is not None:
            _down(self._reporting, old[0])
            for key in old[1]:
                users = self._applied[key]
                _down(users, old[0])
                if not users:
                    del self._applied[key]
        self._devices[client_id] = (user_id, applied)
        self._reporting[user_id] = self._reporting.get(user_id, 0) + 1
        for key in applied:
            users = self._applied.setdefault(key, {})
            users[user_id] = users.get(user_id, 0) + 1

    def applied_users(self, addin_id: str, version: str) -> KeysView[str]:
        """Users with a device reporting that version of the add-in applied."""
        return self._applied.get((addin_id, version), _NONE).keys()

    def reporting_users(self) -> KeysView[str]:
        return self._reporting.keys()


def _down(counts: dict[str, int], user_id: str) -> None:
    n = counts[user_id] - 1
    if n:
        counts[user_id] = n
    else:
        del counts[user_id]


def applied_keys(client_id: str, applied_json: str) -> tuple[Key, ...]:
    """The (add-in, version) pairs of a report's applied list, each once (whatever the hosts
    it was applied to); none, logged, for a row that is not such a list (the server writes
    them from validated reports, so only a hand-edited database has one)."""
    try:
        return tuple(
            dict.fromkeys((str(a["addin_id"]), str(a["version"])) for a in json.loads(applied_json))
        )
    except (ValueError, TypeError, KeyError) as e:
        log.warning("the stored report of %r has an unreadable applied list (%s): "
                    "counted as applying nothing", client_id, e)  # fmt: skip
        return ()


class ReportSummaries:
    """One process's summary and how it catches up with the database."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._summary: ReportSummary | None = None
        # One catch-up at a time: two reading different generations could otherwise apply
        # the older rows last.
        self._lock = asyncio.Lock()

    async def current(self) -> ReportSummary:
        """The summary as of the latest committed reports (built on first use)."""
        async with self._lock:
            summary = self._summary or ReportSummary()
            generation, rows = await self.database.reports_since(summary.generation)
            # Parsed before anything changes: an error reading leaves the summary as it was.
            parsed = [(c, u, applied_keys(c, a)) for c, u, a in rows]
            for client_id, user_id, keys in parsed:
                summary.store(client_id, user_id, keys)
            summary.generation = generation
            self._summary = summary
            return summary

    async def catch_up(self) -> None:
        """After this process stored reports: fold them in now, while they are few, so the
        next `status` finds the summary current. Nothing to do before any `status` asked."""
        if self._summary is not None:
            await self.current()
