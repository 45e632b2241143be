"""TLS for the agent's two links: the `ssl.SSLContext` for the broker (verifies the broker
with ``tls_ca``, presents the device certificate) and the one for the server (verifies it
with ``tls_ca``, host name checked), and the words for a TLS failure.

Contexts are cached per process on the PEM bytes they are built from: the simulator runs
thousands of agents in one process, and one context (one parsed CA, one loaded key) serves
them all; a certificate renewed on disk gives new bytes, hence a new context.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from agent import pem

if TYPE_CHECKING:
    from agent.config import AgentConfig


class TlsSetupError(ValueError):
    """The TLS material changed since the config was read and is no longer usable (a file
    removed or replaced): the start is refused with this one line."""


_contexts: dict[tuple[str, bytes | None, bytes | None, bytes | None], ssl.SSLContext] = {}
_lock = threading.Lock()

BROKER_REFUSED = {
    "CERTIFICATE_REVOKED": "this device's certificate is revoked",
    "CERTIFICATE_EXPIRED": "this device's certificate has expired",
    "UNKNOWN_CA": "this device's certificate is not from the broker's CA",
    "CERTIFICATE_REQUIRED": "the broker wants a client certificate and none was sent",
    "BAD_CERTIFICATE": "the broker refused this device's certificate",
    "CERTIFICATE_UNKNOWN": "the broker refused this device's certificate",
    "UNSUPPORTED_CERTIFICATE": "the broker refused this device's certificate",
    "ACCESS_DENIED": "the broker refused this device's certificate",
    "HANDSHAKE_FAILURE": "the broker and this agent agree on no TLS version or cipher",
}
"""TLS alerts the broker sends when it refuses the client (OpenSSL's reason names), and what
each most likely means for the agent."""

AFTER_HANDSHAKE = "failed to receive on socket"
"""paho's words for a read that failed after the handshake (which it does in connect()):
with TLS 1.3 the broker judges the client certificate only then."""
CLOSED_WITHOUT_ALERT = ("EOF occurred in violation of protocol", "Connection reset by peer")
"""The refusal's alert can be lost: the client's CONNECT crossing the broker's close makes
the kernel reset the connection, discarding the alert still unread."""


def _context(kind: str, ca: bytes | None, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
    with _lock:
        ctx = _contexts.get((kind, ca, cert, key))
        if ctx is None:
            try:
                ctx = _build(ca, cert, key)
            except ssl.SSLError as e:
                raise TlsSetupError(f"the TLS material is not usable: {e}") from None
            _contexts[(kind, ca, cert, key)] = ctx
        return ctx


def _build(ca: bytes | None, cert: bytes | None, key: bytes | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer, checks its host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is not None:
        # Only the tenant's CA: a certificate from a public CA for the broker's name is not
        # the broker.
        ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    else:  # insecure mode with an https:// or mqtts:// URL and no tls_ca: the system's CAs
        ctx.load_default_certs()
    if cert is not None and key is not None:
        _load_chain(ctx, cert, key)
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert: bytes, key: bytes) -> None:
    """`load_cert_chain` reads files only (Python 3.11 has no in-memory variant), and the key
    may be inline PEM: it is written to a 0600 file in a fresh 0700 folder and removed as
    soon as OpenSSL has read it. Bytes already checked at config load are what is loaded,
    even if the file changed since."""
    with tempfile.TemporaryDirectory(prefix="addin-agent-tls-") as folder:
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = Path(folder) / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        try:
            ctx.load_cert_chain(paths[0], paths[1])
        finally:
            for path in paths:
                path.unlink(missing_ok=True)


def _material(value: str | None, name: str) -> bytes | None:
    try:
        return None if value is None else pem.pem_bytes(value)
    except ValueError as e:
        raise TlsSetupError(f"{name}: {e}") from None


def mqtt_context(cfg: AgentConfig) -> ssl.SSLContext | None:
    """The context for the broker link; None for a plain ``mqtt://`` broker (insecure)."""
    if not cfg.broker_tls:
        return None
    return _context(
        "mqtt",
        _material(cfg.tls_ca, "tls_ca"),
        _material(cfg.tls_cert, "tls_cert"),
        _material(cfg.tls_key, "tls_key"),
    )


def https_context(cfg: AgentConfig) -> ssl.SSLContext | None:
    """The context for the server (manifests, anti-entropy, doctor, wait); None for a plain
    ``http://`` server (insecure). The server authenticates the device by its token, so no
    client certificate is offered here."""
    if not cfg.server_tls:
        return None
    return _context("https", _material(cfg.tls_ca, "tls_ca"), None, None)


def mirror_context(cfg: AgentConfig) -> ssl.SSLContext | None:
    """The context for https manifest mirrors (None when there are none): the system's CAs, a
    mirror being typically a public CDN, and the tenant's CA for a mirror inside the tenant.
    Unlike the server's, a mirror's identity does not matter: what it sends is accepted only
    if it hashes to the sha256 in the signed catalog entry."""
    if not any(m.startswith("https:") for m in cfg.manifest_mirrors):
        return None
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ca = _material(cfg.tls_ca, "tls_ca")
    if ca is not None:
        try:
            ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        except ssl.SSLError as e:
            raise TlsSetupError(f"the TLS material is not usable: {e}") from None
    return ctx


def httpx_verify(cfg: AgentConfig) -> ssl.SSLContext | bool:
    """httpx's ``verify=`` for the server: the tenant's CA, or httpx's default (True)."""
    ctx = https_context(cfg)
    return True if ctx is None else ctx


def ssl_errors(exc: BaseException | None) -> list[BaseException]:
    """The ssl.SSLError objects in `exc` and its causes, outermost first."""
    out: list[BaseException] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ssl.SSLError):
            out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def explain(failure: BaseException | str, peer: str) -> str | None:
    """What a TLS failure talking to `peer` ("broker" or "server") means, in words a
    helpdesk can act on; None when `failure` is not a TLS failure.

    `failure` is the exception or, for the broker, paho's text of an error it only logged
    (a refusal of the client certificate arrives after the handshake, on the first read)."""
    errors = [] if isinstance(failure, str) else ssl_errors(failure)
    text = failure if isinstance(failure, str) else " ".join(str(e) for e in [failure, *errors])
    verify = next((e for e in errors if isinstance(e, ssl.SSLCertVerificationError)), None)
    if verify is not None or "CERTIFICATE_VERIFY_FAILED" in text:
        why = getattr(verify, "verify_message", None) or "certificate verify failed"
        return (
            f"TLS: the {peer}'s certificate was not accepted ({why}): tls_ca is not the CA "
            f"that issued it, or the URL names a host it is not issued for; use the tls_ca "
            "from `addin-server enroll`"
        )
    for alert, meaning in BROKER_REFUSED.items():
        if alert in text:
            return (
                f"TLS: the {peer} refused the connection ({_alert_name(text, alert)}): "
                f"{meaning}; if this device was revoked it needs a new enrollment "
                "(`addin-server enroll`), else check tls_cert/tls_key and tls_ca"
            )
    if AFTER_HANDSHAKE in text and any(sign in text for sign in CLOSED_WITHOUT_ALERT):
        return closed_after_handshake(peer)
    if errors or "[SSL" in text:
        return (
            f"TLS handshake with the {peer} failed ({_short(text)}): is that port a TLS "
            "listener, and tls_ca the tenant's CA?"
        )
    return None


def closed_after_handshake(peer: str) -> str:
    """The words for a connection the peer closed after the handshake, before any answer."""
    return (
        f"TLS: the {peer} closed the connection right after the handshake without "
        "answering: most likely it refused this device's certificate (revoked, expired, "
        "or not from its CA); if this device was revoked it needs a new enrollment "
        "(`addin-server enroll`), else check tls_cert/tls_key and tls_ca"
    )


def _alert_name(text: str, alert: str) -> str:
    """The alert as OpenSSL names it (``TLSV1_ALERT_UNKNOWN_CA``), else the bare name."""
    for word in text.replace("]", " ").split():
        if alert in word:
            return word.strip("[]:")
    return alert


def _short(text: str) -> str:
    return text.split(" (_ssl.c", 1)[0].strip()
