"""Human-readable text for `explain` and `status` (the JSON forms come from `Service`)."""

from __future__ import annotations

import time
from typing import Any

from addin_core.permissions import consent_changes


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def render_explain(e: dict[str, Any]) -> str:
    lines = [
        f"User {e['user']} and add-in {e['addin_name']} ({e['addin_id']}) version {e['version']}"
        + ("" if e["enabled"] else " [turned off]")
        + (" [newer version waits for consent]" if e["state"] == "needs_consent" else ""),
        f"Policy: nested groups {'honoured' if e['nested_groups'] else 'not honoured (Microsoft default)'}",
    ]
    if e.get("withheld"):
        lines.append(_withheld_line(e))
    if e.get("ring"):
        kind = "rollback" if e.get("rollback") else "rollout"
        lines.append(
            f"Rollout: {e['user']} is in ring {e['ring']} of {kind} {e['rollout_id']}, "
            f"which serves version {e['user_version']}"
        )
    if e.get("rolled_back") and not e.get("ring"):
        rb = e["rolled_back"]
        lines.append(
            f"Rollback: {e['version']} is the admin's rollback {rb['rollout_id']} (revision "
            f"{rb['revision']}); agents holding a newer version go back to it"
        )
    if e.get("excluded"):
        verdict = f"NOT ENTITLED: {e['excluded']} (an exclusion wins over every assignment)"
    elif e["entitled"]:
        verdict = f"ENTITLED, mode {e['mode']}"
        if not e["enabled"]:
            verdict += ", but the add-in is turned off: agents remove it at next launch"
    elif e["grants"]:
        verdict = "NOT ENTITLED: only nested-group assignments reach this user and nesting is off"
    else:
        verdict = "NOT ENTITLED: no assignment reaches this user"
    lines.append(f"Verdict: {verdict}")
    for g in e["grants"]:
        mark = "+" if g["counts"] else "-"
        lines.append(f"  {mark} {g['why']}")
    if not e["reports"]:
        lines.append(f"Agents: no report received from any agent of {e['user']}")
    for r in e["reports"]:
        applied = ", ".join(f"{a['version']} on {a['host']}" for a in r["applied"]) or "not applied"
        lines.append(
            f"Agent {r['client_id']}: reported {_when(r['reported_at'])} at revision "
            f"{r['revision']}: {applied}"
        )
        for err in r["errors"]:
            lines.append(f"    error: {err}")
    return "\n".join(lines)


def _withheld_line(e: dict[str, Any]) -> str:
    """The same sentence `addin-agent why` says from the catalog entry's `withheld`."""
    w = e["withheld"]
    what = (
        consent_changes(e["permissions"], e["hosts"], w["permissions"], w["hosts"])
        or "its manifest type changed"
    )
    who = e["user"] if e["entitled"] else "every user"
    return (
        f"Consent: version {w['version']} waits for admin consent ({what}); {who} keeps "
        f"{e['version']} until `addin-server addin consent {e['addin_id']}`"
    )


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def describe_backlog(outbox: dict[str, Any]) -> str:
    """``"9 messages wait in the outbox (oldest 3 min)"``."""
    n = outbox["waiting"]
    if not n:
        return "the outbox is empty"
    age = max(0.0, time.time() - float(outbox["oldest_created_at"]))
    return f"{n} message{'s' if n != 1 else ''} wait{'s' if n == 1 else ''} in the outbox (oldest {_age(age)})"


def _publisher_line(s: dict[str, Any]) -> str | None:
    outbox, pub = s.get("outbox"), s.get("publisher")
    if outbox is None:
        return None
    if pub is None:
        return f"Outbox: {describe_backlog(outbox)}"
    if pub["running"]:
        who = f"pid {pub['pid']}" if pub.get("pid") else "a replica holds the outbox"
        return f"Publisher: addin-server serve ({who}) is running; {describe_backlog(outbox)}"
    tail = ", published when it starts" if outbox["waiting"] else ""
    return (
        f"Publisher: no addin-server serve is running on this database; "
        f"{describe_backlog(outbox)}{tail}"
    )


def render_status(s: dict[str, Any]) -> str:
    rows = s["addins"]
    publisher = _publisher_line(s)
    if not rows:
        return f"No add-ins in the catalog (revision {s['revision']})." + (
            f"\n{publisher}" if publisher else ""
        )
    header = f"{'ADD-IN':<38} {'NAME':<28} {'VERSION':<11} {'STATE':<14} {'APPLIED':>16}"
    lines = [header]
    for a in rows:
        state = "off" if not a["enabled"] else a["state"]
        applied = f"{a['reported_current']}/{a['to_install']}"
        lines.append(
            f"{a['addin_id']:<38} {a['name'][:28]:<28} {a['version']:<11} {state:<14} {applied:>16}"
        )
        if a["available_only"]:
            lines.append(f"{'':<38} + {a['available_only']} users may install it (available)")
    lines.append(
        f"APPLIED = entitled users (fixed/optional) whose agent reported the current version; "
        f"revision {s['revision']}"
    )
    if publisher:
        lines.append(publisher)
    return "\n".join(lines)
