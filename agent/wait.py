"""`addin-agent wait`: block until this computer holds what the server says it should.

For provisioning scripts, image builds and walk-throughs: "the agent is up to date" means
the daemon runs and is connected to the broker, the entitlements resolved from its cache
equal the server's for this user (the anti-entropy digest, so changes that do not concern
this user do not count), and no entitled manifest is still to be downloaded. Read-only, like
every troubleshooting command: it never disturbs the daemon.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass

from agent.antientropy import compare_now
from agent.cache import CacheError, open_readonly
from agent.config import AgentConfig
from agent.readmodel import ReadModel

POLL = 0.2
"""Seconds between two looks at the cache and the server."""


@dataclass(frozen=True, slots=True)
class SyncState:
    done: bool
    detail: str
    revision: int = 0


def _pid_alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid or ""), 0)
    except (OSError, ValueError):
        return False
    return True


def look(cfg: AgentConfig, rm: ReadModel) -> SyncState:
    """One look: done, or the first thing still missing."""
    sync = rm.sync_text()
    if not _pid_alive(sync.get("pid")):
        return SyncState(False, "the daemon is not running (start `addin-agent run`)")
    if sync.get("connected") != "1":
        last = sync.get("last_error")
        return SyncState(
            False, "the daemon is not connected to the broker" + (f" ({last})" if last else "")
        )
    status, detail = compare_now(cfg, rm.received_state(cfg.tenant))
    if status != "ok":
        return SyncState(False, detail)
    missing, reason = rm.downloads_waited_for()
    if missing:
        return SyncState(False, f"{missing} manifest(s) to download: {reason}")
    return SyncState(True, detail, rm.highest_revision())


def wait_in_sync(cfg: AgentConfig, timeout: float) -> SyncState:
    """Look every POLL seconds until done or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = open_readonly(cfg.cache_path)
        except CacheError as e:
            state = SyncState(False, str(e))
        else:
            try:
                state = look(cfg, ReadModel(conn))
            except sqlite3.Error as e:  # the daemon is creating its tables right now
                state = SyncState(False, f"cache not readable yet: {e}")
            finally:
                conn.close()
        if state.done or time.monotonic() >= deadline:
            return state
        time.sleep(POLL)
