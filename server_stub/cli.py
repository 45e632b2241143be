"""`addin-server`: the deployment service's command line.

`serve` runs the HTTP API and the publisher. Every other subcommand works on the SQLite
file directly (``--db`` or ``ADDIN_SERVER_DB``), so it works with or without a running
server; a running server's publisher picks the change up within ~150 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from addin_runtime.cli_support import Group, error, shared_option, shared_value
from addin_runtime.instance_lock import AlreadyLocked, InstanceLock, held_by
from server_stub import db
from server_stub.broker_cli import broker
from server_stub.broker_config import write_broker_config
from server_stub.explain import describe_backlog, render_explain, render_status
from server_stub.manifest_cli import manifest
from server_stub.operations import DEFAULT_MAX_ADDINS, OperationError, Service
from server_stub.store import DEFAULT_CATALOG, StoreCatalog

T = TypeVar("T")

DB_ENV = "ADDIN_SERVER_DB"

_db_option = shared_option(
    "--db",
    key="db",
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"SQLite database file [env {DB_ENV}]; accepted before or after the command name.",
)

PUBLISH_WAIT_ENV = "ADDIN_SERVER_PUBLISH_WAIT"
PUBLISH_WAIT = 3.0
"""Seconds a write command waits for a running `serve` to publish its change before it
says the change is not published yet (`ADDIN_SERVER_PUBLISH_WAIT` overrides)."""


def _publish_wait() -> float:
    try:
        return max(0.0, float(os.environ.get(PUBLISH_WAIT_ENV, PUBLISH_WAIT)))
    except ValueError:
        return PUBLISH_WAIT


def _db_path(writes: bool) -> Path:
    """The database this command works on. A read never creates one, and nothing creates
    one in a folder that does not exist (a mistyped path must not leave files around)."""
    given = shared_value("db") or os.environ.get(DB_ENV)
    if not given:
        error(f"no database given: pass --db FILE or set {DB_ENV}", 2)
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
_store_option = click.option(
    "--store-catalog",
    envvar="ADDIN_SERVER_STORE_CATALOG",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_CATALOG,
    show_default="the bundled fixture catalog",
    help="Folder of Store add-ins by asset id.",
)
_max_addins_option = click.option(
    "--max-addins",
    envvar="ADDIN_SERVER_MAX_ADDINS",
    type=click.IntRange(1),
    default=DEFAULT_MAX_ADDINS,
    show_default=True,
    help="Add-ins a tenant may hold (Microsoft's limit is 200).",
)


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    for opt in (_json_option, _max_addins_option, _store_option, _tenant_option, _db_option):
        f = opt(f)
    return f


async def _open(
    db_path: Path,
    tenant: str | None,
    store_catalog: Path = DEFAULT_CATALOG,
    max_addins: int = DEFAULT_MAX_ADDINS,
    admin_user: str | None = None,
) -> Service:
    conn = await db.connect(db_path)
    try:
        stored = await db.stored_tenant(conn)
        tenant = tenant or stored
        if tenant is None:
            raise click.UsageError(f"{db_path} is a new database: give --tenant")
        await db.bind_tenant(conn, tenant)
    except BaseException:
        await conn.close()
        raise
    return Service(
        conn,
        tenant,
        store=StoreCatalog(store_catalog),
        max_addins=max_addins,
        admin_user=admin_user,
        actor="cli",
    )


def _run(
    kw: dict[str, Any],
    op: Callable[[Service], Awaitable[T]],
    render: Callable[[T], str] | None = None,
    admin_user: str | None = None,
    *,
    writes: bool = True,
) -> None:
    """Open the database, run one operation, print its result (text or --json).

    A database this command created is deleted again if the command fails: a failed `load`
    or a mistyped --db leaves nothing behind."""
    path = _db_path(writes)
    created = not path.exists()
    done = False
    try:
        _run_on(path, kw, op, render, admin_user, writes)
        done = True
    finally:
        if created and not done:
            _remove_new_database(path)


def _run_on(
    path: Path,
    kw: dict[str, Any],
    op: Callable[[Service], Awaitable[T]],
    render: Callable[[T], str] | None,
    admin_user: str | None,
    writes: bool,
) -> None:
    note: str | None = None

    async def go() -> T:
        nonlocal note
        service = await _open(path, kw["tenant"], kw["store_catalog"], kw["max_addins"], admin_user)
        try:
            result = await op(service)
            if writes and isinstance(result, dict) and isinstance(result.get("revision"), int):
                note = await _unpublished_note(service, path, result["revision"])
                if kw["as_json"]:
                    result["published"] = note is None
            return result
        finally:
            await service.conn.close()

    try:
        result = asyncio.run(go())
    except OperationError as e:
        error(e.message, 1 if e.status != 404 else 2)
    except db.DatabaseError as e:
        error(str(e))
    except sqlite3.OperationalError as e:
        # Locked by another writer, disk full, I/O error: the transaction was rolled back.
        error(f"could not write {path} ({e}); nothing was changed, retry later")
    if kw["as_json"]:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
    elif render is not None:
        click.echo(render(result))
    else:
        click.echo(_summary(result))
    if note is not None:
        click.echo(f"warning: {note}", err=True)


async def _unpublished_note(service: Service, path: Path, revision: int) -> str | None:
    """None once `revision`'s messages are published (or it has none); otherwise what an
    admin must know: the change is committed, and why it has not reached the agents."""
    wait = _publish_wait()
    deadline = time.monotonic() + wait
    while True:
        waiting = await service.outbox_waiting(revision)
        if not waiting:
            return None
        publisher = held_by(path)
        if publisher is None:
            backlog = await service.outbox_backlog()
            return (
                f"revision {revision} is committed but not published: no `addin-server serve` "
                f"is running on {path}; {describe_backlog(backlog)}, published when it starts"
            )
        if time.monotonic() >= deadline:
            backlog = await service.outbox_backlog()
            return (
                f"revision {revision} is committed but not published yet: `addin-server serve` "
                f"({publisher.describe()}) has not sent it within {wait:g} s (is the "
                f"broker reachable? see its log); {describe_backlog(backlog)}"
            )
        await asyncio.sleep(0.05)


def _summary(result: Any) -> str:
    if isinstance(result, dict) and "revision" in result:
        rest = {k: v for k, v in result.items() if k != "revision" and v is not None}
        return f"revision {result['revision']}: " + ", ".join(f"{k}={v}" for k, v in rest.items())
    return json.dumps(result, indent=2, sort_keys=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@_db_option
def main() -> None:
    """Deployment service stub: directory, catalog, assignments, publication."""


main.add_command(manifest)
main.add_command(broker)


# -- serve ----------------------------------------------------------------------------------


@main.command()
@_db_option
@click.option("--tenant", envvar="ADDIN_SERVER_TENANT", required=True, help="Tenant id.")
@click.option("--broker", envvar="ADDIN_SERVER_BROKER", required=True, help="mqtt://HOST:PORT")
@click.option("--broker-username", envvar="ADDIN_SERVER_BROKER_USERNAME", default=None)
@click.option("--broker-password", envvar="ADDIN_SERVER_BROKER_PASSWORD", default=None)
@click.option("--listen", envvar="ADDIN_SERVER_LISTEN", default="127.0.0.1:8080", show_default=True)
@click.option("--admin-token", envvar="ADDIN_SERVER_ADMIN_TOKEN", required=True)
@click.option("--agent-token", envvar="ADDIN_SERVER_AGENT_TOKEN", required=True)
@click.option(
    "--admin-user",
    envvar="ADDIN_SERVER_ADMIN_USER",
    default=None,
    help="The admin's own user id, for assignments to 'me'.",
)
@_store_option
@_max_addins_option
def serve(
    tenant: str,
    broker: str,
    broker_username: str | None,
    broker_password: str | None,
    listen: str,
    admin_token: str,
    agent_token: str,
    admin_user: str | None,
    store_catalog: Path,
    max_addins: int,
) -> None:
    """Run the HTTP API and the publisher (outbox -> MQTT, reports <- MQTT)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="--listen")
    from server_stub.publisher import parse_broker_url

    try:
        parse_broker_url(broker)
    except ValueError as e:
        # Refused here, before any database is made, not retried for ever by the publisher.
        error(f"--broker {e}", 2)
    db_path = _db_path(writes=True)
    # One publisher per database: a second one would publish under the same MQTT client id
    # and the two would knock each other off the broker for as long as both run.
    lock = InstanceLock(db_path)
    try:
        lock.acquire()
    except AlreadyLocked as e:
        error(
            f"another addin-server serve ({e.holder.describe()}) is running on {db_path}: "
            "one server per database; stop it first"
        )
    except OSError as e:
        error(f"cannot lock {lock.path}: {e.strerror or e}")
    try:
        _serve(db_path, tenant, broker, broker_username, broker_password, host, int(port),
               admin_token, agent_token, admin_user, store_catalog, max_addins)  # fmt: skip
    except db.DatabaseError as e:
        error(str(e))
    finally:
        lock.release()


def _serve(
    db_path: Path,
    tenant: str,
    broker: str,
    broker_username: str | None,
    broker_password: str | None,
    host: str,
    port: int,
    admin_token: str,
    agent_token: str,
    admin_user: str | None,
    store_catalog: Path,
    max_addins: int,
) -> None:
    import uvicorn

    from addin_runtime.tasks import cancel_and_wait
    from server_stub.api import create_app
    from server_stub.publisher import Publisher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def go() -> None:
        service = await _open(db_path, tenant, store_catalog, max_addins, admin_user)
        service.actor = "api"
        publisher = Publisher(
            db_path,
            tenant,
            broker,
            username=broker_username,
            password=broker_password,
            report_sink=service.record_reports,
        )
        service.on_commit = publisher.wake
        app = create_app(service, admin_token=admin_token, agent_token=agent_token)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        )
        pub = asyncio.create_task(publisher.run())
        click.echo(
            f"addin-server: tenant {tenant}, http://{host}:{port}, broker {broker}", err=True
        )
        try:
            await server.serve()
        finally:
            await cancel_and_wait(pub, 10, "the publisher")
            await service.conn.close()

    # uvloop when installed (the `fast` extra): the manifest endpoint serves a whole fleet.
    try:
        import uvloop
    except ImportError:
        asyncio.run(go())
    else:
        uvloop.run(go())


# -- load -----------------------------------------------------------------------------------


@main.command()
@click.argument("org_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def load(org_file: Path, **kw: Any) -> None:
    """Load users, groups, nesting, add-ins and assignments from ORG.yaml in one transaction."""
    try:
        # The C loader when PyYAML has it: a 10,000-user document parses ~10x faster.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(org_file.read_text(), Loader=loader)
    except yaml.YAMLError as e:
        raise click.ClickException(f"{org_file} is not valid YAML: {e}") from None
    base = org_file.parent
    if isinstance(doc, dict) and kw["tenant"] is None and isinstance(doc.get("tenant"), str):
        kw["tenant"] = doc["tenant"]

    def render(r: dict[str, Any]) -> str:
        return (
            f"revision {r['revision']}: loaded {r['users']} users, {r['groups']} groups, "
            f"{r['memberships']} memberships, {r['nestings']} nestings, "
            f"{len(r['addins_added_or_updated'])} add-ins added or updated, "
            f"{r['assignments']} assignments; {r['messages']} messages queued"
        )

    _run(kw, lambda s: s.load_org(doc, lambda p: (base / p).read_bytes()), render)


# -- users and groups -----------------------------------------------------------------------


@main.group()
@_db_option
def user() -> None:
    """Users: add, remove, show."""


@user.command("add")
@click.argument("user_id")
@click.option("--name", default=None)
@_common
def user_add(user_id: str, name: str | None, **kw: Any) -> None:
    """Create a user."""
    _run(kw, lambda s: s.create_user(user_id, name))


@user.command("remove")
@click.argument("user_id")
@_common
def user_remove(user_id: str, **kw: Any) -> None:
    """Delete a user (its direct assignments and memberships go too)."""
    _run(kw, lambda s: s.delete_user(user_id))


@user.command("show")
@click.argument("user_id")
@_common
def user_show(user_id: str, **kw: Any) -> None:
    """Show a user's groups and direct assignments."""
    _run(kw, lambda s: s.get_user(user_id), lambda r: json.dumps(r, indent=2), writes=False)


@main.group()
@_db_option
def group() -> None:
    """Groups: add, remove, show, members, nesting."""


@group.command("add")
@click.argument("group_id")
@click.option("--name", default=None)
@_common
def group_add(group_id: str, name: str | None, **kw: Any) -> None:
    """Create a group."""
    _run(kw, lambda s: s.create_group(group_id, name))


@group.command("remove")
@click.argument("group_id")
@_common
def group_remove(group_id: str, **kw: Any) -> None:
    """Delete a group (its assignments, memberships and nestings go too)."""
    _run(kw, lambda s: s.delete_group(group_id))


@group.command("show")
@click.argument("group_id")
@_common
def group_show(group_id: str, **kw: Any) -> None:
    """Show a group's members, parents, children and assignments."""
    _run(kw, lambda s: s.get_group(group_id), lambda r: json.dumps(r, indent=2), writes=False)


@group.command("add-member")
@click.argument("group_id")
@click.argument("user_id")
@_common
def group_add_member(group_id: str, user_id: str, **kw: Any) -> None:
    """Make USER_ID a direct member of GROUP_ID."""
    _run(kw, lambda s: s.add_member(group_id, user_id))


@group.command("remove-member")
@click.argument("group_id")
@click.argument("user_id")
@_common
def group_remove_member(group_id: str, user_id: str, **kw: Any) -> None:
    """Remove USER_ID from GROUP_ID."""
    _run(kw, lambda s: s.remove_member(group_id, user_id))


@group.command("nest")
@click.argument("child")
@click.argument("parent")
@_common
def group_nest(child: str, parent: str, **kw: Any) -> None:
    """Nest group CHILD inside group PARENT (refused if it makes a cycle)."""
    _run(kw, lambda s: s.nest(child, parent))


@group.command("unnest")
@click.argument("child")
@click.argument("parent")
@_common
def group_unnest(child: str, parent: str, **kw: Any) -> None:
    """Take group CHILD out of group PARENT."""
    _run(kw, lambda s: s.unnest(child, parent))


@main.group()
@_db_option
def policy() -> None:
    """Tenant policy."""


@policy.command("set")
@click.option("--nested-groups/--no-nested-groups", required=True)
@_common
def policy_set(nested_groups: bool, **kw: Any) -> None:
    """Honour nested groups or not (Microsoft does not)."""
    _run(kw, lambda s: s.set_policy(nested_groups))


# -- add-ins --------------------------------------------------------------------------------


@main.group()
@_db_option
def addin() -> None:
    """Add-ins: add (LOB or Store), list, show, consent, enable, disable, remove, assign."""


@addin.command("add")
@click.argument("manifest_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_common
def addin_add(manifest_file: Path, **kw: Any) -> None:
    """Add a LOB add-in from MANIFEST_FILE, or update it if its Id is already there."""
    content = manifest_file.read_bytes()
    _run(kw, lambda s: s.add_lob(content))


@addin.command("add-store")
@click.argument("asset_id")
@_common
def addin_add_store(asset_id: str, **kw: Any) -> None:
    """Add a Store add-in by asset id (WA...)."""
    _run(kw, lambda s: s.add_store(asset_id))


@addin.command("list")
@_common
def addin_list(**kw: Any) -> None:
    """List the tenant's add-ins."""

    def render(rows: list[dict[str, Any]]) -> str:
        out = [f"{'ADD-IN':<38} {'NAME':<28} {'SOURCE':<6} {'VERSION':<11} {'STATE':<14} ASSIGNED"]
        for a in rows:
            state = "off" if not a["enabled"] else a["state"]
            targets = ", ".join(
                (x["target"] if x["target"] == "everyone" else f"{x['target']}:{x['target_id']}")
                + f"={x['mode']}"
                for x in a["assignments"]
            )
            out.append(
                f"{a['addin_id']:<38} {a['name'][:28]:<28} {a['source']:<6} "
                f"{a['version']:<11} {state:<14} {targets or '-'}"
            )
        return "\n".join(out)

    _run(kw, lambda s: s.list_addins(), render, writes=False)


@addin.command("show")
@click.argument("addin_id")
@_common
def addin_show(addin_id: str, **kw: Any) -> None:
    """Show one add-in."""
    _run(kw, lambda s: s.get_addin(addin_id), lambda r: json.dumps(r, indent=2), writes=False)


@addin.command("consent")
@click.argument("addin_id")
@_common
def addin_consent(addin_id: str, **kw: Any) -> None:
    """Accept a pending version whose permissions or hosts changed."""
    _run(kw, lambda s: s.consent(addin_id))


@addin.command("enable")
@click.argument("addin_id")
@_common
def addin_enable(addin_id: str, **kw: Any) -> None:
    """Turn an add-in on."""
    _run(kw, lambda s: s.set_enabled(addin_id, True))


@addin.command("disable")
@click.argument("addin_id")
@_common
def addin_disable(addin_id: str, **kw: Any) -> None:
    """Turn an add-in off (it stays assigned)."""
    _run(kw, lambda s: s.set_enabled(addin_id, False))


@addin.command("remove")
@click.argument("addin_id")
@_common
def addin_remove(addin_id: str, **kw: Any) -> None:
    """Remove an add-in and all its assignments (tombstones)."""
    _run(kw, lambda s: s.remove_addin(addin_id))


def _target_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--me",
        "me",
        default=None,
        envvar="ADDIN_SERVER_ADMIN_USER",
        help="'Just me': the admin's own user id [env ADDIN_SERVER_ADMIN_USER].",
    )(f)
    f = click.option("--group", "group_id", default=None, help="Assign to this group.")(f)
    f = click.option("--user", "user_id", default=None, help="Assign to this user.")(f)
    f = click.option("--everyone", is_flag=True, help="Assign to Everyone.")(f)
    return f


def _pick_target(
    everyone: bool, user_id: str | None, group_id: str | None, me: str | None
) -> tuple[str, str | None]:
    chosen = [
        t
        for t in (
            ("everyone", None) if everyone else None,
            ("user", user_id) if user_id else None,
            ("group", group_id) if group_id else None,
        )
        if t
    ]
    if not chosen and me:
        return "me", None
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --everyone, --user U, --group G, --me U")
    return chosen[0]


@addin.command("assign")
@click.argument("addin_id")
@_target_options
@click.option(
    "--mode",
    type=click.Choice(["fixed", "optional", "available"]),
    default="fixed",
    show_default=True,
)
@_common
def addin_assign(
    addin_id: str,
    everyone: bool,
    user_id: str | None,
    group_id: str | None,
    me: str | None,
    mode: str,
    **kw: Any,
) -> None:
    """Assign an add-in to Everyone, a user, a group or yourself, with a mode."""
    target, tid = _pick_target(everyone, user_id, group_id, me)
    _run(kw, lambda s: s.assign(addin_id, target, tid, mode), admin_user=me)


@addin.command("unassign")
@click.argument("addin_id")
@_target_options
@_common
def addin_unassign(
    addin_id: str,
    everyone: bool,
    user_id: str | None,
    group_id: str | None,
    me: str | None,
    **kw: Any,
) -> None:
    """Remove one assignment of an add-in."""
    target, tid = _pick_target(everyone, user_id, group_id, me)
    _run(kw, lambda s: s.unassign(addin_id, target, tid), admin_user=me)


@main.group()
@_db_option
def store() -> None:
    """The simulated Office Store."""


@store.command("publish")
@click.argument("asset_id")
@click.option("--version", default=None, help="Version to publish (default: the newest).")
@_common
def store_publish(asset_id: str, version: str | None, **kw: Any) -> None:
    """The Store releases a newer version; tenants that have the add-in get it automatically."""
    _run(kw, lambda s: s.store_publish(asset_id, version))


# -- troubleshooting ------------------------------------------------------------------------


@main.command()
@click.option("--user", "user_id", required=True)
@click.option("--addin", "addin_id", required=True, help="Add-in id or display name.")
@_common
def explain(user_id: str, addin_id: str, **kw: Any) -> None:
    """Is USER entitled to ADDIN, through which assignment and group path, and what did
    the user's agents report?"""
    _run(kw, lambda s: s.explain(user_id, addin_id), render_explain, writes=False)


@main.command()
@click.argument("addin", required=False)
@_common
def status(addin: str | None, **kw: Any) -> None:
    """Per add-in (ADDIN: id or name): entitled users and how many agents reported the
    current version applied; whether a publisher runs, and the outbox backlog."""

    path = _db_path(writes=False)

    async def op(s: Service) -> dict[str, Any]:
        result = await s.status(addin)
        holder = held_by(path)
        result["publisher"] = {"running": holder is not None, "pid": holder and holder.pid}
        return result

    _run(kw, op, render_status, writes=False)


@main.command("broker-config")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@_common
def broker_config(directory: Path, **kw: Any) -> None:
    """Write Mosquitto `passwd` and `acl` files and `credentials.json` (0600) into DIRECTORY."""

    async def op(s: Service) -> dict[str, Any]:
        users = [r[0] for r in await s._rows("SELECT id FROM users ORDER BY id")]
        creds = write_broker_config(directory, s.tenant, users)
        return {
            "directory": str(directory),
            "server_username": creds["server"]["username"],  # type: ignore[index]
            "agents": len(users),
            "files": ["passwd", "acl", "credentials.json"],
        }

    def render(r: dict[str, Any]) -> str:
        return (
            f"wrote {r['directory']}/passwd ({r['agents']} agent accounts + server account "
            f"{r['server_username']}), {r['directory']}/acl, "
            f"{r['directory']}/credentials.json (mode 0600)"
        )

    _run(kw, op, render, writes=False)
