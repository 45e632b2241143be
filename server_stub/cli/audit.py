"""`addin-server audit`: who changed what, when, and through which way in."""

from __future__ import annotations

import io
import json
import re
import time
from datetime import datetime
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from server_stub.cli.runner import common, run
from server_stub.service.audit import MAX_AUDIT_ROWS

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``30m``, ``2h``, ``7d`` (that long ago) or an ISO date/time (local time unless it
    names its zone) -> epoch seconds. ValueError with a sentence otherwise."""
    m = _DURATION.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 2h, 7d) nor a date (2026-11-29 or "
            "2026-11-29T06:00)"
        ) from None


def _detail(d: Any) -> str:
    if isinstance(d, dict):
        return " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.items())
    return json.dumps(d)


def render_audit(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no audit lines match"
    table = Table(title=f"{len(rows)} audit line(s), newest first", title_justify="left")
    for column in ("revision", "at", "actor", "role", "via", "operation", "detail"):
        table.add_column(column, overflow="fold")
    for r in rows:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        table.add_row(str(r["revision"]), at, Text(r["actor"]), r["role"], r["via"],
                      r["operation"], Text(_detail(r["detail"])))  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=120, no_color=True, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


@click.command()
@click.option("--since", default=None, help="Only lines at or after: 30m, 2h, 7d, or a date/time.")
@click.option("--actor", default=None, help="Only this actor's lines (a token's NAME, or a login).")
@click.option("--operation", default=None, help="Only this operation (assign, nest, enable...).")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_AUDIT_ROWS),
    default=200,
    show_default=True,
    help="At most this many lines.",
)
@common
def audit(
    since: str | None, actor: str | None, operation: str | None, limit: int, **kw: Any
) -> None:
    """The audit log, newest first: each change's revision, time, actor, role, way in
    (api, console, cli) and what it changed."""
    try:
        start = parse_since(since, time.time()) if since is not None else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since") from None
    run(
        kw,
        lambda s: s.audit.entries(since=start, actor=actor, operation=operation, limit=limit),
        render_audit,
        writes=False,
    )
