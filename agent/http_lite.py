"""A workstation daemon's manifest client: HTTP/1.1 GET on asyncio's own streams.

`agent.http_pool.HttpPool` (aiohttp) is the client for a process running many agents (the
simulator), where its C parser's CPU per download counts. A workstation's daemon runs one
agent, downloads a few manifests when something changes, and idles the rest of the day;
aiohttp with multidict, yarl, attrs, email and the rest stays in memory once imported
(~9.5 MB of RSS, docs/benchmarks.md "Agent"). This client imports nothing asyncio has not
already loaded (ssl included), so a daemon that has downloaded is as small as one that has not.

Same interface and guarantees as `HttpPool`: GET only, a bounded keep-alive pool, a hard cap
on the body (`max_body`), one timeout per request (connecting included; waiting for a
connection slot is not), no redirects, no decompression (``Accept-Encoding: identity``), and
failures raised as `agent.http_errors`. Bodies framed by Content-Length, chunked transfer
coding, or the end of the connection; a kept-alive connection the server closed while idle
is retried once on a new one.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

from agent.http_errors import (
    ConnectError,
    ConnectTimeout,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    UnsupportedProtocol,
)
from agent.http_pool import HttpResponse
from agent.tls import explain

MAX_HEAD = 64 * 1024
"""The longest status line and headers accepted (asyncio's stream limit)."""

KEEPALIVE = 15.0
"""Seconds an unused connection stays open (aiohttp's default too): a burst of downloads
reuses its connections, and an idle daemon holds none open to the server, which would
otherwise keep one per device of the fleet."""

_Key = tuple[str, str, int, int]
"""(scheme, host, port, id of the TLS context): connections are reused only for the same."""


class _Stale(Exception):
    """A reused connection ended before any byte of the answer: the server closed it while
    it sat idle. Worth one retry on a new connection (nothing was processed)."""


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def close(self) -> None:
        self.writer.close()


class StreamPool:
    """GET-only HTTP client with a bounded keep-alive pool, for one agent's downloads."""

    def __init__(
        self,
        *,
        max_connections: int = 4,
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
        self._idle: dict[_Key, list[_Conn]] = {}
        self._closed = False
        self._slots = asyncio.Semaphore(max_connections)
        self._system_tls: ssl.SSLContext | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self.keepalive = KEEPALIVE

    async def aclose(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        for conns in self._idle.values():
            for c in conns:
                c.close()
        self._idle.clear()

    async def __aenter__(self) -> StreamPool:
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
        """`tls` verifies this request's server instead of the pool's context (see
        `HttpPool.get`)."""
        if self._closed:
            raise TransportError("the HTTP pool is closed")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UnsupportedProtocol(f"cannot fetch {url!r}: only http(s) URLs")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as e:
            raise UnsupportedProtocol(f"cannot fetch {url!r}: {e}") from None
        context = self._context(parts.scheme, tls)
        key = (parts.scheme, parts.hostname, port, id(context))
        default_port = parts.port is None or port == (443 if parts.scheme == "https" else 80)
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"GET {target} HTTP/1.1", f"Host: {host if default_port else f'{host}:{port}'}"]
        head += [f"User-Agent: {self.user_agent}", "Accept-Encoding: identity"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._exchange(key, context, request, url)
            except TimeoutError:
                raise ReadTimeout(f"no complete answer for {url} in {self.timeout}s") from None

    def _context(self, scheme: str, tls: ssl.SSLContext | None) -> ssl.SSLContext | None:
        if scheme != "https":
            return None
        if tls is not None:
            return tls
        if self.ssl_context is not None:
            return self.ssl_context
        if self._system_tls is None:  # aiohttp's default too: the system's CAs
            self._system_tls = ssl.create_default_context()
        return self._system_tls

    async def _exchange(
        self, key: _Key, context: ssl.SSLContext | None, request: bytes, url: str
    ) -> HttpResponse:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reader.at_eof() or conn.writer.is_closing():
                conn.close()
                continue
            try:
                return await self._on(conn, key, request, url, reused=True)
            except _Stale:
                break  # the others are as old: a new connection
        conn = await self._connect(key, context, url)
        try:
            return await self._on(conn, key, request, url, reused=False)
        except _Stale:
            raise RemoteProtocolError(f"bad answer for {url}: connection closed") from None

    async def _connect(self, key: _Key, context: ssl.SSLContext | None, url: str) -> _Conn:
        _, host, port, _ = key
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                    limit=MAX_HEAD,
                ),
                self.connect_timeout,
            )
        except TimeoutError:
            raise ConnectTimeout(f"connecting for {url} timed out") from None
        except OSError as e:  # ssl.SSLError is an OSError: a refused certificate lands here
            words = explain(e, "server")
            raise ConnectError(f"cannot connect for {url}: {words or e}") from None
        return _Conn(reader, writer)

    async def _on(
        self, conn: _Conn, key: _Key, request: bytes, url: str, *, reused: bool
    ) -> HttpResponse:
        """One request on `conn`; the connection goes back to the pool only after a complete
        answer that allows it, and is closed on anything else (cancellation included)."""
        keep = False
        try:
            try:
                conn.writer.write(request)
                await conn.writer.drain()
                status_line = await conn.reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as e:
                nothing = isinstance(e, ConnectionError) or (
                    isinstance(e, asyncio.IncompleteReadError) and not e.partial
                )
                if reused and nothing:
                    raise _Stale from None
                raise RemoteProtocolError(f"bad answer for {url}: {_why(e)}") from None
            try:
                response, keep = await self._read_answer(conn.reader, status_line, url)
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as e:
                raise RemoteProtocolError(f"bad answer for {url}: {_why(e)}") from None
            return response
        finally:
            if keep and not self._closed:
                self._park(key, conn)
            else:
                conn.close()

    def _park(self, key: _Key, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        conn.idle_since = loop.time()
        self._idle.setdefault(key, []).append(conn)
        if self._expiry is None:
            self._expiry = loop.call_later(self.keepalive, self._expire)

    def _expire(self) -> None:
        """Close the connections unused for `keepalive` seconds; look again while any is left."""
        self._expiry = None
        loop = asyncio.get_running_loop()
        oldest_kept = None
        for key in list(self._idle):
            kept = []
            for c in self._idle[key]:
                if loop.time() - c.idle_since >= self.keepalive:
                    c.close()
                else:
                    kept.append(c)
                    if oldest_kept is None or c.idle_since < oldest_kept:
                        oldest_kept = c.idle_since
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if oldest_kept is not None:
            self._expiry = loop.call_later(oldest_kept + self.keepalive - loop.time(), self._expire)

    async def _read_answer(
        self, reader: asyncio.StreamReader, status_line: bytes, url: str
    ) -> tuple[HttpResponse, bool]:
        """(the answer, whether the connection may carry another request)."""
        bad = f"bad answer for {url}"
        parts = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0"):
            raise RemoteProtocolError(f"{bad}: not an HTTP/1.x status line")
        if not (len(parts[1]) == 3 and parts[1].isdigit()):
            raise RemoteProtocolError(f"{bad}: status {parts[1]!r} is not a number")
        status = int(parts[1])
        headers: dict[str, str] = {}
        size = len(status_line)
        while (raw := await reader.readuntil(b"\r\n")) != b"\r\n":
            size += len(raw)
            if size > MAX_HEAD:
                raise RemoteProtocolError(f"{bad}: status line and headers over {MAX_HEAD} bytes")
            name, colon, value = raw.decode("latin-1").rstrip("\r\n").partition(":")
            if not colon or not name or name != name.strip():
                raise RemoteProtocolError(f"{bad}: header line without a name")
            name, value = name.lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        keep = parts[0] == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if status < 200 or status in (204, 304):
            return HttpResponse(status, headers, b""), keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._chunked(reader, bad)
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise RemoteProtocolError(f"{bad}: Content-Length {length!r}")
            if int(length) > self.max_body:
                raise RemoteProtocolError(f"body of {length} bytes is over {self.max_body}")
            body = await reader.readexactly(int(length))
        else:  # delimited by the end of the connection
            body = await reader.read(self.max_body + 1)
            while len(body) <= self.max_body and not reader.at_eof():
                more = await reader.read(self.max_body + 1 - len(body))
                if not more:
                    break
                body += more
            if len(body) > self.max_body:
                raise RemoteProtocolError(f"body over {self.max_body} bytes")
            keep = False
        return HttpResponse(status, headers, body), keep

    async def _chunked(self, reader: asyncio.StreamReader, bad: str) -> bytes:
        body = bytearray()
        while True:
            size_line = (await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip()
            if not size_line or size_line.strip(b"0123456789abcdefABCDEF"):
                raise RemoteProtocolError(f"{bad}: chunk size {size_line[:20]!r}")
            size = int(size_line, 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers: read, not kept
                return bytes(body)
            if len(body) + size > self.max_body:
                raise RemoteProtocolError(f"body over {self.max_body} bytes")
            body += await reader.readexactly(size)
            if await reader.readexactly(2) != b"\r\n":
                raise RemoteProtocolError(f"{bad}: chunk not followed by CRLF")


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return f"connection closed after {len(e.partial)} bytes of {e.expected or 'more'}"
    if isinstance(e, asyncio.LimitOverrunError):
        return f"status line or headers over {MAX_HEAD} bytes"
    return str(e) or type(e).__name__
