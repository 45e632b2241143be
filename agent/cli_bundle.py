"""`addin-agent report-bundle`: write the helpdesk bundle (agent/bundle.py) to one file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from agent.cli_common import Ctx, console, emit_json, fail, pass_ctx, shown


def _default_name(client_id: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in client_id)[:64]
    return f"addin-report-{safe or 'agent'}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _write(path: Path, text: str) -> None:
    """Written whole or not at all, readable by this user only (it names users, groups and
    hosts): a temporary file next to it, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@click.command("report-bundle")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="File to write ('-' for standard output) [default: "
    "addin-report-<client>-<time>.json in the current folder].",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
@pass_ctx
def report_bundle(c: Ctx, output: str | None, as_json: bool) -> None:
    """One JSON file for a support ticket: status, installed add-ins and pending changes per
    host, recent events, `why` for every assigned add-in, and the config with its secrets
    removed. Reads the cache only: works with the daemon stopped. `addin-server bundle show
    FILE` prints it."""
    from agent.bundle import collect
    from agent.cli_read import status_data

    # With --cache and no config anywhere, the bundle is the cache's alone.
    config = None
    if c.config_path is not None or os.environ.get("ADDIN_AGENT_TENANT") or not c.cache_override:
        config = c.config().model_dump(mode="json")
    rm = c.read()
    cache_path = c.cache_path()
    bundle = collect(rm, cache_path, config, status_data(rm, cache_path))
    text = json.dumps(bundle, indent=1, default=str) + "\n"
    if output == "-":
        click.echo(text, nl=False)
        return
    client = bundle["status"].get("client") or {}
    path = Path(output or _default_name(str(client.get("client_id") or "")))
    try:
        _write(path, text)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}")
    summary = {
        "path": str(path),
        "bytes": len(text.encode()),
        "addins": len(bundle["why"]),
        "events": len(bundle["events"]),
    }
    if as_json:
        emit_json(summary)
        return
    console.print(
        f"wrote {shown(path)}: {summary['addins']} add-in(s) explained, "
        f"{summary['events']} event(s), config without secrets",
        highlight=False,
    )
