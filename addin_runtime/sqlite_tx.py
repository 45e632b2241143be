"""Cancellation-safe SQLite transactions on an aiosqlite connection.

aiosqlite runs every statement on the connection's own thread. A task cancelled while it
awaits a statement stops waiting, but the statement still runs: a cancelled ``BEGIN`` still
opens a transaction, a cancelled ``COMMIT`` still commits. Code that awaits ``BEGIN`` outside
its ``try``, or whose ``ROLLBACK`` is itself cancelled, can therefore leave a connection that
several tasks share inside a transaction, and every later ``BEGIN`` on it fails with "cannot
start a transaction within a transaction". `transaction` is the one way the agent's cache
and the server's database open a transaction on such a connection. `readonly_uri` is the one
way to name a file for a read-only connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:  # `readonly_uri` users (the agent's read-only commands) need no aiosqlite
    import aiosqlite

log = logging.getLogger(__name__)


@asynccontextmanager
async def transaction(
    conn: aiosqlite.Connection, *, immediate: bool = True
) -> AsyncIterator[aiosqlite.Connection]:
    """``BEGIN [IMMEDIATE]`` ... ``COMMIT``, rolled back on any exception or cancellation.

    Callers sharing `conn` between tasks serialise with their own lock around this. When it
    exits, by any path, the connection is outside any transaction. `immediate` takes the
    write lock up front, so two writers never deadlock upgrading a read lock.
    """
    from addin_runtime.tasks import to_completion  # asyncio: not for `readonly_uri` users

    if conn.in_transaction:
        # Not left by this helper; some statement run outside it opened a transaction and
        # never finished it. Its work is incomplete by definition: undo it, say so.
        log.warning("rolling back a transaction left open on the connection")
        await to_completion(conn.rollback())
    try:
        # Inside the try: if this await is cancelled, BEGIN still runs on the connection's
        # thread, and the rollback below (queued after it) undoes it.
        await conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        yield conn
        await to_completion(conn.execute("COMMIT"))
    except BaseException:
        # sqlite3's rollback() is a no-op outside a transaction: right after a COMMIT that
        # went through although its caller was cancelled, and after one that failed.
        try:
            await to_completion(conn.rollback())
        except Exception:  # the error that got us here matters more (e.g. a closed connection)
            log.exception("rollback failed")
        raise


def readonly_uri(path: str | Path) -> str:
    """The ``file:`` URI that opens `path` read-only (``mode=ro``; pass ``uri=True``).

    The path is percent-encoded: SQLite reads ``?`` as the start of the query and ``#`` as a
    fragment, and decodes ``%XX``, so a cache named ``x?mode=rwc`` would otherwise open (and
    create) the file ``x`` read-write."""
    return f"file:{quote(str(Path(path).resolve()))}?mode=ro"
