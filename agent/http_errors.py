"""The errors of the agent's manifest clients (`agent.http_lite.StreamPool`, the daemon's, and
`agent.http_pool.HttpPool`), by the names httpx
gives the same failures, so that a failure reads the same whichever client fetched.

Not httpx's own classes: the daemon never uses httpx, and importing httpx
(with httpcore, anyio, h11, idna, certifi) to name five exceptions cost ~7.6 MB of its idle
RSS (docs/benchmarks.md, "Agent"). Code that also accepts an `httpx.AsyncClient` (the
fetcher, anti-entropy) catches `transport_errors()`: httpx's errors are among them once
httpx is imported, and an httpx client cannot exist before that.
"""

from __future__ import annotations

import sys


class HttpError(Exception):
    """A request got no usable answer (no HTTP status to look at)."""


class TransportError(HttpError):
    """The request failed on its way (closed pool, broken connection...)."""


class UnsupportedProtocol(TransportError):
    """Not an http(s) URL."""


class ConnectError(TransportError):
    """No connection to the server (refused, unreachable, TLS refused)."""


class ConnectTimeout(TransportError):
    """The connection was not made in time."""


class ReadTimeout(TransportError):
    """No complete answer in time."""


class LocalProtocolError(TransportError):
    """A request that cannot be sent as asked (a header or path that would break HTTP)."""


class RemoteProtocolError(TransportError):
    """An answer that breaks HTTP, or a body over the size limit."""


def transport_errors() -> tuple[type[Exception], ...]:
    """What a manifest or digest request may raise without an HTTP status: `HttpError`, and
    `httpx.HTTPError` when httpx is in use."""
    httpx = sys.modules.get("httpx")
    return (HttpError,) if httpx is None else (HttpError, httpx.HTTPError)
