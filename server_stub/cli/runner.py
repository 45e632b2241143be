"""What every `addin-server` command shares: which database, the common options, and
`run`: open the database, call one service method, print its result or one ``error:`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from addin_core.display import printable
from addin_runtime.cli_support import error, shared_option, shared_value
from addin_runtime.instance_lock import held_by
from server_stub import db
from server_stub.explain import describe_backlog
from server_stub.service import DEFAULT_MAX_ADDINS, MAX_MANIFEST_BYTES, OperationError, Service
from server_stub.store import DEFAULT_CATALOG, StoreCatalog

T = TypeVar("T")

DB_ENV = "ADDIN_SERVER_DB"

db_option = shared_option(
    "--db",
    key="db",
    type=str,
    help=f"SQLite database file, or postgresql://USER@HOST:PORT/DBNAME [env {DB_ENV}]; "
    "accepted before or after the command name.",
)

DbTarget = Path | str
"""An SQLite file, or a PostgreSQL URL (a str starting with postgresql://)."""

PUBLISH_WAIT_ENV = "ADDIN_SERVER_PUBLISH_WAIT"
PUBLISH_WAIT = 3.0
"""Seconds a write command waits for a running `serve` to publish its change before it
says the change is not published yet (`ADDIN_SERVER_PUBLISH_WAIT` overrides)."""


def _publish_wait() -> float:
    try:
        return max(0.0, float(os.environ.get(PUBLISH_WAIT_ENV, PUBLISH_WAIT)))
    except ValueError:
        return PUBLISH_WAIT


def db_path(writes: bool, fallback: DbTarget | None = None) -> DbTarget:
    """The database this command works on (--db, else $ADDIN_SERVER_DB, else `fallback`:
    the configuration file's). A read never creates one, and nothing creates one in a
    folder that does not exist (a mistyped path must not leave files around). A
    ``postgresql://`` URL is taken as it is: that database must exist (the schema is made
    in it on first use)."""
    from server_stub.db_target import SCHEMES, is_url

    given = shared_value("db") or os.environ.get(DB_ENV) or fallback
    if not given:
        error(f"no database given: pass --db FILE or set {DB_ENV}", 2)
    if is_url(given):
        return str(given)
    if "://" in str(given):
        error(f"--db {given}: not a file, and not a URL starting with {' or '.join(SCHEMES)}", 2)
    path = Path(given)
    if path.is_dir():
        error(f"--db {path} is a directory; give the database file in it", 2)
    if not path.parent.is_dir():
        error(f"no folder {path.parent} for the database {path}", 2)
    if not writes and not path.exists():
        error(
            f"no database at {path} (check --db / {DB_ENV}); "
            "a write command such as `load` or `user add --tenant T` creates one",
            2,
        )
    return path


def _remove_new_database(path: Path) -> None:
    """Delete a database this command created and then failed to use."""
    for p in (path, *(Path(f"{path}{x}") for x in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


_tenant_option = click.option(
    "--tenant",
    envvar="ADDIN_SERVER_TENANT",
    default=None,
    help="Tenant id; needed only when the database is new [env ADDIN_SERVER_TENANT].",
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
store_option = click.option(
    "--store-catalog",
    envvar="ADDIN_SERVER_STORE_CATALOG",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CATALOG,
    show_default="the bundled fixture catalog",
    help="Folder of Store add-ins by asset id.",
)
max_addins_option = click.option(
    "--max-addins",
    envvar="ADDIN_SERVER_MAX_ADDINS",
    type=click.IntRange(1),
    default=DEFAULT_MAX_ADDINS,
    show_default=True,
    help="Add-ins a tenant may hold (Microsoft's limit is 200).",
)


def common(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every database command takes: --json, --max-addins, --store-catalog,
    --tenant, --db."""
    for opt in (_json_option, max_addins_option, store_option, _tenant_option, db_option):
        f = opt(f)
    return f


async def open_service(
    path: DbTarget,
    tenant: str | None,
    store_catalog: Path = DEFAULT_CATALOG,
    max_addins: int = DEFAULT_MAX_ADDINS,
    admin_user: str | None = None,
) -> Service:
    """The service on the database at `path`; a new database is bound to `tenant`."""
    database = await db.Database.open(path)
    try:
        tenant = tenant or await database.stored_tenant()
        if tenant is None:
            raise click.UsageError(f"{path} is a new database: give --tenant")
        await database.bind_tenant(tenant)
    except BaseException:
        await database.close()
        raise
    return Service(
        database,
        tenant,
        store=StoreCatalog(store_catalog),
        max_addins=max_addins,
        admin_user=admin_user,
        actor=_os_user(),
    )


def _os_user() -> str:
    """Who runs a CLI write, for the audit log: whoever can write the database file acts
    as an admin, and the log names their login."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return f"uid-{os.getuid()}" if hasattr(os, "getuid") else "cli"


def run(
    kw: dict[str, Any],
    op: Callable[[Service], Awaitable[T]],
    render: Callable[[T], str] | None = None,
    admin_user: str | None = None,
    *,
    writes: bool = True,
    escaped: bool = True,
    db_fallback: DbTarget | None = None,
    dry_run: bool = False,
) -> None:
    """Open the database, run one operation, print its result (text or --json). Without
    `escaped` the rendering is printed as it is: only for a render that escapes itself
    (`export`'s YAML, which must round-trip byte for byte).

    A database this command created is deleted again if the command fails, or in a
    `dry_run` once it is done: a failed `load`, a mistyped --db or a plan against a new
    database leaves nothing behind (an SQLite file; a PostgreSQL database is the admin's)."""
    path = db_path(writes, db_fallback)
    created = isinstance(path, Path) and not path.exists()
    done = False
    try:
        _run_on(path, kw, op, render, admin_user, writes, escaped)
        done = True
    finally:
        if created and (not done or dry_run) and isinstance(path, Path):
            _remove_new_database(path)


def _run_on(
    path: DbTarget,
    kw: dict[str, Any],
    op: Callable[[Service], Awaitable[T]],
    render: Callable[[T], str] | None,
    admin_user: str | None,
    writes: bool,
    escaped: bool = True,
) -> None:
    note: str | None = None

    async def go() -> T:
        nonlocal note
        service = await open_service(
            path, kw["tenant"], kw["store_catalog"], kw["max_addins"], admin_user
        )
        try:
            result = await op(service)
            if writes and isinstance(result, dict) and isinstance(result.get("revision"), int):
                note = await _unpublished_note(service, path, result["revision"])
                if kw["as_json"]:
                    result["published"] = note is None
            return result
        finally:
            await service.close()

    try:
        result = asyncio.run(go())
    except OperationError as e:
        error(e.message, 1 if e.status != 404 else 2)
    except db.DatabaseError as e:
        error(str(e))
    except db.TRANSIENT_ERRORS as e:
        # Locked by another writer, disk full, I/O error: the transaction was rolled back.
        error(
            f"could not write {_shown(path)} ({_first_line(e)}); nothing was changed, retry later"
        )
    if not escaped and render is not None:
        click.echo(render(result))
    else:
        _print(result, kw["as_json"], render)
    if note is not None:
        click.echo(f"warning: {note}", err=True)


def _print(result: T, as_json: bool, render: Callable[[T], str] | None) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif render is not None:
        # Names and reasons in the rendered text come from manifests: no raw control or bidi
        # characters reach the admin's terminal (JSON escapes them itself). Each value is
        # escaped before rendering too, so a newline inside a name cannot start a line that
        # reads like one of ours; the rendering's own newlines stay.
        # (JSON renderings escape every string themselves.)
        shown = result if render is show_json else _escaped(result)
        click.echo(printable(render(shown), keep_newlines=True))
    else:
        click.echo(printable(_summary(_escaped(result)), keep_newlines=True))


def _escaped(value: Any) -> Any:
    """`value` with every string in it (keys too) passed through `printable`."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(_escaped(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_escaped(v) for v in value)
    return value


def _shown(path: DbTarget) -> str:
    """The database as messages name it (a URL without its password)."""
    from server_stub.db_target import describe

    return describe(path) if isinstance(path, str) else str(path)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


async def publisher_of(service: Service, path: DbTarget) -> str | None:
    """Who publishes this database's outbox: a description of the `serve` holding the
    SQLite file's lock, "a replica" on PostgreSQL when one holds the outbox; None: nobody."""
    if isinstance(path, str):
        return "a serve replica" if await service.database.publisher_running() else None
    holder = held_by(path)
    return None if holder is None else holder.describe()


async def _unpublished_note(service: Service, path: DbTarget, revision: int) -> str | None:
    """None once `revision`'s messages are published (or it has none); otherwise what an
    admin must know: the change is committed, and why it has not reached the agents."""
    wait = _publish_wait()
    deadline = time.monotonic() + wait
    while True:
        waiting = await service.outbox_waiting(revision)
        if not waiting:
            return None
        publisher = await publisher_of(service, path)
        if publisher is None:
            backlog = await service.outbox_backlog()
            return (
                f"revision {revision} is committed but not published: no `addin-server serve` "
                f"is running on {_shown(path)}; {describe_backlog(backlog)}, published when it "
                "starts"
            )
        if time.monotonic() >= deadline:
            backlog = await service.outbox_backlog()
            return (
                f"revision {revision} is committed but not published yet: `addin-server serve` "
                f"({publisher}) has not sent it within {wait:g} s (is the "
                f"broker reachable? see its log); {describe_backlog(backlog)}"
            )
        await asyncio.sleep(0.05)


def _summary(result: Any) -> str:
    if isinstance(result, dict) and "revision" in result:
        rest = {k: v for k, v in result.items() if k != "revision" and v is not None}
        return f"revision {result['revision']}: " + ", ".join(f"{k}={v}" for k, v in rest.items())
    return json.dumps(result, indent=2, sort_keys=True)


def show_json(r: Any) -> str:
    return json.dumps(r, indent=2)


def read_manifest_file(path: Path) -> bytes:
    """A manifest file's bytes, reading no more than one byte past the manifest limit: a
    document naming /dev/zero, a FIFO or a huge file gets an error, not a CLI that reads
    until memory runs out. OSError (EFBIG) when the file is over the limit."""
    with path.open("rb") as f:
        content = f.read(MAX_MANIFEST_BYTES + 1)
    if len(content) > MAX_MANIFEST_BYTES:
        raise OSError(
            errno.EFBIG, f"larger than {MAX_MANIFEST_BYTES} bytes (512 KB), the limit of a manifest"
        )
    return content
