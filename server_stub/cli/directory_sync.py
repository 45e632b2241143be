"""`addin-server directory sync`: users, groups, memberships and nesting from LDAP or Active
Directory (`server_stub/ldap_directory.py`), applied as one revision (`Service.sync_directory`).
Settings come from flags, else the [directory] section of --config FILE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from addin_runtime.cli_support import error
from server_stub import config as server_config
from server_stub.cli.declarative import echo_plan
from server_stub.cli.runner import common, run
from server_stub.ldap_directory import (
    DEFAULT_GROUP_FILTER,
    DEFAULT_USER_FILTER,
    DirectoryData,
    LdapError,
    LdapSettings,
    read_directory,
    read_password,
)
from server_stub.service import Service


@click.group("directory")
def directory_group() -> None:
    """The directory from LDAP / Active Directory."""


@directory_group.command("sync")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="server.toml: its [directory] section gives what flags do not.",
)
@click.option("--ldap", "url", default=None, help="ldap://HOST[:PORT] or ldaps://HOST[:PORT].")
@click.option("--bind-dn", default=None, help="The account the sync reads as (none: anonymous).")
@click.option(
    "--bind-password-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A file holding its password (kept off the command line).",
)
@click.option("--base", default=None, help="The subtree to read, e.g. dc=contoso,dc=com.")
@click.option("--user-filter", default=None, help=f"[default: {DEFAULT_USER_FILTER}]")
@click.option("--group-filter", default=None, help=f"[default: {DEFAULT_GROUP_FILTER}]")
@click.option(
    "--user-id-attribute",
    default=None,
    help="The attribute that is the user id [default: uid, else sAMAccountName].",
)
@click.option(
    "--max-removal-share",
    type=click.FloatRange(0, 1),
    default=None,
    help="Stop when the sync would remove more than this share of users "
    "[default: 0.1, or [directory] max_removal_share].",
)
@click.option(
    "--ldap-ca",
    "ca_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The CA of the ldaps:// server's certificate [default: the system's CAs]; the "
    "certificate is always verified.",
)
@click.option(
    "--starttls",
    "start_tls",
    is_flag=True,
    default=None,
    help="On ldap://: StartTLS before the bind, the certificate verified as for ldaps:// "
    "[or [directory] start_tls].",
)
@click.option("--force", is_flag=True, help="Apply even past --max-removal-share.")
@click.option("--dry-run", is_flag=True, help="Print the differences and change nothing.")
@common
def sync(config_file: Path | None, dry_run: bool, force: bool, **kw: Any) -> None:
    """Make the server's users, groups, memberships and nesting equal to the directory's,
    in one revision (a user who left a group loses what it carried)."""
    d = server_config.DirectorySection()
    if config_file is not None:
        try:
            cfg = server_config.load(config_file)
        except server_config.ConfigError as e:
            error(str(e), 2)
        d = cfg.directory
        if kw["tenant"] is None:
            kw["tenant"] = cfg.server.tenant
        if cfg.server.database is not None and not _db_given(kw):
            kw["db_fallback"] = cfg.server.database
    url = kw.pop("url") or d.ldap_url
    base = kw.pop("base") or d.base
    missing = [n for n, v in (("--ldap", url), ("--base", base)) if v is None]
    if missing:
        error(f"directory sync needs {' and '.join(missing)} (or [directory] in --config)", 2)
    assert url is not None and base is not None
    password_file = kw.pop("bind_password_file") or d.bind_password_file
    share = kw.pop("max_removal_share")
    try:
        password = read_password(password_file) if password_file is not None else None
    except LdapError as e:
        error(str(e), 2)
    settings = LdapSettings(
        url=url,
        base=base,
        bind_dn=kw.pop("bind_dn") or d.bind_dn,
        password=password,
        user_filter=kw.pop("user_filter") or d.user_filter or DEFAULT_USER_FILTER,
        group_filter=kw.pop("group_filter") or d.group_filter or DEFAULT_GROUP_FILTER,
        user_id_attribute=kw.pop("user_id_attribute") or d.user_id_attribute,
        ca_file=kw.pop("ca_file") or d.ca_file,
        start_tls=bool(kw.pop("start_tls") or d.start_tls),
    )
    try:
        data = read_directory(settings)
    except LdapError as e:
        error(str(e))
    for line in data.skipped:
        click.echo(f"warning: skipped {line}", err=True)
    run_sync(kw, data, share if share is not None else d.max_removal_share, force, dry_run)


def _db_given(kw: dict[str, Any]) -> bool:
    import os

    from addin_runtime.cli_support import shared_value
    from server_stub.cli.runner import DB_ENV

    return bool(shared_value("db") or os.environ.get(DB_ENV))


def run_sync(
    kw: dict[str, Any], data: DirectoryData, share: float, force: bool, dry_run: bool
) -> None:
    summary = (
        f"LDAP: {len(data.users)} users, {len(data.groups)} groups, "
        f"{len(data.members)} memberships, {len(data.nesting)} nestings"
    )

    async def op(s: Service) -> dict[str, Any]:
        plan = await s.plan_directory(data)
        if not kw["as_json"]:
            click.echo(summary)
            echo_plan(plan)
        if dry_run or not plan.effective:
            return {**plan.as_json(), "dry_run": dry_run, "revision": None}
        result = await s.sync_directory(data, max_removal_share=share, force=force)
        return {**result, "dry_run": False}

    fallback = kw.pop("db_fallback", None)
    run(kw, op, _synced, db_fallback=fallback, dry_run=dry_run)


def _synced(r: dict[str, Any]) -> str:
    if r["dry_run"]:
        return "Dry run: nothing was changed."
    if r["revision"] is None:
        return "No changes: the server's directory matches LDAP."
    return f"Synced at revision {r['revision']} ({r['messages']} messages queued)."
