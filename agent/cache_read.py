"""Opening the agent cache for reading only, and the errors that say why a cache cannot be
opened: what the read-only commands (`status`, `list`, `why`...) need of agent/cache.py,
without the daemon's writer (aiosqlite, asyncio) that a command's start would pay for.
`agent.cache` re-exports every name here."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from addin_runtime.sqlite_tx import readonly_uri
from agent.cache_rows import TABLES


class CacheError(RuntimeError):
    """The cache file cannot be opened or is not an agent cache."""


class CacheInUse(CacheError):
    """Another live process (an agent daemon) has the cache open for writing."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another addin-agent ({who}) is running on cache {path}: one agent per cache; "
            "stop it first, or give this one its own cache_path and client_id"
        )
        self.path = path
        self.pid = pid


def open_readonly(path: str | Path) -> sqlite3.Connection:
    """Open a cache for reading only (``mode=ro``): never takes a write lock, never creates
    the file, and in WAL mode never blocks or waits for the daemon."""
    p = Path(path)
    try:
        p.stat()
    except FileNotFoundError:
        raise CacheError(f"no agent cache at {p} (has the agent run on this computer?)") from None
    except OSError as e:  # another user's agent folder (0700): not ours to read
        raise CacheError(f"cache {p} cannot be read: {e.strerror or e}") from None
    conn = sqlite3.connect(readonly_uri(p), uri=True, timeout=5)
    conn.row_factory = sqlite3.Row
    try:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        conn.close()
        raise CacheError(f"{p} is not an SQLite database: {e}") from e
    missing = [t for t in TABLES if t not in names]
    if missing:
        conn.close()
        raise CacheError(f"{p} is not an agent cache (missing tables: {', '.join(missing)})")
    return conn
