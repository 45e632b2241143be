"""`addin-server config check FILE`: the server.toml `serve --config FILE` would start with,
checked the way `serve` checks it, every problem on its own line."""

from __future__ import annotations

from pathlib import Path

import click

from addin_runtime.cli_support import error
from server_stub import config as server_config


@click.group("config")
def config_group() -> None:
    """The server's configuration file (server.toml)."""


@config_group.command("check")
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
def check(config_file: Path) -> None:
    """Validate FILE as `serve --config FILE` would (without environment or flags)."""
    try:
        cfg = server_config.load(config_file)
    except server_config.ConfigError as e:
        error(str(e))
    found = server_config.problems(cfg)
    if cfg.server.pki is not None and not cfg.server.pki.is_dir():
        found.append(f"[server] pki: no folder {cfg.server.pki}")
    if found:
        error("\n".join(f"{config_file}: {p}" for p in found))
    s, d = cfg.server, cfg.directory
    mode = f"PKI {s.pki}" if s.pki is not None else "insecure (lab)"
    listen = s.listen or ("127.0.0.1:8443" if s.pki is not None else "127.0.0.1:8080")
    sync = (
        f"every {d.interval:g} s from {d.ldap_url}" if d.interval is not None else "off"
    )
    click.echo(
        f"{config_file}: ok\n"
        f"  tenant {s.tenant}, {mode}, listen {listen}, database {_database(s.database)}\n"
        f"  broker {cfg.broker.url}, metrics {'on' if cfg.metrics.enabled else 'off'}, "
        f"logs {cfg.logging.format}, ready while the outbox lags < {cfg.health.max_outbox_lag:g} s\n"
        f"  directory sync: {sync}"
    )


def _database(value: str | None) -> str | None:
    """A PostgreSQL URL without its password: the check's output may be pasted anywhere."""
    from server_stub.db_target import describe, is_url

    return describe(value) if value is not None and is_url(value) else value
