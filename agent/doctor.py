"""`addin-agent doctor`: checks an engineer runs first on a misbehaving workstation."""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

from addin_runtime.instance_lock import SUPPORTED as lock_supported
from addin_runtime.instance_lock import held_by
from agent.config import AgentConfig
from agent.readmodel import ReadModel
from agent.subscriptions import desired_filters

Status = Literal["ok", "warn", "fail"]

MAX_SKEW = 60.0
"""Seconds of clock difference with the server before doctor warns (event times and
`committed_at` latencies become misleading)."""


@dataclass(slots=True)
class Check:
    name: str
    status: Status
    detail: str


def check_broker(cfg: AgentConfig, timeout: float = 5.0) -> Check:
    host, port = cfg.broker_host, cfg.broker_port
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        return Check("broker", "fail", f"{host}:{port} unreachable: {e}")
    # An MQTT CONNECT under a separate client id: using the agent's own id would
    # disconnect the running daemon (the broker allows one session per id).
    import paho.mqtt.client as mqtt

    result: dict[str, object] = {}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{cfg.client_id}-doctor"[:128],
        protocol=mqtt.MQTTv5,
    )
    if cfg.broker_username:
        client.username_pw_set(cfg.broker_username, cfg.broker_password)

    def on_connect(c: object, u: object, f: object, rc: object, p: object = None) -> None:
        result.setdefault("rc", rc)

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout
        while "rc" not in result and time.monotonic() < deadline:
            client.loop(0.1)
        client.disconnect()
    except OSError as e:
        return Check("broker", "fail", f"{host}:{port} refused the MQTT connection: {e}")
    rc = result.get("rc")
    if rc is None:
        return Check("broker", "fail", f"{host}:{port} accepts TCP but did not answer MQTT CONNECT")
    if getattr(rc, "is_failure", False):
        return Check("broker", "fail", f"{host}:{port} refused the login: {rc}")
    return Check("broker", "ok", f"{host}:{port} reachable, MQTT 5 login accepted")


def check_server(cfg: AgentConfig, cache_revision: int) -> list[Check]:
    import httpx

    url = cfg.server_url.rstrip("/") + "/healthz"
    try:
        t0 = time.time()
        r = httpx.get(url, timeout=5)
        t1 = time.time()
    except httpx.HTTPError as e:
        return [Check("server", "fail", f"{url} unreachable: {e}")]
    if r.status_code != 200:
        return [Check("server", "fail", f"{url} answered HTTP {r.status_code}")]
    out = []
    try:
        rev = int(r.json().get("revision", 0))
    except (ValueError, AttributeError):
        rev = -1
    lag = rev - cache_revision
    out.append(
        Check(
            "server",
            "ok" if lag <= 0 else "warn",
            f"{url} reachable; server revision {rev}, this cache holds {cache_revision}"
            + (
                f" ({lag} behind: normal for a few seconds, or changes that do not concern this user)"
                if lag > 0
                else ""
            ),
        )
    )
    date = r.headers.get("date")
    if date:
        # The Date header is truncated to the second: its true value lies in [d, d + 1).
        server_t = parsedate_to_datetime(date).timestamp() + 0.5
        skew = (t0 + t1) / 2 - server_t
        # The Date header has 1 s resolution; only report what is clearly a skew.
        status: Status = "ok" if abs(skew) < MAX_SKEW else "warn"
        out.append(Check("clock", status, f"local clock is {skew:+.1f} s from the server's"))
    else:
        out.append(Check("clock", "warn", "server sent no Date header; skew unknown"))
    return out


def check_daemon(cfg: AgentConfig) -> Check | None:
    """Whether an agent daemon runs on this cache (it holds the cache's lock while it runs)."""
    if not lock_supported or cfg.cache_path.startswith(":"):
        return None
    holder = held_by(cfg.cache_path)
    if holder is None:
        return Check(
            "daemon",
            "warn",
            f"no addin-agent is running on {cfg.cache_path}: changes arrive only while it runs",
        )
    return Check("daemon", "ok", f"addin-agent ({holder.describe()}) is running on this cache")


TAKEOVER_WINDOW = 3600.0
"""`doctor` fails when another client took the agent's client id within this many seconds."""


def check_client_id(cfg: AgentConfig, rm: ReadModel, now: float | None = None) -> Check:
    """Two agents with one client id (a copied agent.toml, a second agent on another cache)
    knock each other off the broker for as long as both run; each looks healthy alone."""
    now = time.time() if now is None else now
    counts = rm.event_counts(("session_taken_over", "connection_flapping"), now - 86400)
    if not counts:
        return Check(
            "client id", "ok", f"no other client took client id {cfg.client_id!r} in the last 24 h"
        )
    n, last = counts.get("session_taken_over") or counts["connection_flapping"]
    ago = f"last {(now - last) / 60:.0f} min ago"
    if "session_taken_over" in counts:
        detail = (
            f"the broker disconnected this agent {n} time(s) in the last 24 h ({ago}): another "
            f"client connected with client id {cfg.client_id!r} (MQTT reason 0x8E, session "
            "taken over)"
        )
    else:
        detail = (
            f"the broker closed this agent's connection right after accepting it {n} time(s) "
            f"in the last 24 h ({ago}), without a reason: probably another client uses "
            f"client id {cfg.client_id!r}"
        )
    detail += "; give each agent its own client_id"
    return Check("client id", "fail" if now - last <= TAKEOVER_WINDOW else "warn", detail)


REFUSAL_WINDOW = 86400.0
"""`doctor` fails when a state message was refused for its signature within this many seconds."""


def check_signing(cfg: AgentConfig, rm: ReadModel, now: float | None = None) -> Check:
    """Whether state signatures are enforced, and whether any message was refused for one."""
    now = time.time() if now is None else now
    if not cfg.signing_key:
        lab = "insecure = true" if cfg.insecure else "no signing_key"
        return Check(
            "signatures",
            "warn",
            f"NOT enforced ({lab}): unsigned state is accepted, so whoever can publish to the "
            "broker decides what is installed here; use the signing_key of the enrollment "
            "bundle outside a lab",
        )
    detail = f"enforced: every state message must be signed by the server's key {cfg.signing_key}"
    counts = rm.event_counts(("signature_refused",), now - REFUSAL_WINDOW)
    last = rm.last_signature_refusal()
    if not counts or last is None:
        return Check("signatures", "ok", detail + "; none refused in the last 24 h")
    n, at = counts["signature_refused"]
    return Check(
        "signatures",
        "fail",
        f"{detail}; {n} message(s) REFUSED in the last 24 h (last {(now - at) / 60:.0f} min "
        f"ago: {last.topic}: {last.reason}): the cache keeps the last signed state; tell "
        "your admin: the broker, or an account that may publish to it, may be compromised",
    )


def check_integrity(rm: ReadModel) -> Check:
    rows = rm.integrity_problems()
    if rows == ["ok"]:
        return Check("cache integrity", "ok", "PRAGMA integrity_check: ok")
    return Check("cache integrity", "fail", "; ".join(str(r) for r in rows[:5]))


def check_manifests(rm: ReadModel) -> Check:
    bad, n = [], 0
    for sha256, addin_id, xml in rm.verified_manifest_bytes():
        n += 1
        if hashlib.sha256(xml).hexdigest() != sha256:
            bad.append(addin_id)
    if bad:
        return Check(
            "manifest hashes", "fail", f"stored manifest differs from its hash: {', '.join(bad)}"
        )
    return Check("manifest hashes", "ok", f"{n} cached manifest(s) match their sha256")


def check_subscriptions(cfg: AgentConfig, rm: ReadModel) -> Check:
    want = desired_filters(rm.received_state(cfg.tenant), cfg.user_id)
    recorded = rm.sync_value("subscriptions")
    have = set(recorded) if isinstance(recorded, list) else set()
    if recorded is None:
        return Check("subscriptions", "warn", "no subscriptions recorded yet (never connected)")
    missing, extra = want - have, have - want
    if not missing and not extra:
        return Check("subscriptions", "ok", f"{len(have)} subscriptions match the memberships held")
    parts = []
    if missing:
        parts.append("missing " + ", ".join(sorted(missing)))
    if extra:
        parts.append("extra " + ", ".join(sorted(extra)))
    return Check("subscriptions", "fail", "; ".join(parts))


def check_applied(cfg: AgentConfig, rm: ReadModel) -> Check | None:
    if cfg.applier != "folder" or not cfg.applier_dir:
        return None
    from agent.applier import FolderApplier

    fa = FolderApplier(cfg.applier_dir)
    installed = rm.installed()
    diffs = []
    for h in cfg.hosts:
        want = {i.addin_id: i.sha256 for i in installed if i.host == h}
        have = fa.current(h)
        if want != have:
            diffs.append(h.value)
    if diffs:
        return Check(
            "add-in folders",
            "warn",
            f"folder differs from the installed set for {', '.join(diffs)}; "
            "the next launch of those apps repairs it",
        )
    return Check("add-in folders", "ok", f"{cfg.applier_dir} matches the installed set")


def check_anti_entropy(cfg: AgentConfig, rm: ReadModel) -> Check:
    """Compare this cache's entitlement digest with the server's now; add the daemon's last
    anti-entropy result."""
    from agent.antientropy import SYNC_KEY, compare_now, describe_last

    status, detail = compare_now(cfg, rm.received_state(cfg.tenant))
    last = rm.sync_value(SYNC_KEY)
    last = last if isinstance(last, dict) else None
    if cfg.anti_entropy_interval <= 0:
        detail += "; periodic check disabled (anti_entropy_interval = 0)"
    else:
        detail += f"; daemon: {describe_last(last)}"
    return Check("anti-entropy", status, detail)


def run_checks(cfg: AgentConfig, rm: ReadModel) -> list[Check]:
    rev = rm.highest_revision()
    daemon = check_daemon(cfg)
    checks = [
        *([daemon] if daemon else []),
        check_broker(cfg),
        check_client_id(cfg, rm),
        check_signing(cfg, rm),
        *check_server(cfg, rev),
        check_integrity(rm),
        check_manifests(rm),
        check_subscriptions(cfg, rm),
    ]
    checks.append(check_anti_entropy(cfg, rm))
    applied = check_applied(cfg, rm)
    if applied:
        checks.append(applied)
    return checks
