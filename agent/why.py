"""`addin-agent why ADDIN [--host H]`: why an add-in is (not) in a host app, from the cache
alone (works offline, daemon running or not, read-only).

The chain: catalog state → assignments reaching the user and via which
groups → mode → host match → manifest cached and verified → pending until the next launch
→ installed version; it ends in ONE plain-language verdict and a machine-readable cause.

What the state no longer holds comes from the history the daemon kept when it changed: the
names an add-in had before it was renamed or removed (table ``former_names``) and what took
its last assignment away (table ``lost``: a group left, an unassignment, a nesting removed).
Every report carries the freshness of the cache (agent/freshness.py); a negative verdict on
stale state says "as of <time>".
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

from addin_core.permissions import consent_changes
from addin_core.topics import Host, Mode, ProtocolError, Topic, TopicKind
from addin_runtime.cli_support import did_you_mean
from agent.applier import MAILBOX
from agent.freshness import Freshness, clock, daemon_state, freshness
from agent.pending import ManifestRecord, PendingChange, next_start, wanted
from agent.readmodel import LostRecord, ReadModel, SignatureRefusal
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
    freshness: dict[str, Any] | None = None
    """`Freshness` of the cache the answer comes from (None for a report built by hand)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _clock(t: float | None) -> str:
    return clock(t) if t else "at an unknown time"


def _at(t: float | None) -> str:
    return f"at {clock(t)}"


def _rev(n: int | None) -> str:
    return f" (revision {n})" if n else ""


def _assignments_n(n: int) -> str:
    return "1 assignment" if n == 1 else f"{n} assignments"


def find_addin(rm: ReadModel, state: ReceivedState, query: str) -> str | None:
    """The add-in `query` names: an id or name in the catalog, or one this computer had,
    waits for or was entitled to, or whose entry it held before a rename or removal."""
    if query in state.catalog:
        return query
    low = query.lower()
    for a, e in state.catalog.items():
        if a.lower() == low or e.name.lower() == low:
            return a
    return rm.addin_id_named(low) or rm.addin_id_formerly_named(low)


@dataclass(slots=True)
class _Chain:
    """What every link of the chain reads, and the report it adds its step to."""

    rm: ReadModel
    state: ReceivedState
    user: str
    hosts_here: tuple[Host, ...]
    host: Host | None
    x: Explanation
    name: str
    rep: WhyReport
    mode: Mode = Mode.AVAILABLE
    choice: str | None = None
    targets: list[Host] = field(default_factory=list)
    unplaced: frozenset[Host] = frozenset()
    """Hosts the agent's applier places nothing in (Outlook: its add-ins come from the
    mailbox), as the daemon recorded it."""

    def step(self, label: str, ok: bool | None, detail: str) -> None:
        self.rep.steps.append(Step(label, ok, detail))

    def done(self, cause: str, verdict: str) -> bool:
        self.rep.cause, self.rep.verdict = cause, verdict
        return True


def why(
    conn: sqlite3.Connection,
    query: str,
    host: Host | None = None,
    running: bool | None = None,
    now: float | None = None,
) -> WhyReport:
    """The report for `query`. `running`: whether a daemon runs on this cache (the CLI knows
    it from the cache's lock); None guesses from the pid the daemon recorded."""
    rm = ReadModel(conn)
    sync = rm.sync()
    if running is None:
        running = daemon_state(sync)[0]
    fresh = freshness(sync, running, now)
    start = _start(rm, query, host)
    if isinstance(start, WhyReport):
        # Nothing to follow; yet a message about an add-in of that id may have been refused.
        rep = _refused(start, rm.signature_refusals(query), query)
        return _stamp(rep, fresh, query)
    c = start
    _follow(c)
    return _stamp(_refused(c.rep, rm.signature_refusals(c.x.addin_id), c.name), fresh, c.name)


NEGATIVE = frozenset(
    {
        "unknown", "removed", "turned_off", "not_assigned", "nested_disabled", "left_group",
        "unassigned", "nesting_chain", "nesting_off", "pending_remove", "available",
        "host_unsupported", "excluded",
    }
)  # fmt: skip
"""Causes that say the add-in is not (or soon no longer) there because of the state held:
on stale state, a newer message may have changed them."""


def _stamp(rep: WhyReport, f: Freshness, name: str) -> WhyReport:
    """Every report carries its freshness; a negative verdict on stale state says as of when."""
    rep.freshness = f.to_json()
    if not f.stale or rep.cause not in NEGATIVE:
        return rep
    since = (
        f"as of {clock(f.as_of)}; this machine has not synced since then"
        if f.as_of
        else "as far as this machine knows; it has never synced"
    )
    if rep.cause == "not_assigned":
        rep.verdict = (
            f"{name} is not assigned to you {since} ({f.why_stale}), so a newer assignment "
            "may not have reached it (see `addin-agent status`). If that is still so once it "
            "has synced, ask your admin to assign it to you or to one of your groups."
        )
    else:
        rep.verdict += (
            f" This is {since} ({f.why_stale})."
            if f.as_of
            else f" This machine has never synced ({f.why_stale})."
        )
    return rep


def _follow(c: _Chain) -> None:
    for link in (_catalog, _assignments, _mode, _host_match, _wanted):
        if link(c):
            return
    manifest = _manifest(c)
    _per_host(c, manifest)
    _withheld(c)


_REFUSED_TEXT = {
    "unsigned": "was not signed",
    "bad signature": "had a signature that did not verify",
}


def _what(topic: str) -> str:
    try:
        kind = Topic.parse(topic).kind
    except ProtocolError:
        return "a message"
    return "its catalog entry" if kind == TopicKind.CATALOG else "an assignment of it"


def _refused(rep: WhyReport, refusals: list[SignatureRefusal], name: str) -> WhyReport:
    """A change refused for its signature, not superseded since, comes first: the verdict
    says so, and that what follows is the last signed state the cache kept."""
    if not refusals:
        return rep
    for r in refusals:
        rep.steps.insert(
            0,
            Step(
                "signature",
                False,
                f"{_clock(r.at)}: {_what(r.topic)} ({r.topic}) REFUSED: {r.reason}",
            ),
        )
    last = refusals[0]
    held = f" It shows: {rep.verdict}" if rep.verdict else ""
    rep.cause = "signature_refused"
    rep.verdict = (
        f"A change to {name} was refused {_clock(last.at)}: {_what(last.topic)} "
        f"{_REFUSED_TEXT.get(last.reason, last.reason)}. The cache keeps the last signed "
        f"state.{held} Tell your admin: the broker, or an account that may publish to it, "
        "may be compromised."
    )
    return rep


def _start(rm: ReadModel, query: str, host: Host | None) -> WhyReport | _Chain:
    """The chain for `query`, or the report saying why there is none to follow."""
    info = rm.client()
    tenant, user = info.get("tenant"), info.get("user_id")
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
    state = rm.received_state(tenant)
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
    addin_id = find_addin(rm, state, query)
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
    name = x.entry.name if x.entry else (rm.former_name(addin_id) or rm.installed_name(addin_id))
    name = name or addin_id
    rep = WhyReport(query, addin_id, name, host.value if host else None, "", "", [])
    unplaced = frozenset(Host(h) for h in info.get("unplaced_hosts", []) if h in set(Host))
    return _Chain(rm, state, user, hosts_here, host, x, name, rep, unplaced=unplaced)


def _catalog(c: _Chain) -> bool:
    """1. Is it in the catalog, and turned on?"""
    e, name = c.x.entry, c.name
    if e is None:
        held = c.rm.held(str(Topic.catalog(c.state.tenant, c.x.addin_id)))
        rev, at = (held.revision, held.at) if held else (None, None)
        when = f"by the admin {_at(at)}{_rev(rev)}" if held else "by the admin"
        c.step("catalog", False, f"removed from the catalog {when}")
        installed = c.rm.hosts_with(c.x.addin_id)
        if installed:
            return c.done(
                "removed",
                f"{name} was removed from the catalog {when}; it is removed from "
                f"{', '.join(installed)} {next_start(installed)}.",
            )
        return c.done("removed", f"{name} was removed from the catalog {when}.")
    c.step(
        "catalog",
        e.enabled,
        f"{e.name} {e.version} ({e.source}), hosts {', '.join(e.hosts)}, "
        f"{'enabled' if e.enabled else 'TURNED OFF by the admin'} (revision {e.revision})",
    )
    v = c.x.served
    if v is not None and v.ring is not None:
        c.step(
            "rollout",
            None,
            f"you are in ring {v.ring} of a {'rollback' if v.rollback else 'rollout'}: it "
            f"serves you {v.version} (others outside the reached rings get {e.version})",
        )
    if v is not None and v.rollback is not None:
        c.step(
            "rollback",
            None,
            f"{v.version} is the admin's rollback (revision {v.rollback}): applied even over "
            "a newer installed version",
        )
    return False


def _assignments(c: _Chain) -> bool:
    """2. Which assignments reach the user (and which do not count), and via which groups."""
    x, name = c.x, c.name
    for g in x.grants:
        c.step("assignment", True, f"{g.describe()}, mode {g.mode} (revision {g.revision})")
    for g in x.blocked:
        c.step(
            "assignment",
            False,
            f"{g.describe()}, mode {g.mode} — does not count: nesting is disabled",
        )
    if not x.grants and not x.blocked:
        c.step("assignment", False, f"no assignment reaches user {c.user}")
    assert x.entry is not None
    if x.excluded is not None:
        return _excluded(c)
    if not x.entry.enabled:
        inst = c.rm.hosts_with(x.addin_id)
        still = f" It is removed from {', '.join(inst)} at the next launch." if inst else ""
        return c.done(
            "turned_off",
            f"{name} is turned off by the admin.{still} It stays assigned "
            "and comes back when the admin turns it on again.",
        )
    if x.grants:
        return False
    lost = c.rm.lost(x.addin_id)
    if x.blocked:
        g = x.blocked[0]
        via = " → ".join(g.path)
        off = (
            f"the admin turned nested groups off {_at(lost.at)}{_rev(lost.revision)}"
            if lost is not None and lost.cause == "nesting_off"
            else "nesting is disabled"
        )
        if off != "nesting is disabled":
            c.step("history", False, off)
        return c.done(
            "nested_disabled",
            f"You are in group {g.group_id} only through nested group "
            f"{g.path[0]} ({via}); {off}, so the assignment to "
            f"{g.group_id} does not reach you.",
        )
    because = _lost_text(lost, name) if lost is not None else None
    if because:
        c.step("history", False, because)
    inst = c.rm.hosts_with(x.addin_id)
    if inst:
        return c.done(
            "pending_remove",
            f"Still in {', '.join(inst)}: {name} is removed {next_start(inst)}, because "
            "no assignment reaches you any more"
            + (f": {because[0].lower()}{because[1:]}" if because else "")
            + ".",
        )
    if lost is not None and because:
        return c.done(
            lost.cause,
            f"{because}. No other assignment reaches you: ask your admin to assign it to you "
            "or to one of your groups.",
        )
    return c.done(
        "not_assigned",
        f"{name} exists in the catalog, but no assignment "
        f"reaches you (user {c.user}): ask your admin to assign it to you or to one of your groups.",
    )


def _excluded(c: _Chain) -> bool:
    """2b. An exclusion on an assignment that reaches the user wins over every grant."""
    x = c.x
    assert x.excluded is not None
    g = x.excluded.grant
    said = f"{x.excluded.describe()} (revision {g.revision})"
    c.step("exclusion", False, said)
    lost = c.rm.lost(x.addin_id)
    if lost is not None and lost.cause == "excluded":
        c.step("history", False, f"excluded {_at(lost.at)}{_rev(lost.revision)}")
    inst = c.rm.hosts_with(x.addin_id)
    still = f" It is still in {', '.join(inst)} and is removed {next_start(inst)}." if inst else ""
    return c.done(
        "excluded",
        f"You are {said}: an exclusion wins over every assignment of {c.name}, so it does "
        f"not reach you.{still} Ask your admin if you need it.",
    )


def _lost_text(lost: LostRecord, name: str) -> str | None:
    """The sentence for what took the last assignment of `name` away (None: not known)."""
    when = f"{_at(lost.at)}{_rev(lost.revision)}"
    group, path = lost.group_id, lost.path
    if lost.cause == "unassigned":
        target = {"everyone": "Everyone", "user": "you"}.get(lost.target or "", f"group {group}")
        return f"The admin unassigned {name} from {target} {when}"
    if lost.cause == "left_group" and path:
        if len(path) == 1:
            return f"You left group {path[0]} {when}; it carried {name}"
        return (
            f"You left group {path[0]} {when}; through it you were in group {group} "
            f"({' → '.join(path)}), which carried {name}"
        )
    if lost.cause == "nesting_chain" and len(lost.link) == 2:
        child, parent = lost.link
        return (
            f"The admin took group {child} out of group {parent} {when}; you were in group "
            f"{group} through {' → '.join(path)}, and it carried {name}"
        )
    if lost.cause == "excluded" and len(lost.link) == 2:
        kind, ident = lost.link
        return f"The admin excluded {kind} {ident} from the assignment of {name} {when}"
    if lost.cause == "nesting_off":
        return (
            f"The admin turned nested groups off {when}; you were in group {group} only "
            f"through {' → '.join(path)}, and it carried {name}"
        )
    return None


def _mode(c: _Chain) -> bool:
    """3. The strongest mode, and the user's own choice."""
    c.mode = max((g.mode for g in c.x.grants), key=lambda m: m.strength)
    c.choice = c.rm.choice(c.x.addin_id)
    c.step(
        "mode",
        None,
        f"{c.mode} (strongest of {_assignments_n(len(c.x.grants))})"
        + (f"; your choice: {c.choice}" if c.choice else ""),
    )
    return False


def _host_match(c: _Chain) -> bool:
    """4. Does it run in the host asked about (or in any host app here)?"""
    e, name, host = c.x.entry, c.name, c.host
    assert e is not None
    if host is not None:
        if host not in e.hosts:
            c.step("host", False, f"{name} runs in {', '.join(e.hosts)}, not {host}")
            return c.done(
                "host_unsupported",
                f"{name} does not run in {host}: its manifest lists only {', '.join(e.hosts)}.",
            )
        if host not in c.hosts_here:
            c.step("host", False, f"{host} is not among this computer's host apps")
            return c.done(
                "host_not_installed",
                f"{host} is not configured as installed on "
                f"this computer (hosts: {', '.join(c.hosts_here)}), so nothing is deployed to it.",
            )
    c.targets = [host] if host else [h for h in e.hosts if h in c.hosts_here]
    c.step("host", bool(c.targets), f"shows in {', '.join(c.targets) or 'no host app here'}")
    if c.targets:
        return False
    return c.done(
        "host_not_installed",
        f"{name} runs in {', '.join(e.hosts)}, none of which is installed on this computer.",
    )


def _wanted(c: _Chain) -> bool:
    """Is it wanted at all, given its mode and the user's choice?"""
    ent, name, addin_id = c.x.entitlement, c.name, c.x.addin_id
    assert ent is not None
    if wanted(ent, {addin_id: c.choice} if c.choice else {}):
        return False
    if c.mode != Mode.AVAILABLE:
        return c.done(
            "removed_by_user",
            f"You removed {name} (it is optional); run "
            f"`addin-agent install {name}` to get it back at the next launch.",
        )
    inst = c.rm.hosts_with(addin_id)
    if inst:
        return c.done(
            "pending_remove",
            f"{name} is now only available; it is removed "
            f"from {', '.join(inst)} {next_start(inst)} (run `addin-agent install "
            f"{name}` to keep it).",
        )
    return c.done(
        "available",
        f"{name} is available to you but not installed by "
        f"default: run `addin-agent install {name}`; it appears {next_start(c.targets)}.",
    )


def _manifest(c: _Chain) -> ManifestRecord | None:
    """5. Is the entitled version's manifest downloaded and verified?"""
    e = c.x.served
    assert e is not None
    m = c.rm.manifest(e.sha256)
    if m is None:
        detail = f"{e.version} (sha256 {e.sha256[:12]}…) not downloaded yet"
        c.step("manifest", False, detail)
    elif m.status == "refused":
        c.step("manifest", False, f"{e.version} REFUSED: {m.reason}")
    else:
        c.step("manifest", True, f"{e.version} cached and verified {_clock(m.fetched_at)}")
    return m


def _per_host(c: _Chain, m: ManifestRecord | None) -> None:
    """6/7. Per host: what is pending until the next launch, what is installed; the verdict."""
    e = c.x.served
    assert e is not None
    verdicts: list[tuple[str, str]] = []
    running = c.rm.hosts_running()
    for h in c.targets:
        inst = c.rm.installed_in(h, c.x.addin_id)
        pend = c.rm.pending_in(h, c.x.addin_id)
        cur = inst.version if inst else None
        if pend is not None:
            c.step(
                f"pending in {h}",
                pend.state == "ready",
                f"{pend.action} {pend.from_version or '—'} → {pend.to_version or '—'}: "
                f"{pend.state}, {pend.reason} (since {_clock(pend.since)})",
            )
        detected = inst is not None and c.rm.detected_launch(h, inst.installed_at)
        c.step(
            # Outlook's add-ins come from the mailbox: the agent only keeps its record.
            f"tracked for {h}" if h in c.unplaced else f"installed in {h}",
            inst is not None,
            (
                f"version {cur} since {_clock(inst.installed_at)}"
                + (f" ({h}'s launch, noticed by the agent)" if detected else "")
            )
            if inst
            else "not installed",
        )
        if h in c.unplaced:
            verdicts.append(_mailbox_verdict(c, h, e.version))
            continue
        v = _host_verdict(h, c.name, e.version, cur, pend, m, h in running)
        if detected and inst is not None and v[0] == "installed":
            v = (v[0], f"{v[1][:-1]}, installed at {h}'s launch at {_clock(inst.installed_at)}.")
        verdicts.append(v)
    causes = {cause for cause, _ in verdicts}
    c.rep.cause = verdicts[0][0] if len(causes) == 1 else "mixed"
    c.rep.verdict = " ".join(v for _, v in verdicts)


def _withheld(c: _Chain) -> None:
    """A newer version the server withholds until the admin consents (its permissions or
    hosts changed): the user keeps the consented one, and the verdict says why it is not
    newer. The catalog entry only names it; no agent fetches or stages it."""
    e = c.x.entry
    w = e.withheld if e is not None else None
    if e is None or w is None:
        return
    what = (
        consent_changes(e.permissions, e.hosts, w.permissions, w.hosts)
        or "its manifest type changed"
    )
    c.step("withheld", False, f"{w.version} waits for admin consent ({what}); not deployed")
    said = f"version {w.version} of {c.name} waits for admin consent ({what})"
    if c.rep.cause == "installed":
        c.done("withheld_for_consent", f"{said[0].upper()}{said[1:]}; you keep {e.version}.")
    else:
        c.rep.verdict += f" Also, {said}; until then you get {e.version}."


def _mailbox_verdict(c: _Chain, h: Host, version: str) -> tuple[str, str]:
    """A host whose add-ins the agent cannot place: say so rather than "installed"."""
    c.step(f"placed in {h}", None, MAILBOX)
    return "mailbox", (
        f"{c.name} {version} is assigned to you for {h}. {MAILBOX}: if it is missing in {h}, "
        f"ask your admin to deploy it to your mailbox (Microsoft 365 admin center, "
        "Integrated apps)."
    )


def _host_verdict(
    h: Host,
    name: str,
    version: str,
    cur: str | None,
    pend: PendingChange | None,
    m: ManifestRecord | None,
    running: bool = False,
) -> tuple[str, str]:
    if pend is not None:
        frm, to = pend.from_version, pend.to_version
        change = f"update {frm} → {to}" if pend.action == "update" else f"{name} {to}"
        keep = f"; {frm} stays" if frm else ""
        if pend.state == "needs_consent":
            return "needs_consent", (
                f"Not updated in {h}: {change} changes what the add-in may "
                f"access and waits for admin consent{keep} ({pend.reason})."
            )
        if pend.state == "waiting":
            if m is not None and m.status == "refused":
                return "manifest_refused", (
                    f"Not in {h}: the manifest of {name} {to} was refused ({m.reason}){keep}."
                )
            return "manifest_missing", (
                f"Not in {h} yet: {change} received "
                f"{_clock(pend.since)}, but its manifest is not downloaded "
                f"yet ({pend.reason}){keep}."
            )
        if pend.action == "remove":
            return "pending_remove", (
                f"Still in {h}: {name} will be removed when {h} next starts ({pend.reason})."
            )
        when = (
            f"{h} is running: it is written to {h}'s add-in location when {h} exits and "
            "applies at its next start"
            if running
            else f"applies when {h} next starts"
        )
        return ("pending_update" if pend.action == "update" else "pending_install"), (
            f"Not in {h} yet: {change} received {_clock(pend.since)}, {when}."
        )
    if cur is None:
        return "not_installed", f"Not in {h}: no change is pending; launch {h} to apply."
    if cur != version:
        return "downgrade_ignored", (
            f"In {h}: version {cur} is installed; the catalog says "
            f"{version}, which is not newer, and downgrades are never applied without an "
            "admin's rollback."
        )
    return "installed", f"Installed in {h}: {name} {cur}."


__all__ = ["Explanation", "Step", "WhyReport", "why"]
