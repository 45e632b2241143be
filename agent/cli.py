"""`addin-agent`: the endpoint daemon and its troubleshooting commands.

`run` is the daemon. `launch`, `install` and `remove` go through the running daemon's
control endpoint, or straight to the cache when no daemon answers. Everything else reads
the cache read-only: it works with the daemon stopped and never blocks it. Every command
takes `--json`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import click
from rich import table as rich_table
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from addin_core.protocol import Host
from addin_runtime.cli_support import Group, error, shared_option, shared_value
from addin_runtime.instance_lock import SUPPORTED as lock_supported
from addin_runtime.instance_lock import held_by
from agent.antientropy import describe_last
from agent.cache import CacheError, CacheInUse, open_readonly
from agent.config import AgentConfig, ConfigError, load_config

console = Console()


class Table(rich_table.Table):
    """A rich Table whose string cells are plain text, never console markup: names, reasons
    and query results come from manifests and the network ("[/bold]" in a DisplayName used
    to crash `list`, and "[link=...]" could dress up a link in a helpdesk terminal)."""

    def add_row(self, *renderables: Any, **kw: Any) -> None:
        super().add_row(*(Text(r) if isinstance(r, str) else r for r in renderables), **kw)


HOST_CHOICE = click.Choice([h.value for h in Host], case_sensitive=False)


def _host(value: str | None) -> Host | None:
    if value is None:
        return None
    for h in Host:
        if h.value.lower() == value.lower():
            return h
    raise click.BadParameter(f"unknown host {value!r}")


def fail(message: str, code: int = 1) -> NoReturn:
    error(message, code)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def when(t: float | None) -> str:
    if not t:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))


CONFIG_ENV = "ADDIN_AGENT_CONFIG"


def default_config_paths() -> list[Path]:
    """Where the agent looks for its config when neither --config nor ADDIN_AGENT_CONFIG
    names one, in order: the machine's, then the user's (``~/.config/addin-agent`` on Linux,
    ``~/Library/Application Support/addin-agent`` on macOS, ``%APPDATA%\\addin-agent`` on
    Windows)."""
    return [
        Path("/etc/addin-agent/agent.toml"),
        Path(click.get_app_dir("addin-agent")) / "agent.toml",
    ]


class Ctx:
    def __init__(self) -> None:
        self._config: AgentConfig | None = None

    @property
    def config_path(self) -> str | None:
        given = shared_value("config") or os.environ.get(CONFIG_ENV)
        if given:
            return str(given)
        for p in default_config_paths():
            if p.is_file():
                return str(p)
        return None

    @property
    def cache_override(self) -> str | None:
        value = shared_value("cache")
        return str(value) if value else None

    def config(self) -> AgentConfig:
        if self._config is None:
            path = self.config_path
            if path is None and not os.environ.get("ADDIN_AGENT_TENANT"):
                fail(
                    "no agent config: pass --config FILE or set ADDIN_AGENT_CONFIG; "
                    "looked for " + " and ".join(str(p) for p in default_config_paths())
                )
            try:
                self._config = load_config(path)
            except ConfigError as e:
                fail(str(e))
        return self._config

    def cache_path(self) -> str:
        if self.cache_override:
            return self.cache_override
        return self.config().cache_path

    def ro(self) -> sqlite3.Connection:
        try:
            return open_readonly(self.cache_path())
        except CacheError as e:
            fail(str(e))


def _options(f: Any) -> Any:
    """--config and --cache: accepted before the subcommand (``addin-agent --config X status``)
    and after it (``addin-agent status --config X``); the one after wins."""
    f = shared_option(
        "--config",
        key="config",
        type=click.Path(),
        help=f"Agent TOML config [env {CONFIG_ENV}; default /etc/addin-agent/agent.toml, "
        "then the user's config folder].",
    )(f)
    return shared_option(
        "--cache", key="cache", help="Cache file to read (overrides the config's cache_path)."
    )(f)


def pass_ctx(f: Any) -> Any:
    return _options(click.make_pass_decorator(Ctx, ensure=True)(f))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """Office add-in deployment agent."""
    ctx.obj = Ctx()


# -- the daemon ------------------------------------------------------------------------------


@main.command()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@pass_ctx
def run(c: Ctx, verbose: int) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    cfg = c.config()
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if verbose < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    problem = asyncio.run(_run(cfg))
    if problem is not None:
        fail(problem)


def _startup_problem(e: BaseException, cfg: AgentConfig) -> str:
    """One line saying what stopped the start, naming the file or endpoint involved."""
    from agent.control import ControlEndpointError

    if isinstance(e, CacheError | ControlEndpointError):
        return str(e)
    if isinstance(e, sqlite3.Error):
        return f"cache {cfg.cache_path} is not usable: {e}"
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        what = f"{e.filename}: {what}" if e.filename else what
    else:
        what = f"{type(e).__name__}: {e}"
    return f"agent {cfg.client_id} not started: {what}"


async def _run(cfg: AgentConfig) -> str | None:
    """The daemon's life; returns why it could not start (None after a normal stop)."""
    from agent.daemon import Agent

    log = logging.getLogger("addin_agent")
    agent = Agent(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except Exception as e:
        # Whatever was opened (cache, socket, broker task) is closed before saying why, so
        # the process ends instead of living on with a half-started daemon.
        log.debug("start failed", exc_info=True)
        try:
            await agent.stop()
        except Exception:  # the first failure is the one to report
            log.debug("stop after a failed start failed too", exc_info=True)
        return _startup_problem(e, cfg)
    log.info(
        "agent %s for %s/%s running; cache %s",
        cfg.client_id,
        cfg.tenant,
        cfg.user_id,
        cfg.cache_path,
    )
    await stop.wait()
    log.info("shutting down")
    await agent.stop()
    return None


# -- talking to the daemon (or the cache directly) ---------------------------------------------


def _control_call(cfg: AgentConfig, method: str, path: str) -> tuple[int, dict[str, Any]] | None:
    """Call the running daemon; None when it does not answer (then act on the cache)."""
    if not cfg.control:
        return None
    import httpx

    from agent.control import parse_endpoint

    where = parse_endpoint(cfg.control)
    try:
        if isinstance(where, str):
            transport = httpx.HTTPTransport(uds=where)
            with httpx.Client(transport=transport, timeout=30) as h:
                r = h.request(method, f"http://agent{path}")
        else:
            r = httpx.request(method, f"http://{where[0]}:{where[1]}{path}", timeout=30)
    except httpx.TransportError:
        return None
    return r.status_code, r.json()


async def _direct(cfg: AgentConfig, what: str, arg: str) -> Any:
    from agent.daemon import Agent

    agent = Agent(cfg)
    await agent.open()
    try:
        if what == "launch":
            host = Host(arg)
            n = len([k for k in agent.pending if k[0] == host and agent.pending[k].ready])
            return {"host": host.value, "installed": await agent.launch(host), "applied": n}
        if what == "install":
            return {"message": await agent.install(arg)}
        return {"message": await agent.remove(arg)}
    finally:
        await agent.stop()


def _act(c: Ctx, what: str, arg: str, path: str) -> dict[str, Any]:
    from agent.daemon import AgentRefusal

    cfg = c.config()
    answer = _control_call(cfg, "POST", path)
    if answer is not None:
        status, body = answer
        if status != 200:
            fail(body.get("detail", f"daemon answered {status}"))
        body["via"] = "daemon"
        return body
    try:
        body = asyncio.run(_direct(cfg, what, arg))
    except AgentRefusal as e:
        fail(str(e))
    except CacheInUse as e:
        # The daemon runs but its endpoint did not answer: writing the cache behind its
        # back would be overwritten by its next transition.
        via = (
            f"its control endpoint {cfg.control} did not answer"
            if cfg.control
            else ("no control endpoint is configured (`control` in the config)")
        )
        fail(
            f"the agent daemon ({'pid ' + str(e.pid) if e.pid else 'another process'}) holds "
            f"{e.path} and {via}; {what} goes through the running daemon"
        )
    except CacheError as e:
        fail(str(e))
    body["via"] = "cache"
    return body


@main.command()
@click.argument("host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def launch(c: Ctx, host: str, as_json: bool) -> None:
    """HOST starts: apply its pending changes and print the installed set."""
    h = _host(host)
    assert h is not None
    body = _act(c, "launch", h.value, f"/v1/launch/{h.value}")
    if as_json:
        emit_json(body)
        return
    t = Table(title=f"{h.value}: installed add-ins ({body['applied']} change(s) applied)")
    t.add_column("add-in")
    t.add_column("version")
    for a, v in sorted(body["installed"].items()):
        t.add_row(a, v)
    console.print(t)


@main.command()
@click.argument("addin")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def install(c: Ctx, addin: str, as_json: bool) -> None:
    """Install an available add-in (by name or id); applies at the next launch."""
    body = _act(c, "install", addin, f"/v1/install/{addin}")
    emit_json(body) if as_json else console.print(escape(body["message"]))


@main.command()
@click.argument("addin")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def remove(c: Ctx, addin: str, as_json: bool) -> None:
    """Remove an optional add-in (a fixed one is refused); applies at the next launch."""
    body = _act(c, "remove", addin, f"/v1/remove/{addin}")
    emit_json(body) if as_json else console.print(escape(body["message"]))


# -- read-only troubleshooting ---------------------------------------------------------------


def _sync(conn: sqlite3.Connection) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in conn.execute("SELECT key, value FROM sync"):
        try:
            out[r["key"]] = json.loads(r["value"])
        except (json.JSONDecodeError, TypeError):
            out[r["key"]] = r["value"]
    return out


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def status_data(conn: sqlite3.Connection, cache_path: str | None = None) -> dict[str, Any]:
    s = _sync(conn)
    holder = held_by(cache_path) if cache_path and lock_supported else None
    if cache_path and lock_supported:
        # The daemon holds the cache's lock for as long as it runs: exact, unlike a pid
        # that may have been reused since.
        running = holder is not None
    else:
        running = _pid_alive(s.get("pid")) and bool(s.get("connected") is not None)
    counts = {
        t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
        for t in ("received", "entitlements", "manifests", "installed", "pending", "events")
    }
    pending: dict[str, dict[str, int]] = {}
    for r in conn.execute("SELECT host, state, count(*) n FROM pending GROUP BY host, state"):
        pending.setdefault(r["host"], {})[r["state"]] = r["n"]
    installed = {
        r["host"]: r["n"]
        for r in conn.execute("SELECT host, count(*) n FROM installed GROUP BY host")
    }
    refused = conn.execute("SELECT count(*) FROM manifests WHERE status='refused'").fetchone()[0]
    client = s.get("client", {})
    return {
        "client": client,
        "daemon_running": running,
        "daemon_pid": holder.pid if holder else (s.get("pid") if running else None),
        "connected": bool(s.get("connected")) and running,
        "connected_at": s.get("connected_at"),
        "disconnected_at": s.get("disconnected_at"),
        "last_error": s.get("last_error"),
        "last_message_at": s.get("last_message_at"),
        "revision": s.get("revision", 0),
        "counts": counts,
        "manifests_refused": refused,
        "installed_per_host": installed,
        "pending_per_host": pending,
        "subscriptions": s.get("subscriptions", []),
        "anti_entropy": s.get("anti_entropy"),
    }


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Connection, last message, revision held, counts, pending per host."""
    d = status_data(c.ro(), c.cache_path())
    if as_json:
        emit_json(d)
        return
    cl = d["client"]
    conn_text = (
        "[green]connected[/green] since " + when(d["connected_at"])
        if d["connected"]
        else f"[yellow]not connected[/yellow] (daemon {'running' if d['daemon_running'] else 'stopped'}"
        + (f"; last error: {escape(str(d['last_error']))}" if d["last_error"] else "")
        + ")"
    )
    console.print(
        f"Agent   {cl.get('client_id', '?')}  user {cl.get('user_id', '?')}  "
        f"tenant {cl.get('tenant', '?')}"
    )
    console.print(f"Broker  {conn_text}")
    console.print(f"State   revision {d['revision']}, last message {when(d['last_message_at'])}")
    console.print(f"Sync    anti-entropy {escape(describe_last(d['anti_entropy']))}")
    n = d["counts"]
    console.print(
        f"Cache   {n['received']} topics held, {n['entitlements']} entitlements, "
        f"{n['manifests']} manifests ({d['manifests_refused']} refused), "
        f"{n['events']} events"
    )
    t = Table(title="Per host app")
    for col in ("host", "installed", "pending ready", "waiting", "needs consent"):
        t.add_column(col)
    for h in cl.get("hosts", [x.value for x in Host]):
        p = d["pending_per_host"].get(h, {})
        t.add_row(
            h,
            str(d["installed_per_host"].get(h, 0)),
            str(p.get("ready", 0)),
            str(p.get("waiting", 0)),
            str(p.get("needs_consent", 0)),
        )
    console.print(t)


def list_data(conn: sqlite3.Connection, host: Host | None) -> list[dict[str, Any]]:
    info = _sync(conn).get("client", {})
    hosts = [host.value] if host else info.get("hosts", [h.value for h in Host])
    ents = {r["addin_id"]: dict(r) for r in conn.execute("SELECT * FROM entitlements")}
    inst = {(r["host"], r["addin_id"]): dict(r) for r in conn.execute("SELECT * FROM installed")}
    pend = {(r["host"], r["addin_id"]): dict(r) for r in conn.execute("SELECT * FROM pending")}
    rows: list[dict[str, Any]] = []
    for h in hosts:
        ids = {a for a, e in ents.items() if h in e["hosts"].split(",")}
        ids |= {a for (hh, a) in inst if hh == h} | {a for (hh, a) in pend if hh == h}
        for a in sorted(ids, key=lambda x: (ents.get(x, {}).get("name") or x).lower()):
            e, i, p = ents.get(a), inst.get((h, a)), pend.get((h, a))
            rows.append(
                {
                    "host": h,
                    "addin_id": a,
                    "name": (e or i or p or {}).get("name", a),
                    "mode": e["mode"] if e else None,
                    "entitled_version": e["version"] if e else None,
                    "installed_version": i["version"] if i else None,
                    "pending": f"{p['action']} → {p['to_version'] or '—'} ({p['state']})"
                    if p
                    else None,
                    "pending_reason": p["reason"] if p else None,
                    "via": e["via"] if e else None,
                }
            )
    return rows


@main.command("list")
@click.option("--host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def list_cmd(c: Ctx, host: str | None, as_json: bool) -> None:
    """Add-ins per host: mode, entitled and installed versions, pending change."""
    rows = list_data(c.ro(), _host(host))
    if as_json:
        emit_json(rows)
        return
    t = Table(title="Add-ins")
    for col in ("host", "name", "mode", "installed", "entitled", "pending", "via"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            r["host"],
            r["name"],
            r["mode"] or "—",
            r["installed_version"] or "—",
            r["entitled_version"] or "—",
            r["pending"] or "",
            r["via"] or "",
        )
    console.print(t)


@main.command()
@click.argument("addin")
@click.option("--host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def why(c: Ctx, addin: str, host: str | None, as_json: bool) -> None:
    """Why ADDIN (name or id) is or is not in a host app: the chain and one verdict."""
    from agent.why import why as why_fn

    rep = why_fn(c.ro(), addin, _host(host))
    if as_json:
        emit_json(rep.to_json())
        return
    title = rep.name or addin
    console.print(
        f"[bold]{escape(title)}[/bold]" + (f"  ({escape(rep.addin_id)})" if rep.addin_id else "")
    )
    for s in rep.steps:
        mark = {True: "[green]✓[/green]", False: "[red]✗[/red]", None: "•"}[s.ok]
        console.print(f"  {mark} {escape(s.label)}: {escape(s.detail)}", highlight=False)
    console.print(f"[bold]→ {escape(rep.verdict)}[/bold]", highlight=False)


_REL = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_since(text: str) -> float:
    """``10m``, ``2h``, ``1d``, an ISO time (``2026-05-01T14:00``) or Unix seconds."""
    m = _REL.match(text.strip())
    if m:
        mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return time.time() - float(m.group(1)) * mult
    try:
        return float(text)
    except ValueError:
        pass
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as e:
        raise click.BadParameter(
            f"{text!r}: use 10m / 2h / 1d, an ISO time like 2026-05-01T14:00, or Unix seconds"
        ) from e


@main.command()
@click.option("--since", help="10m, 2h, 1d, an ISO time, or Unix seconds.")
@click.option("--limit", default=200, show_default=True, help="Most recent N events.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def events(c: Ctx, since: str | None, limit: int, as_json: bool) -> None:
    """The append-only event log, oldest first."""
    t0 = parse_since(since) if since else 0.0
    conn = c.ro()
    rows = [
        dict(r)
        for r in conn.execute(
            "SELECT * FROM (SELECT * FROM events WHERE at >= ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (t0, limit),
        )
    ]
    if as_json:
        emit_json(rows)
        return
    t = Table(title="Events")
    for col in ("time", "kind", "add-in", "host", "rev", "detail"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            when(r["at"]),
            r["kind"],
            r["addin_id"] or "",
            r["host"] or "",
            str(r["revision"] or ""),
            r["detail"],
        )
    console.print(t)


_READ_ACTIONS = frozenset(
    {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
)
_READ_PRAGMAS = frozenset(
    {
        "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
        "foreign_key_list", "integrity_check", "quick_check", "journal_mode", "user_version",
        "schema_version", "page_count", "page_size", "freelist_count", "database_list",
        "compile_options", "data_version", "encoding", "application_id",
    }
)  # fmt: skip
_SETTER_PRAGMAS = frozenset({"journal_mode", "user_version", "schema_version", "application_id"})


def _read_only(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """SQLite authorizer for `query`: SELECTs and read-only PRAGMAs, nothing else."""
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        if arg2 is None or (arg1 or "").lower() not in _SETTER_PRAGMAS:
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


@main.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def query(c: Ctx, sql: str, as_json: bool) -> None:
    """Run read-only SQL against the cache (the connection cannot write)."""
    conn = c.ro()
    # mode=ro stops writes to the cache, not ATTACH / VACUUM INTO / temp tables, which
    # write other files: allow reading only.
    conn.set_authorizer(_read_only)
    try:
        cur = conn.execute(sql)
        cols = [d[0] for d in cur.description or []]
        rows = [list(r) for r in cur.fetchall()]
    except sqlite3.DatabaseError as e:
        if str(e) in ("not authorized", "authorization denied"):
            fail(
                f"query failed: {e}: the cache is opened readonly, and query runs only "
                "SELECT and read-only PRAGMA statements"
            )
        fail(f"query failed: {e}")
    except sqlite3.Error as e:
        fail(f"query failed: {e}")
    if as_json:
        emit_json([dict(zip(cols, r, strict=True)) for r in rows])
        return
    t = Table()
    for col in cols:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(
            *(
                "NULL" if v is None else (f"<{len(v)} bytes>" if isinstance(v, bytes) else str(v))
                for v in r
            )
        )
    console.print(t)


@main.command("wait")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Seconds before giving up.",
)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def wait_cmd(c: Ctx, timeout: float, as_json: bool) -> None:
    """Wait until the daemon is connected, holds the entitlements the server computes for
    this user and has downloaded their manifests; exit 1 after TIMEOUT saying what is
    missing. For provisioning scripts."""
    from agent.wait import wait_in_sync

    cfg = c.config()
    state = wait_in_sync(cfg, timeout)
    if as_json:
        emit_json(asdict(state))
    elif state.done:
        console.print(f"in sync at revision {state.revision}: {escape(state.detail)}")
    if not state.done:
        fail(f"not in sync after {timeout:g} s: {state.detail}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Check broker and server reachability, clock skew, cache integrity, manifest hashes and
    that subscriptions match memberships."""
    from agent.doctor import run_checks

    cfg = c.config()
    checks = run_checks(cfg, c.ro())
    if as_json:
        emit_json([asdict(ch) for ch in checks])
    else:
        for ch in checks:
            mark = {
                "ok": "[green]ok[/green]  ",
                "warn": "[yellow]warn[/yellow]",
                "fail": "[red]FAIL[/red]",
            }[ch.status]
            console.print(f"{mark} {escape(ch.name)}: {escape(ch.detail)}", highlight=False)
    if any(ch.status == "fail" for ch in checks):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["Path", "main"]
