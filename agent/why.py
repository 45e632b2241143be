"""`addin-agent why ADDIN [--host H]`: why an add-in is (not) in a host app, from the cache
alone (works offline, daemon running or not, read-only).

The chain follows DESIGN §3.3: catalog state → assignments reaching the user and via which
groups → mode → host match → manifest cached and verified → pending until the next launch
→ installed version; it ends in ONE plain-language verdict and a machine-readable cause.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from addin_core.protocol import Host, Mode, ProtocolError, Topic, decode
from addin_runtime.cli_support import did_you_mean
from agent.pending import wanted
from agent.resolver import Explanation, explain
from agent.state import ReceivedState


@dataclass(slots=True)
class Step:
    label: str
    ok: bool | None  # None: not applicable / informational
    detail: str


@dataclass(slots=True)
class WhyReport:
    query: str
    addin_id: str | None
    name: str | None
    host: str | None
    cause: str
    verdict: str
    steps: list[Step] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _clock(t: float | None) -> str:
    if not t:
        return "at an unknown time"
    lt = time.localtime(t)
    if time.strftime("%Y-%m-%d", lt) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M", lt)
    return time.strftime("%Y-%m-%d %H:%M", lt)


def load_state(conn: sqlite3.Connection, tenant: str) -> ReceivedState:
    state = ReceivedState(tenant)
    for r in conn.execute("SELECT topic, payload FROM received"):
        try:
            topic = Topic.parse(r["topic"])
            state.apply(topic, decode(topic, r["payload"]))
        except ProtocolError:
            continue
    return state


def client_info(conn: sqlite3.Connection) -> dict[str, Any]:
    row = conn.execute("SELECT value FROM sync WHERE key = 'client'").fetchone()
    if row is None:
        return {}
    info: dict[str, Any] = json.loads(row["value"])
    return info


def find_addin(conn: sqlite3.Connection, state: ReceivedState, query: str) -> str | None:
    if query in state.catalog:
        return query
    low = query.lower()
    for a, e in state.catalog.items():
        if a.lower() == low or e.name.lower() == low:
            return a
    for table, col in (("installed", "name"), ("pending", "name"), ("entitlements", "name")):
        r = conn.execute(
            f"SELECT addin_id FROM {table} WHERE lower(addin_id) = ? OR lower({col}) = ? LIMIT 1",
            (low, low),
        ).fetchone()
        if r:
            return str(r["addin_id"])
    r = conn.execute(
        "SELECT addin_id FROM received WHERE kind = 'catalog' AND lower(addin_id) = ?", (low,)
    ).fetchone()
    return str(r["addin_id"]) if r else None


def why(conn: sqlite3.Connection, query: str, host: Host | None = None) -> WhyReport:
    info = client_info(conn)
    tenant = info.get("tenant")
    user = info.get("user_id")
    if not tenant or not user:
        return WhyReport(
            query,
            None,
            None,
            host,
            "no_state",
            "This cache has never been used by an agent: start `addin-agent run` first.",
        )
    hosts_here = tuple(Host(h) for h in info.get("hosts", [h.value for h in Host]))
    state = load_state(conn, tenant)
    steps: list[Step] = []
    if not state.held:
        return WhyReport(
            query,
            None,
            None,
            host,
            "no_state",
            "This computer has not received any deployment state yet: the agent "
            "has never reached the broker (see `addin-agent status`).",
        )
    addin_id = find_addin(conn, state, query)
    if addin_id is None:
        return WhyReport(
            query,
            None,
            None,
            host,
            "unknown",
            f"No add-in called {query!r} is in the catalog this computer received "
            f"(revision {state.revision})"
            + (
                did_you_mean(query, [e.name for e in state.catalog.values()])
                or "; check the name or ask your admin whether it exists."
            ),
        )
    x = explain(state, user, addin_id, hosts_here)
    name = x.entry.name if x.entry else addin_id
    rep = WhyReport(query, addin_id, name, host.value if host else None, "", "", steps)

    # 1. catalog
    if x.entry is None:
        held = state.held.get(Topic.catalog(tenant, addin_id))
        steps.append(
            Step(
                "catalog",
                False,
                f"removed from the catalog (revision {held.revision if held else '?'})",
            )
        )
        installed = _installed(conn, addin_id)
        if installed:
            return _done(
                rep,
                "removed",
                f"{name} was removed from the catalog by the admin; it is "
                f"removed from {', '.join(installed)} when they next start.",
            )
        return _done(
            rep,
            "removed",
            f"{name} was removed from the catalog by the admin "
            f"(revision {held.revision if held else '?'}).",
        )
    e = x.entry
    steps.append(
        Step(
            "catalog",
            e.enabled,
            f"{e.name} {e.version} ({e.source}), hosts {', '.join(e.hosts)}, "
            f"{'enabled' if e.enabled else 'TURNED OFF by the admin'} (revision {e.revision})",
        )
    )

    # 2. assignments
    for g in x.grants:
        steps.append(
            Step("assignment", True, f"{g.describe()}, mode {g.mode} (revision {g.revision})")
        )
    for g in x.blocked:
        steps.append(
            Step(
                "assignment",
                False,
                f"{g.describe()}, mode {g.mode} — does not count: nesting is disabled",
            )
        )
    if not x.grants and not x.blocked:
        steps.append(Step("assignment", False, f"no assignment reaches user {user}"))

    if not e.enabled:
        inst = _installed(conn, addin_id)
        still = f" It is removed from {', '.join(inst)} at the next launch." if inst else ""
        return _done(
            rep,
            "turned_off",
            f"{name} is turned off by the admin.{still} It stays assigned "
            "and comes back when the admin turns it on again.",
        )
    if not x.grants:
        if x.blocked:
            g = x.blocked[0]
            via = " → ".join(g.path)
            return _done(
                rep,
                "nested_disabled",
                f"You are in group {g.group_id} only through nested group "
                f"{g.path[0]} ({via}); nesting is disabled, so the assignment to "
                f"{g.group_id} does not reach you.",
            )
        inst = _installed(conn, addin_id)
        if inst:
            return _done(
                rep,
                "pending_remove",
                f"Still in {', '.join(inst)}: {name} is removed when "
                f"{'it' if len(inst) == 1 else 'they'} next start(s), because no assignment "
                "reaches you any more.",
            )
        return _done(
            rep,
            "not_assigned",
            f"{name} exists in the catalog, but no assignment "
            f"reaches you (user {user}): ask your admin to assign it to you or to one of your groups.",
        )

    # 3. mode and the user's own choice
    mode = max((g.mode for g in x.grants), key=lambda m: m.strength)
    choice = _choice(conn, addin_id)
    steps.append(
        Step(
            "mode",
            None,
            f"{mode} (strongest of {len(x.grants)} assignment(s))"
            + (f"; your choice: {choice}" if choice else ""),
        )
    )

    # 4. host match
    if host is not None:
        if host not in e.hosts:
            steps.append(Step("host", False, f"{name} runs in {', '.join(e.hosts)}, not {host}"))
            return _done(
                rep,
                "host_unsupported",
                f"{name} does not run in {host}: its manifest lists only {', '.join(e.hosts)}.",
            )
        if host not in hosts_here:
            steps.append(Step("host", False, f"{host} is not among this computer's host apps"))
            return _done(
                rep,
                "host_not_installed",
                f"{host} is not configured as installed on "
                f"this computer (hosts: {', '.join(hosts_here)}), so nothing is deployed to it.",
            )
    targets = [host] if host else [h for h in e.hosts if h in hosts_here]
    steps.append(
        Step("host", bool(targets), f"shows in {', '.join(targets) or 'no host app here'}")
    )
    if not targets:
        return _done(
            rep,
            "host_not_installed",
            f"{name} runs in {', '.join(e.hosts)}, none of which is installed on this computer.",
        )
    ent = x.entitlement
    assert ent is not None
    if not wanted(ent, {addin_id: choice} if choice else {}):
        inst = _installed(conn, addin_id)
        if mode == Mode.AVAILABLE:
            if inst:
                return _done(
                    rep,
                    "pending_remove",
                    f"{name} is now only available; it is removed "
                    f"from {', '.join(inst)} when they next start (run `addin-agent install "
                    f"{name}` to keep it).",
                )
            return _done(
                rep,
                "available",
                f"{name} is available to you but not installed by "
                f"default: run `addin-agent install {name}`; it appears when "
                f"{', '.join(targets)} next start(s).",
            )
        return _done(
            rep,
            "removed_by_user",
            f"You removed {name} (it is optional); run "
            f"`addin-agent install {name}` to get it back at the next launch.",
        )

    # 5. manifest
    m = conn.execute("SELECT * FROM manifests WHERE sha256 = ?", (e.manifest_sha256,)).fetchone()
    if m is None:
        steps.append(
            Step(
                "manifest",
                False,
                f"{e.version} (sha256 {e.manifest_sha256[:12]}…) not downloaded yet",
            )
        )
    elif m["status"] == "refused":
        steps.append(Step("manifest", False, f"{e.version} REFUSED: {m['reason']}"))
    else:
        steps.append(
            Step("manifest", True, f"{e.version} cached and verified {_clock(m['fetched_at'])}")
        )

    # 6/7. per host: pending and installed
    verdicts: list[tuple[str, str]] = []
    for h in targets:
        inst = conn.execute(
            "SELECT * FROM installed WHERE host = ? AND addin_id = ?", (h.value, addin_id)
        ).fetchone()
        pend = conn.execute(
            "SELECT * FROM pending WHERE host = ? AND addin_id = ?", (h.value, addin_id)
        ).fetchone()
        cur = inst["version"] if inst else None
        if pend is not None:
            steps.append(
                Step(
                    f"pending in {h}",
                    pend["state"] == "ready",
                    f"{pend['action']} {pend['from_version'] or '—'} → {pend['to_version'] or '—'}: "
                    f"{pend['state']}, {pend['reason']} (since {_clock(pend['since'])})",
                )
            )
        steps.append(
            Step(
                f"installed in {h}",
                inst is not None,
                f"version {cur} since {_clock(inst['installed_at'])}" if inst else "not installed",
            )
        )
        verdicts.append(_host_verdict(h, name, e.version, cur, pend, m))
    causes = {c for c, _ in verdicts}
    rep.cause = verdicts[0][0] if len(causes) == 1 else "mixed"
    rep.verdict = " ".join(v for _, v in verdicts)
    return rep


def _host_verdict(
    h: Host,
    name: str,
    version: str,
    cur: str | None,
    pend: sqlite3.Row | None,
    m: sqlite3.Row | None,
) -> tuple[str, str]:
    if pend is not None:
        frm, to = pend["from_version"], pend["to_version"]
        change = f"update {frm} → {to}" if pend["action"] == "update" else f"{name} {to}"
        keep = f"; {frm} stays" if frm else ""
        if pend["state"] == "needs_consent":
            return "needs_consent", (
                f"Not updated in {h}: {change} changes what the add-in may "
                f"access and waits for admin consent{keep} ({pend['reason']})."
            )
        if pend["state"] == "waiting":
            if m is not None and m["status"] == "refused":
                return "manifest_refused", (
                    f"Not in {h}: the manifest of {name} {to} was refused ({m['reason']}){keep}."
                )
            return "manifest_missing", (
                f"Not in {h} yet: {change} received "
                f"{_clock(pend['since'])}, but its manifest is not downloaded "
                f"yet ({pend['reason']}){keep}."
            )
        if pend["action"] == "remove":
            return "pending_remove", (
                f"Still in {h}: {name} will be removed when {h} next starts ({pend['reason']})."
            )
        return ("pending_update" if pend["action"] == "update" else "pending_install"), (
            f"Not in {h} yet: {change} received {_clock(pend['since'])}, applies when {h} next starts."
        )
    if cur is None:
        return "not_installed", f"Not in {h}: no change is pending; launch {h} to apply."
    if cur != version:
        return "downgrade_ignored", (
            f"In {h}: version {cur} is installed; the catalog says "
            f"{version}, which is not newer, and downgrades are never applied."
        )
    return "installed", f"Installed in {h}: {name} {cur}."


def _done(rep: WhyReport, cause: str, verdict: str) -> WhyReport:
    rep.cause, rep.verdict = cause, verdict
    return rep


def _installed(conn: sqlite3.Connection, addin_id: str) -> list[str]:
    return [
        r["host"]
        for r in conn.execute(
            "SELECT host FROM installed WHERE addin_id = ? ORDER BY host", (addin_id,)
        )
    ]


def _choice(conn: sqlite3.Connection, addin_id: str) -> str | None:
    r = conn.execute("SELECT choice FROM choices WHERE addin_id = ?", (addin_id,)).fetchone()
    return str(r["choice"]) if r else None


__all__ = ["Explanation", "Step", "WhyReport", "why"]
