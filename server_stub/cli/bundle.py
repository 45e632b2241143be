"""`addin-server bundle show FILE`: print a helpdesk report bundle (`addin-agent
report-bundle`) readably. The file comes from a user's machine through a ticket: it is
size-capped, checked against the bundle's shape (addin_core/bundle.py) and refused in one
line when malformed; every string in it is shown through `printable`, never as markup."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from addin_core.bundle import MAX_BUNDLE_BYTES, BundleError, check
from addin_core.display import printable
from addin_runtime.cli_support import error

EVENTS_SHOWN = 50
"""The most recent events printed (the bundle holds up to 500; --json prints them all)."""


def read_bundle(path: Path) -> dict[str, Any]:
    """The checked bundle in `path`, or BundleError saying why not (one line)."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BUNDLE_BYTES + 1)
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise BundleError(f"{path} is a directory, not a report bundle") from None
    except OSError as e:
        raise BundleError(f"{path} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise BundleError(
            f"{path} is over {MAX_BUNDLE_BYTES // (1024 * 1024)} MB: not a report bundle"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise BundleError(f"{path} nests JSON too deeply: not a report bundle") from None
    try:
        return check(data)
    except BundleError as e:
        raise BundleError(f"{path}: {e}") from None


def _s(value: Any) -> Text:
    """One cell or line: plain text with control and bidi characters made visible."""
    return Text(printable("—" if value is None or value == "" else str(value)))


def _when(t: Any) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool) or not 0 < t < 2**40:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*(_s(v) for v in r))
    return t


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def show_bundle(b: dict[str, Any], console: Console) -> None:
    st = b["status"]
    cl = _dict(st.get("client"))
    line = Text()
    for label, value in (
        ("Agent ", cl.get("client_id")),
        ("  user ", cl.get("user_id")),
        ("  tenant ", cl.get("tenant")),
        ("  bundle written ", _when(b["created_at"])),
    ):
        line.append(label, style="bold")
        line.append_text(_s(value))
    console.print(line)
    console.print(
        _s(
            f"Daemon {'running' if st.get('daemon_running') else 'stopped'}, "
            f"{'connected' if st.get('connected') else 'not connected'}"
            f"; last message {_when(st.get('last_message_at'))}; revision {st.get('revision')}"
            + (f"; last error: {st.get('last_error')}" if st.get("last_error") else "")
        )
    )
    rows = []
    hosts_given = cl.get("hosts")
    hosts = hosts_given if isinstance(hosts_given, list) else []
    for host in sorted(
        {str(h) for h in hosts}
        | set(b["installed"])
        | set(b["pending"])
        | set(_dict(st.get("pending_per_host")))
    ):
        p = _dict(_dict(st.get("pending_per_host")).get(host))
        rows.append(
            (
                host,
                len(b["installed"].get(host, [])),
                p.get("ready", 0),
                p.get("waiting", 0),
                p.get("needs_consent", 0),
            )
        )
    console.print(
        _table("Per host app", ("host", "installed", "ready", "waiting", "needs consent"), rows)
    )
    console.print(
        _table(
            "Installed",
            ("host", "add-in", "version", "installed at"),
            [
                (h, r.get("name"), r.get("version"), _when(r.get("installed_at")))
                for h, rs in sorted(b["installed"].items())
                for r in rs
            ],
        )
    )
    console.print(
        _table(
            "Pending changes",
            ("host", "add-in", "change", "state", "reason"),
            [
                (
                    h,
                    r.get("name"),
                    f"{r.get('action')} {r.get('from_version') or '—'} → "
                    f"{r.get('to_version') or '—'}",
                    r.get("state"),
                    r.get("reason"),
                )
                for h, rs in sorted(b["pending"].items())
                for r in rs
            ],
        )
    )
    why = sorted(b["why"], key=lambda w: str(w.get("name") or w.get("query") or "").lower())
    console.print(
        _table(
            "Why (every assigned add-in)",
            ("add-in", "cause", "verdict"),
            [(w.get("name") or w.get("query"), w.get("cause"), w.get("verdict")) for w in why],
        )
    )
    events = b["events"][-EVENTS_SHOWN:]
    console.print(
        _table(
            f"Events (last {len(events)} of {len(b['events'])})",
            ("time", "kind", "add-in", "host", "detail"),
            [
                (
                    _when(e.get("at")),
                    e.get("kind"),
                    e.get("addin_id"),
                    e.get("host"),
                    e.get("detail"),
                )
                for e in events
            ],
        )
    )
    cfg = b["config"]
    if cfg is None:
        console.print(_s("Config: not in the bundle (written from a cache file alone)"))
    else:
        console.print(
            _table(
                "Config (secrets removed)",
                ("field", "value"),
                [(k, json.dumps(v, default=str)) for k, v in sorted(cfg.items())],
            )
        )


@click.group()
def bundle() -> None:
    """Helpdesk report bundles written by `addin-agent report-bundle`."""


@bundle.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the checked bundle as JSON.")
def show(file: Path, as_json: bool) -> None:
    """Print the report bundle FILE: agent and daemon state, installed add-ins and pending
    changes per host, `why` for each assigned add-in, recent events, config."""
    try:
        b = read_bundle(file)
    except BundleError as e:
        error(str(e))
    if as_json:
        # ensure_ascii (the default): every control and bidi character as a \\u escape.
        click.echo(json.dumps(b, indent=2))
        return
    show_bundle(b, Console())
