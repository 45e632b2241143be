"""A workstation daemon's manifest client: HTTP/1.1 GET with h11 on asyncio's own streams.

`agent.http_pool.HttpPool` (aiohttp) is the client for a process running many agents (the
simulator), where its C parser's CPU per download counts. A workstation's daemon runs one
agent, downloads a few manifests when something changes, and idles the rest of the day;
aiohttp with multidict, yarl, attrs, email and the rest stays in memory once imported
(~9.5 MB of RSS, docs/benchmarks.md "Agent"). This client adds only h11 (~0.2 MB, imported at
the first request), the sans-IO HTTP/1.1 library httpx is built on, to what asyncio has
already loaded (ssl included).

The HTTP wire work is h11's: the request's serialization and validation (no CR/LF smuggled in
through a header or a path), the status line and headers, the framing (Content-Length, chunked
transfer coding, the end of the connection) and whether the connection may carry another
request. The daemon faces mirrors it does not control, so this module only adds the policy
around it: a hard cap on the body (`max_body`), checked against Content-Length before the
body is read and on every piece of it as it arrives; a cap on the status line and headers
(`MAX_HEAD`, h11's ``max_incomplete_event_size``, which also bounds a chunk's size line and
trailers); an answer with both Content-Length and Transfer-Encoding refused (RFC 9112 6.3: a
sign of response splitting); a connection that sent more than the answer asked for not
reused; one timeout per request.

Same interface and guarantees as `HttpPool`: GET only, a bounded keep-alive pool, a hard cap
on the body, one timeout per request (connecting included; waiting for a connection slot is
not), no redirects, no decompression (``Accept-Encoding: identity``), and failures raised as
`agent.http_errors`. A kept-alive connection the server closed while idle is retried once on a
new one; one unused for `KEEPALIVE` seconds is closed.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agent.http_errors import (
    ConnectError,
    ConnectTimeout,
    LocalProtocolError,
    ReadTimeout,
    RemoteProtocolError,
    TransportError,
    UnsupportedProtocol,
)
from agent.http_pool import HttpResponse
from agent.tls import explain

if TYPE_CHECKING:
    import h11  # imported at the first request (see `StreamPool.get`)

MAX_HEAD = 64 * 1024
"""The longest status line and headers accepted (also a chunk's size line, and trailers)."""

READ_SIZE = 64 * 1024
"""Bytes read from the socket at a time: what may be buffered past `max_body` before the cap
refuses the body."""

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
    __slots__ = ("http", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import h11

        self.reader, self.writer = reader, writer
        self.http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
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
        # Here, not at the module's import: every daemon imports this module, one on a warm
        # cache never downloads, and h11 would stay in its memory (~0.2 MB). Later requests'
        # imports (here and below) are a dictionary lookup.
        import h11

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
        fields = [
            ("Host", host if default_port else f"{host}:{port}"),
            ("User-Agent", self.user_agent),
            ("Accept-Encoding", "identity"),
            *(headers or {}).items(),
        ]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:  # h11 validates the target and every header: nothing can end a line early
            request = h11.Request(method="GET", target=target, headers=fields)
        except h11.LocalProtocolError as e:
            raise LocalProtocolError(f"cannot request {url!r}: {e}") from None
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
        self, key: _Key, context: ssl.SSLContext | None, request: h11.Request, url: str
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
                    limit=READ_SIZE,
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
        self, conn: _Conn, key: _Key, request: h11.Request, url: str, *, reused: bool
    ) -> HttpResponse:
        """One request on `conn`; the connection goes back to the pool only after a complete
        answer that h11 says allows another, and is closed on anything else (cancellation
        included)."""
        import h11

        keep = False
        try:
            try:
                conn.writer.write(conn.http.send(request) + conn.http.send(h11.EndOfMessage()))
                await conn.writer.drain()
            except OSError as e:  # ssl.SSLError included: raised as agent.http_errors too
                if reused and isinstance(e, ConnectionError):
                    raise _Stale from None
                raise RemoteProtocolError(f"bad answer for {url}: {e}") from None
            try:
                response = await self._read_answer(conn, url, reused=reused)
            except h11.RemoteProtocolError as e:
                raise RemoteProtocolError(f"bad answer for {url}: {_why(e)}") from None
            http = conn.http
            # Both sides done: h11 saw a complete answer that keeps the connection open
            # (HTTP/1.1, no "Connection: close", not delimited by the close). Bytes already
            # past its end are a second answer nobody asked for: not a connection to reuse.
            keep = http.our_state is h11.DONE and http.their_state is h11.DONE
            if keep and not http.trailing_data[0]:
                http.start_next_cycle()
            else:
                keep = False
            return response
        finally:
            if keep and not self._closed:
                self._park(key, conn)
            else:
                conn.close()

    async def _read_answer(self, conn: _Conn, url: str, *, reused: bool) -> HttpResponse:
        """Feed h11 from the socket until the end of one answer, holding the body to
        `max_body`. h11's own errors (h11.RemoteProtocolError) go up to the caller."""
        import h11

        http, reader = conn.http, conn.reader
        received = 0
        status = 0
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError as e:  # ssl.SSLError included
                    if reused and not received and isinstance(e, ConnectionError):
                        raise _Stale from None
                    raise RemoteProtocolError(f"bad answer for {url}: {e}") from None
                if not data and reused and not received:
                    raise _Stale
                received += len(data)
                http.receive_data(data)  # b"": the end of the connection, which h11 judges
            elif isinstance(event, h11.Response):
                # h11 applies its cap only to a head still incomplete: one that arrived whole
                # in the last read may be up to READ_SIZE longer. The head's exact size is what
                # came in minus what h11 has not parsed yet (the connection carries nothing
                # from an earlier answer: it is reused only when h11 had none left).
                if received - len(http.trailing_data[0]) > MAX_HEAD:
                    raise RemoteProtocolError(
                        f"bad answer for {url}: status lines and headers over {MAX_HEAD} bytes"
                    )
                status = event.status_code
                for name, value in event.headers:
                    k, v = name.decode("latin-1"), value.decode("latin-1")
                    headers[k] = f"{headers[k]}, {v}" if k in headers else v
                if "content-length" in headers and "transfer-encoding" in headers:
                    raise RemoteProtocolError(
                        f"bad answer for {url}: both Content-Length and Transfer-Encoding"
                    )
                if int(headers.get("content-length", 0)) > self.max_body:
                    raise RemoteProtocolError(
                        f"body of {headers['content-length']} bytes is over {self.max_body}"
                    )
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body:
                    raise RemoteProtocolError(f"body over {self.max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return HttpResponse(status, headers, bytes(body))
            elif not isinstance(event, h11.InformationalResponse):  # 1xx: the answer follows
                raise RemoteProtocolError(f"bad answer for {url}: connection closed")

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


def _why(e: h11.RemoteProtocolError) -> str:
    if e.error_status_hint == 431:  # h11's buffer cap: a head (or chunk line) never ended
        return f"status line, headers or a chunk line over {MAX_HEAD} bytes"
    return str(e) or type(e).__name__
