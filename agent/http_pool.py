"""The HTTP client a process running many agents downloads manifests with (the simulator):
aiohttp behind a small, bounded interface. A workstation's daemon uses `agent.http_lite`
(the same interface with h11 on asyncio's streams, h11 alone to import).

Why not httpx: a manifest download through httpx costs about 1.4 ms of CPU (httpx, httpcore
and anyio layers), aiohttp's C-accelerated client about 0.16 ms (`bench/bench_http_clients.py`).
A workstation does not notice, but a simulator worker runs thousands of agents sharing one
pool, and an agent must not spend more CPU fetching a 5 KB file than the server serving it.

What this module adds to aiohttp: a hard cap on the body size (a hostile server cannot make
the agent buffer more than `max_body` bytes), one timeout per request, no redirects, no
decompression, and failures raised as `agent.http_errors` (httpx's names for them) so the
fetcher handles every client alike. aiohttp itself is imported at the first request (~9.5 MB
of RSS). One instance is shared by every agent of a process. With an
`ssl_context` (agent/tls.py) an https server is verified against the tenant's CA; a server
whose certificate is refused fails with words saying so (agent/tls.py `explain`).
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent.http_errors import (
    ConnectError,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    UnsupportedProtocol,
)
from agent.tls import explain

if TYPE_CHECKING:
    import aiohttp


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status_code: int
    headers: dict[str, str]
    content: bytes


class HttpPool:
    """GET-only HTTP client with a bounded keep-alive pool; one instance serves many agents."""

    def __init__(
        self,
        *,
        max_connections: int = 64,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        max_body: int = 1024 * 1024,
        user_agent: str = "addin-agent",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.ssl_context = ssl_context
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.max_body = max_body
        self.user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # Requests beyond the connection limit wait here, not inside aiohttp: aiohttp builds
        # the request and arms its timeout before it queues for a connection, which for
        # thousands of agents notified at once was CPU and memory spent ahead of time. A
        # waiting request does not count against its timeout.
        self._slots = asyncio.Semaphore(max_connections)

    def _get_session(self) -> aiohttp.ClientSession:
        # Created on first use: an aiohttp session belongs to the running event loop.
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self.max_connections,
                    # aiohttp's default (True) verifies with the system's CAs.
                    ssl=self.ssl_context if self.ssl_context is not None else True,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=self.timeout, sock_connect=self.connect_timeout
                ),
                headers={"User-Agent": self.user_agent, "Accept-Encoding": "identity"},
                auto_decompress=False,
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def get(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> HttpResponse:
        """`tls` verifies this request's server instead of the pool's context (a manifest
        mirror on a public CDN is verified with the system's CAs, the server with the
        tenant's)."""
        if self._closed:
            raise TransportError("the HTTP pool is closed")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsupportedProtocol(f"cannot fetch {url!r}: only http(s) URLs")
        async with self._slots:
            return await self._get(url, headers, tls)

    async def _get(
        self, url: str, headers: dict[str, str] | None, tls: ssl.SSLContext | None
    ) -> HttpResponse:
        session = self._get_session()
        import aiohttp  # imported by the session's creation: a dictionary lookup

        try:
            # ssl=True keeps the connector's context (aiohttp's default for a request).
            async with session.get(
                url, headers=headers, allow_redirects=False, ssl=True if tls is None else tls
            ) as resp:
                if resp.content_length is not None and resp.content_length > self.max_body:
                    raise RemoteProtocolError(
                        f"body of {resp.content_length} bytes is over {self.max_body}"
                    )
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > self.max_body:
                        raise RemoteProtocolError(f"body over {self.max_body} bytes")
                headers_out = {k.lower(): v for k, v in resp.headers.items()}
                return HttpResponse(resp.status, headers_out, bytes(body))
        except aiohttp.ConnectionTimeoutError as e:
            raise ConnectTimeout(f"connecting for {url} timed out: {e}") from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise ReadTimeout(f"no complete answer for {url} in {self.timeout}s") from None
        except aiohttp.ClientConnectorError as e:
            # Certificate errors are ClientConnectorErrors too: say what they mean.
            words = explain(e, "server")
            raise ConnectError(f"cannot connect for {url}: {words or e}") from None
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientResponseError,
        ) as e:
            raise RemoteProtocolError(f"bad answer for {url}: {e}") from None
        except aiohttp.ClientError as e:
            raise TransportError(f"{type(e).__name__} for {url}: {e}") from None
        except asyncio.CancelledError:
            raise
