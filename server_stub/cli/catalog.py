"""`addin-server addin` and `store`: the catalog and assignments from the command line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from server_stub.cli.runner import common, db_option, read_manifest_file, run, show_json


@click.group()
@db_option
def addin() -> None:
    """Add-ins: add (LOB or Store), list, show, consent, enable, disable, remove, assign."""


@addin.command("add")
@click.argument("manifest_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--staged",
    is_flag=True,
    help="Store this newer version without deploying it, for `rollout start`.",
)
@common
def addin_add(manifest_file: Path, staged: bool, **kw: Any) -> None:
    """Add a LOB add-in from MANIFEST_FILE, or update it if its Id is already there."""
    try:
        content = read_manifest_file(manifest_file)
    except OSError as e:
        raise click.ClickException(f"cannot read {manifest_file}: {e.strerror or e}") from None
    run(kw, lambda s: s.add_lob(content, staged))


@addin.command("add-store")
@click.argument("asset_id")
@common
def addin_add_store(asset_id: str, **kw: Any) -> None:
    """Add a Store add-in by asset id (WA...)."""
    run(kw, lambda s: s.add_store(asset_id))


@addin.command("list")
@common
def addin_list(**kw: Any) -> None:
    """List the tenant's add-ins."""
    run(kw, lambda s: s.list_addins(), _addin_table, writes=False)


def _addin_table(rows: list[dict[str, Any]]) -> str:
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


@addin.command("show")
@click.argument("addin_id")
@common
def addin_show(addin_id: str, **kw: Any) -> None:
    """Show one add-in."""
    run(kw, lambda s: s.get_addin(addin_id), show_json, writes=False)


@addin.command("consent")
@click.argument("addin_id")
@common
def addin_consent(addin_id: str, **kw: Any) -> None:
    """Accept a pending version whose permissions or hosts changed."""
    run(kw, lambda s: s.consent(addin_id))


@addin.command("enable")
@click.argument("addin_id")
@common
def addin_enable(addin_id: str, **kw: Any) -> None:
    """Turn an add-in on."""
    run(kw, lambda s: s.set_enabled(addin_id, True))


@addin.command("disable")
@click.argument("addin_id")
@common
def addin_disable(addin_id: str, **kw: Any) -> None:
    """Turn an add-in off (it stays assigned)."""
    run(kw, lambda s: s.set_enabled(addin_id, False))


@addin.command("remove")
@click.argument("addin_id")
@common
def addin_remove(addin_id: str, **kw: Any) -> None:
    """Remove an add-in and all its assignments (tombstones)."""
    run(kw, lambda s: s.remove_addin(addin_id))


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
@click.option(
    "--except",
    "excepted",
    multiple=True,
    metavar="group:G|user:U",
    help="Exclude a group or user from this assignment (repeatable); an exclusion wins over "
    "every assignment of the add-in. Re-assigning replaces the exclusions.",
)
@common
def addin_assign(
    addin_id: str,
    everyone: bool,
    user_id: str | None,
    group_id: str | None,
    me: str | None,
    mode: str,
    excepted: tuple[str, ...],
    **kw: Any,
) -> None:
    """Assign an add-in to Everyone, a user, a group or yourself, with a mode."""
    target, tid = _pick_target(everyone, user_id, group_id, me)
    run(kw, lambda s: s.assign(addin_id, target, tid, mode, excepted), admin_user=me)


@addin.command("unassign")
@click.argument("addin_id")
@_target_options
@common
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
    run(kw, lambda s: s.unassign(addin_id, target, tid), admin_user=me)


@click.group()
@db_option
def store() -> None:
    """The simulated Office Store."""


@store.command("publish")
@click.argument("asset_id")
@click.option("--version", default=None, help="Version to publish (default: the newest).")
@common
def store_publish(asset_id: str, version: str | None, **kw: Any) -> None:
    """The Store releases a newer version; tenants that have the add-in get it automatically."""
    run(kw, lambda s: s.store_publish(asset_id, version))
