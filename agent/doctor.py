"""`addin-agent doctor`: checks an engineer runs first on a misbehaving workstation."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import ssl
import stat
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

from addin_runtime.instance_lock import SUPPORTED as lock_supported
from addin_runtime.instance_lock import held_by
from agent import pem
from agent.config import AgentConfig
from agent.pending import PendingChange
from agent.readmodel import ReadModel
from agent.subscriptions import desired_filters
from agent.tls import (
    AFTER_HANDSHAKE,
    TlsSetupError,
    closed_after_handshake,
    explain,
    httpx_verify,
    mqtt_context,
)

Status = Literal["ok", "warn", "fail"]

MAX_SKEW = 60.0
"""Seconds of clock difference with the server before doctor warns (event times and
`committed_at` latencies become misleading)."""

ACCEPT_WAIT = 1.0
"""Seconds doctor waits after the TLS handshake for the broker to refuse the device
certificate (TLS 1.3 sends that alert after the handshake) before taking it as accepted."""

CERT_WARN_DAYS = 30
"""`doctor` warns when the device certificate expires within this many days."""


@dataclass(slots=True)
class Check:
    name: str
    status: Status
    detail: str


def check_broker(cfg: AgentConfig, timeout: float = 5.0) -> Check:
    host, port = cfg.broker_host, cfg.broker_port
    try:
        ctx = mqtt_context(cfg)
    except TlsSetupError as e:
        return Check("broker", "fail", str(e))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if ctx is not None:
                return _check_tls_broker(ctx, raw, host, port)
    except OSError as e:
        return Check("broker", "fail", f"{host}:{port} unreachable: {e}")
    return _check_mqtt_login(cfg, host, port, timeout)


def _check_tls_broker(ctx: ssl.SSLContext, raw: socket.socket, host: str, port: int) -> Check:
    """The TLS handshake with the device certificate, and no MQTT login: a TLS broker
    binds the client id to the certificate (``use_username_as_clientid``), so a CONNECT
    under any id would take over the running daemon's session (and its clean start would
    drop what the broker queued for it)."""
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except OSError as e:  # the broker's certificate refused, or TLS 1.2 refusing ours
        return Check("broker", "fail", f"{host}:{port}: {explain(e, 'broker') or e}")
    with tls:
        # With TLS 1.3 the broker judges our certificate after the handshake: a refusal is
        # an alert on the first read; a broker that accepted it waits for our CONNECT.
        tls.settimeout(ACCEPT_WAIT)
        try:
            closed = tls.recv(1) == b""
        except TimeoutError:
            closed = False
        except OSError as e:
            words = explain(f"{AFTER_HANDSHAKE}: {e}", "broker") or str(e)
            return Check("broker", "fail", f"{host}:{port}: {words}")
    if closed:
        return Check("broker", "fail", f"{host}:{port}: {closed_after_handshake('broker')}")
    return Check(
        "broker",
        "ok",
        f"{host}:{port} reachable over TLS, its certificate verified against tls_ca; it "
        "accepted this device's certificate (no MQTT login: the broker ties the client id "
        "to the certificate, a login would take over the daemon's session)",
    )


def _check_mqtt_login(cfg: AgentConfig, host: str, port: int, timeout: float) -> Check:
    versions = ["5", "3.1.1"] if cfg.mqtt_version == "auto" else [cfg.mqtt_version]
    for version in versions:
        check, refused_version = _mqtt_login(cfg, host, port, timeout, version)
        if not refused_version:
            return check
    return check


def _mqtt_login(
    cfg: AgentConfig, host: str, port: int, timeout: float, version: str
) -> tuple[Check, bool]:
    """The check for one protocol version, and whether the broker refused that version."""
    # An MQTT CONNECT under a separate client id: using the agent's own id would
    # disconnect the running daemon (the broker allows one session per id).
    import paho.mqtt.client as mqtt

    result: dict[str, object] = {}
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{cfg.client_id}-doctor"[:128],
        protocol=mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5,
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
        return Check("broker", "fail", f"{host}:{port} refused the MQTT connection: {e}"), False
    rc = result.get("rc")
    if rc is None:
        what = f"{host}:{port} accepts TCP but did not answer MQTT CONNECT"
        return Check("broker", "fail", what), False
    if getattr(rc, "is_failure", False):
        refused = getattr(rc, "value", None) in (1, 0x84)
        return Check("broker", "fail", f"{host}:{port} refused the login: {rc}"), refused
    return Check("broker", "ok", f"{host}:{port} reachable, MQTT {version} login accepted"), False


def check_security(cfg: AgentConfig) -> Check:
    """Lab mode or not, and what it leaves unprotected."""
    if not cfg.insecure:
        return Check(
            "security",
            "ok",
            "TLS to the broker (device certificate) and the server; state messages must be "
            "signed by the server's key",
        )
    plain = cfg.lab_gaps()
    return Check(
        "security",
        "warn",
        "insecure = true (lab mode)"
        + (": " + "; ".join(plain) if plain else "")
        + "; use the agent.toml from `addin-server enroll` outside a lab",
    )


def check_certificate(cfg: AgentConfig, now: dt.datetime | None = None) -> Check | None:
    """The device certificate: whose it is and until when (a certificate that expired
    locks the device out of the broker until it is enrolled again)."""
    if cfg.tls_cert is None:
        return None
    now = now or dt.datetime.now(dt.UTC)
    try:
        cert = pem.certificates(cfg.tls_cert)[0]
    except ValueError as e:  # changed on disk since the config was read
        return Check("certificate", "fail", f"tls_cert: {e}")
    until, since = cert.not_valid_after_utc, cert.not_valid_before_utc
    days = (until - now).total_seconds() / 86400
    detail = (
        f"device certificate CN={pem.common_name(cert)}, issued by "
        f"{cert.issuer.rfc4514_string()}, expires {until:%Y-%m-%d} ({days:.0f} days)"
    )
    if now < since:
        return Check(
            "certificate",
            "fail",
            f"{detail}: not valid before {since:%Y-%m-%d %H:%M} UTC (check the clock)",
        )
    if days <= 0:
        return Check(
            "certificate",
            "fail",
            f"{detail}: expired; the broker refuses it: enroll this device again",
        )
    if days < CERT_WARN_DAYS:
        return Check(
            "certificate", "warn", f"{detail}: renew it (enroll this device again) before then"
        )
    return Check("certificate", "ok", detail)


def check_server(cfg: AgentConfig, cache_revision: int) -> list[Check]:
    import httpx

    url = cfg.server_url.rstrip("/") + "/healthz"
    try:
        verify = httpx_verify(cfg)
    except TlsSetupError as e:
        return [Check("server", "fail", str(e))]
    try:
        t0 = time.time()
        r = httpx.get(url, timeout=5, verify=verify)
        t1 = time.time()
    except httpx.HTTPError as e:
        return [Check("server", "fail", f"{url} unreachable: {explain(e, 'server') or e}")]
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
    refused = rm.event_counts(("subscription_refused",), time.time() - 86400)
    if missing and refused:
        n, last = refused["subscription_refused"]
        return Check(
            "subscriptions",
            "fail",
            f"missing {', '.join(sorted(missing))}: the broker refused it {n} time(s) in the "
            f"last 24 h (last {(time.time() - last) / 60:.0f} min ago) and the agent keeps "
            "asking; check the broker's permissions for this user (NATS: its consumers)",
        )
    if not missing and not extra:
        return Check("subscriptions", "ok", f"{len(have)} subscriptions match the memberships held")
    parts = []
    if missing:
        parts.append("missing " + ", ".join(sorted(missing)))
    if extra:
        parts.append("extra " + ", ".join(sorted(extra)))
    return Check("subscriptions", "fail", "; ".join(parts))


def check_applier(cfg: AgentConfig, rm: ReadModel) -> list[Check]:
    """Per host: where the applier puts its add-ins, whether it can write there, what there
    is not the agent's (left alone), and what the host will load at its next launch."""
    if cfg.applier == "memory":
        return []
    from agent.applier import ApplierUnavailable
    from agent.appliers import make_applier

    try:
        applier = make_applier(cfg)
    except ApplierUnavailable as e:
        return [Check("add-ins", "fail", str(e))]
    installed = rm.installed()
    pending = rm.pending()
    out = []
    for h in cfg.hosts:
        s = applier.survey(h)
        name = f"add-ins for {h.value}"
        if s.note is not None:
            out.append(Check(name, "ok", f"{s.note}; nothing is written for {h.value} here"))
            continue
        want = {i.addin_id: i.sha256 for i in installed if i.host == h}
        loads = "; ".join(s.loads) or "no add-in"
        detail = f"{s.location}: at its next launch {h.value} loads {loads}"
        if s.problems:
            out.append(Check(name, "fail", f"{detail}; " + "; ".join(s.problems)))
            continue
        notes = []
        status: Status = "ok"
        if s.foreign:
            status = "warn"
            notes.append("left alone, not the agent's: " + "; ".join(s.foreign))
        current = applier.current(h)
        staged = _with_ready_changes(want, [p for p in pending if p.host == h])
        if current != want and current == staged and cfg.watch_hosts:
            # The watcher writes ready changes while the host is not running: they are
            # there for its next start, not a drift.
            notes.append("holds the ready changes, written for its next start")
        elif current != want:
            status = "warn"
            notes.append("differs from the installed set; the next launch repairs it")
        out.append(Check(name, status, "; ".join([detail, *notes])))
    return out


def _with_ready_changes(installed: dict[str, str], pending: list[PendingChange]) -> dict[str, str]:
    """{addin_id: sha256} of a host once its ready changes are written (as the watcher does)."""
    out = dict(installed)
    for p in pending:
        if not p.ready:
            continue
        if p.action == "remove":
            out.pop(p.addin_id, None)
        elif p.sha256 is not None:
            out[p.addin_id] = p.sha256
    return out


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


def check_key_file(cfg: AgentConfig, config_path: str | None) -> Check | None:
    """The device's private key must be readable by its owner only: in the tls_key file,
    or in the config file itself when it holds the key inline (as `enroll` writes it)."""
    if cfg.tls_key is None:
        return None
    inline = pem.is_inline(cfg.tls_key)
    path = config_path if inline else cfg.tls_key
    if path is None:  # inline from the environment
        return None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None  # the config's or the certificate check says what is wrong
    what = f"config file {path} (it holds tls_key inline)" if inline else f"tls_key file {path}"
    if mode & 0o077:
        return Check(
            "private key",
            "warn",
            f"{what} is readable by other users (mode {mode:04o}): chmod 600 {path}",
        )
    return Check("private key", "ok", f"{what} is readable by its owner only (mode {mode:04o})")


def run_checks(cfg: AgentConfig, rm: ReadModel, config_path: str | None = None) -> list[Check]:
    rev = rm.highest_revision()
    daemon = check_daemon(cfg)
    cert = check_certificate(cfg)
    key = check_key_file(cfg, config_path)
    checks = [
        *([daemon] if daemon else []),
        check_security(cfg),
        check_broker(cfg),
        *([cert] if cert else []),
        *([key] if key else []),
        check_client_id(cfg, rm),
        check_signing(cfg, rm),
        *check_server(cfg, rev),
        check_integrity(rm),
        check_manifests(rm),
        check_subscriptions(cfg, rm),
    ]
    checks.append(check_anti_entropy(cfg, rm))
    checks.extend(check_applier(cfg, rm))
    return checks
