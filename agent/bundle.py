"""`addin-agent report-bundle`: everything helpdesk needs for a ticket, in one JSON file.

Read from the cache alone (read-only, like `why`: works with the daemon stopped, never
blocks it) plus the agent's config with its secrets removed. One JSON document rather than an
archive: a ticket system shows it as text, `grep` finds a name in it, and the server's
`addin-server bundle show` reads it with `json` alone (no archive member names or
decompression sizes to distrust). `FORMAT` and `VERSION` name it; `addin_core.bundle`
checks a file against them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from addin_core.bundle import FORMAT, VERSION
from agent.readmodel import ReadModel

EVENTS_KEPT = 500
"""The most recent events put in a bundle (the cache keeps up to 10,000)."""

SECRET_FIELDS = ("server_token", "broker_password", "tls_key")
"""Config fields never written to a bundle; `tls_ca` and `tls_cert` are replaced by their
certificates' subjects and expiry dates."""

REMOVED = "(set; removed from the bundle)"


def _certificates(value: str) -> list[dict[str, str]] | str:
    """Subject, issuer and validity of each certificate a tls_ca/tls_cert value holds (the PEM
    text itself stays out of the bundle), or why it cannot be read."""
    from agent import pem

    try:
        certs = pem.certificates(value)
    except ValueError as e:
        return f"unreadable: {e}"
    return [
        {
            "subject": c.subject.rfc4514_string(),
            "issuer": c.issuer.rfc4514_string(),
            "not_after": c.not_valid_after_utc.isoformat(),
        }
        for c in certs
    ]


def redacted_config(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (an AgentConfig dumped as JSON) without its secrets."""
    out = dict(config)
    for name in SECRET_FIELDS:
        if out.get(name):
            out[name] = REMOVED
    for name in ("tls_ca", "tls_cert"):
        if out.get(name):
            out[name] = _certificates(str(out[name]))
    return out


def assigned_ids(rm: ReadModel) -> list[str]:
    """Every add-in this agent has an entitlement, an installed copy or a pending change
    for: the ones a ticket is about."""
    ids = {e.addin_id for e in rm.entitlements()}
    ids |= {i.addin_id for i in rm.installed()} | {p.addin_id for p in rm.pending()}
    return sorted(ids)


def collect(
    rm: ReadModel,
    cache_path: str,
    config: dict[str, Any] | None,
    status: dict[str, Any],
) -> dict[str, Any]:
    """The bundle: `status` (the `status --json` document), installed sets and pending
    changes per host, the recent events, `why` for every assigned add-in, and the config
    with secrets removed (None when the cache was named without a config)."""
    from agent.why import why

    installed: dict[str, list[dict[str, Any]]] = {}
    for i in sorted(rm.installed(), key=lambda i: (i.host.value, i.name.lower())):
        installed.setdefault(i.host.value, []).append(
            {
                "addin_id": i.addin_id,
                "name": i.name,
                "version": i.version,
                "installed_at": i.installed_at,
            }
        )
    pending: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(rm.pending(), key=lambda p: (p.host.value, p.name.lower())):
        pending.setdefault(p.host.value, []).append(
            {k: v for k, v in asdict(p).items() if k != "host"}
        )
    events = [asdict(e) for e in rm.events(0.0, EVENTS_KEPT)]
    return {
        "format": FORMAT,
        "version": VERSION,
        "created_at": time.time(),
        "cache_path": cache_path,
        "status": status,
        "installed": installed,
        "pending": pending,
        "events": events,
        "why": [why(rm.conn, a).to_json() for a in assigned_ids(rm)],
        "config": redacted_config(config) if config is not None else None,
    }
