"""The read-only `addin-agent` commands: `status`, `list`, `why`, `events`, `query`, `wait`
and `doctor`. They read the cache through `agent.readmodel` (read-only: they work with the
daemon stopped and never block it) and take ``--json``."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import click

from addin_core.display import printable
from addin_core.topics import Host
from agent.cli_common import (
    HOST_CHOICE,
    Ctx,
    console,
    emit_json,
    fail,
    parse_host,
    pass_ctx,
    plain_table,
    shown,
    text_table,
    when,
)
from agent.freshness import daemon_state

if TYPE_CHECKING:
    from agent.readmodel import ReadModel


def status_data(rm: ReadModel, cache_path: str | None = None) -> dict[str, Any]:

    s = rm.sync()
    running, pid = daemon_state(s, cache_path)
    counts = rm.counts()
    pending = rm.pending_per_host()
    installed = rm.installed_per_host()
    refused = rm.manifests_refused()
    client = s.get("client", {})
    return {
        "client": client,
        "daemon_running": running,
        "daemon_pid": pid,
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
        # {Host: [pid, ...]} the host watcher last saw; None without it (or no daemon).
        "hosts_running": s.get("hosts_running") if running else None,
    }


def security_text(sec: object) -> str | None:
    """The daemon's security settings as it recorded them at start (None from an older
    cache): lab mode in yellow, saying what it leaves open."""
    if not isinstance(sec, dict):
        return None
    if not sec.get("insecure"):
        return "yes: TLS to broker and server, signed state required"
    plain = [
        *(["plain MQTT"] if not sec.get("broker_tls") else []),
        *(["plain HTTP"] if not sec.get("server_tls") else []),
        *(["unsigned state accepted"] if not sec.get("signed_state") else []),
    ]
    return (
        click.style("no", fg="yellow")
        + ", insecure = true (lab mode)"
        + (": " + ", ".join(plain) if plain else "")
    )


@click.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """Connection, last message, revision held, counts, pending per host."""
    d = status_data(c.read(), c.cache_path())
    if as_json:
        emit_json(d)
        return
    cl = d["client"]
    p = printable
    conn_text = (
        click.style("connected", fg="green") + " since " + when(d["connected_at"])
        if d["connected"]
        else click.style("not connected", fg="yellow")
        + f" (daemon {'running' if d['daemon_running'] else 'stopped'}"
        + (f"; last error: {p(str(d['last_error']))}" if d["last_error"] else "")
        + ")"
    )
    # click, not rich: see `text_table`.
    click.echo(
        f"Agent   {p(cl.get('client_id', '?'))}  user {p(cl.get('user_id', '?'))}  "
        f"tenant {p(cl.get('tenant', '?'))}"
    )
    click.echo(f"Broker  {conn_text}")
    security = security_text(cl.get("security"))
    if security:
        click.echo(f"Secure  {security}")
    click.echo(f"State   revision {d['revision']}, last message {when(d['last_message_at'])}")
    from agent.readmodel import describe_last

    click.echo(f"Sync    anti-entropy {p(describe_last(d['anti_entropy']))}")
    apps = d["hosts_running"]
    if isinstance(apps, dict):
        running = ", ".join(f"{p(h)} (pid {', '.join(map(str, x))})" for h, x in apps.items())
        click.echo(f"Apps    running: {running or 'none'} (watched by the agent)")
    n = d["counts"]
    click.echo(
        f"Cache   {n['received']} topics held, {n['entitlements']} entitlements, "
        f"{n['manifests']} manifests ({d['manifests_refused']} refused), "
        f"{n['events']} events"
    )
    rows = []
    for h in cl.get("hosts", [x.value for x in Host]):
        ph = d["pending_per_host"].get(h, {})
        rows.append(
            (
                h,
                str(d["installed_per_host"].get(h, 0)),
                str(ph.get("ready", 0)),
                str(ph.get("waiting", 0)),
                str(ph.get("needs_consent", 0)),
            )
        )
    columns = ("host", "installed", "pending ready", "waiting", "needs consent")
    click.echo(text_table("Per host app", columns, rows))


def list_data(rm: ReadModel, host: Host | None) -> list[dict[str, Any]]:
    hosts = [host.value] if host else rm.client().get("hosts", [h.value for h in Host])
    ents = {e.addin_id: e for e in rm.entitlements()}
    inst = {(i.host.value, i.addin_id): i for i in rm.installed()}
    pend = {(p.host.value, p.addin_id): p for p in rm.pending()}
    rows: list[dict[str, Any]] = []
    for h in hosts:
        ids = {a for a, e in ents.items() if h in e.hosts}
        ids |= {a for (hh, a) in inst if hh == h} | {a for (hh, a) in pend if hh == h}
        for a in sorted(ids, key=lambda x: (ents[x].name if x in ents else x).lower()):
            e, i, p = ents.get(a), inst.get((h, a)), pend.get((h, a))
            known = e or i or p
            rows.append(
                {
                    "host": h,
                    "addin_id": a,
                    "name": known.name if known is not None else a,
                    "mode": e.mode if e else None,
                    "entitled_version": e.version if e else None,
                    "installed_version": i.version if i else None,
                    "pending": f"{p.action} → {p.to_version or '—'} ({p.state})" if p else None,
                    "pending_reason": p.reason if p else None,
                    "via": e.via if e else None,
                }
            )
    return rows


@click.command("list")
@click.option("--host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def list_cmd(c: Ctx, host: str | None, as_json: bool) -> None:
    """Add-ins per host: mode, entitled and installed versions, pending change."""
    rows = list_data(c.read(), parse_host(host))
    if as_json:
        emit_json(rows)
        return
    columns = ("host", "name", "mode", "installed", "entitled", "pending", "via")
    cells = [
        (
            r["host"],
            r["name"],
            r["mode"] or "—",
            r["installed_version"] or "—",
            r["entitled_version"] or "—",
            r["pending"] or "",
            r["via"] or "",
        )
        for r in rows
    ]
    click.echo(text_table("Add-ins", columns, cells))


@click.command()
@click.argument("addin")
@click.option("--host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def why(c: Ctx, addin: str, host: str | None, as_json: bool) -> None:
    """Why ADDIN (name or id) is or is not in a host app: the chain and one verdict."""
    from agent.freshness import Freshness, describe
    from agent.why import why as why_fn

    rm = c.read()
    running, _ = daemon_state(rm.sync(), c.cache_path())
    rep = why_fn(rm.conn, addin, parse_host(host), running=running)
    if as_json:
        emit_json(rep.to_json())
        return
    # click, not rich: `why` answers in ~100 ms as a process and importing rich is ~30 ms of
    # it. click.echo drops the colours when the output is not a terminal, as rich does.
    p = printable
    title = click.style(p(rep.name or addin), bold=True)
    click.echo(title + (f"  ({p(rep.addin_id)})" if rep.addin_id else ""))
    marks = {True: click.style("✓", fg="green"), False: click.style("✗", fg="red"), None: "•"}
    for s in rep.steps:
        click.echo(f"  {marks[s.ok]} {p(s.label)}: {p(s.detail)}")
    if rep.freshness is not None:
        f = Freshness.from_json(rep.freshness)
        mark = click.style("!", fg="yellow") if f.stale else "•"
        click.echo(f"  {mark} data: {p(describe(f))}")
    click.echo(click.style(f"→ {p(rep.verdict)}", bold=True))


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


@click.command()
@click.option("--since", help="10m, 2h, 1d, an ISO time, or Unix seconds.")
@click.option("--limit", default=200, show_default=True, help="Most recent N events.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def events(c: Ctx, since: str | None, limit: int, as_json: bool) -> None:
    """The append-only event log, oldest first."""
    t0 = parse_since(since) if since else 0.0
    rows = [asdict(e) for e in c.read().events(t0, limit)]
    if as_json:
        emit_json(rows)
        return
    t = plain_table(title="Events")
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


@click.command()
@click.argument("sql")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def query(c: Ctx, sql: str, as_json: bool) -> None:
    """Run read-only SQL against the cache (the connection cannot write)."""
    from agent.readmodel import QueryRefused

    try:
        cols, rows = c.read().query(sql)
    except QueryRefused as e:
        fail(str(e))
    if as_json:
        emit_json([dict(zip(cols, r, strict=True)) for r in rows])
        return
    t = plain_table()
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


@click.command("wait")
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
        console.print(f"in sync at revision {state.revision}: {shown(state.detail)}")
    if not state.done:
        fail(f"not in sync after {timeout:g} s: {state.detail}")


@click.command()
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def doctor(c: Ctx, as_json: bool) -> None:
    """Check broker and server reachability, clock skew, cache integrity, manifest hashes and
    that subscriptions match memberships."""
    from agent.doctor import run_checks

    cfg = c.config()
    checks = run_checks(cfg, c.read(), c.config_path)
    if as_json:
        emit_json([asdict(ch) for ch in checks])
    else:
        for ch in checks:
            mark = {
                "ok": "[green]ok[/green]  ",
                "warn": "[yellow]warn[/yellow]",
                "fail": "[red]FAIL[/red]",
            }[ch.status]
            console.print(f"{mark} {shown(ch.name)}: {shown(ch.detail)}", highlight=False)
    if any(ch.status == "fail" for ch in checks):
        sys.exit(1)


COMMANDS = (status, list_cmd, why, events, query, wait_cmd, doctor)
