"""Finding a user, group or add-in by what an admin typed, and saying so when it is unknown:
``unknown user 'an'; did you mean 'ann'?``."""

from __future__ import annotations

from addin_runtime.cli_support import did_you_mean
from server_stub.db import Database, Row
from server_stub.service.errors import BadRequest, NotFound
from server_stub.service.unit_of_work import Tx

_TABLES = {"users", "groups", "addins"}


async def need(database: Database, tx: Tx, table: str, key: str, what: str) -> Row:
    """The row of `key` in `table`, or NotFound naming close matches."""
    assert table in _TABLES
    r = await tx.row(f"SELECT * FROM {table} WHERE id=?", (key,))
    if r is None:
        raise await unknown(database, table, key, what)
    return r


async def unknown(database: Database, table: str, key: str, what: str) -> NotFound:
    """NotFound for `key`, with the ids (and add-in names) close to it."""
    assert table in _TABLES
    names = [str(r[0]) for r in await database.rows(f"SELECT id FROM {table}")]
    if table == "addins":
        names += list((await addin_names(database)).values())
    return NotFound(f"unknown {what} {key!r}" + did_you_mean(key, names))


async def addin_names(database: Database) -> dict[str, str]:
    """Display name of each add-in's current version, by id."""
    return {
        str(r[0]): str(r[1])
        for r in await database.rows(
            "SELECT a.id, v.display_name FROM addins a JOIN addin_versions v "
            "ON v.addin_id = a.id AND v.version = a.current_version"
        )
    }


async def find_addin(database: Database, name_or_id: str) -> str:
    """An add-in id from what an admin typed: its id, or its display name (any case)."""
    if await database.rows("SELECT 1 FROM addins WHERE id=?", (name_or_id,)):
        return name_or_id
    low = name_or_id.lower()
    names = await addin_names(database)
    found = sorted(a for a, n in names.items() if low in (a.lower(), n.lower()))
    if len(found) > 1:
        raise BadRequest(
            f"{len(found)} add-ins are called {name_or_id!r}: give the id ({', '.join(found)})"
        )
    if not found:
        raise await unknown(database, "addins", name_or_id, "add-in")
    return found[0]
