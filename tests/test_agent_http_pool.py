"""The agent's manifest clients, agent.http_pool.HttpPool (aiohttp) and agent.http_lite.StreamPool
(h11 on asyncio streams, the daemon's), against a real loopback HTTP server that answers in
every framing (Content-Length, chunked, until close), closes idle connections, lies, or stalls,
and against hostile ones (bodies over the cap, malformed chunks, oversized heads, both
framings at once, closes mid-answer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from agent import http_errors
from agent.http_lite import StreamPool
from agent.http_pool import HttpPool

Handler = Callable[[str], bytes | None]
"""request target -> raw response bytes (None: close without answering)."""


class RawServer:
    def __init__(self, handler: Handler, close_after: int = 0, stall: bool = False) -> None:
        self.handler = handler
        self.close_after = close_after  # close the connection after N answers (0: keep)
        # After the first answer, hold the connection open and send nothing more until the
        # server stops: a client that waits for more than it needs waits for its timeout.
        self.stall = stall
        self._release = asyncio.Event()
        self.connections = 0
        self.requests: list[str] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode().split("\r\n")
                self.requests.append(head.decode())
                out = self.handler(lines[0].split(" ")[1])
                if out is None:
                    return
                writer.write(out)
                await writer.drain()
                if self.stall:
                    await self._release.wait()
                    return
                answered += 1
                if self.close_after and answered >= self.close_after:
                    return
        finally:
            writer.close()

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self._release.set()
        self.server.close()


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


Pool = HttpPool | StreamPool


@pytest.fixture(params=[HttpPool, StreamPool])
def pool_cls(request: pytest.FixtureRequest) -> type[Pool]:
    cls: type[Pool] = request.param
    return cls


@pytest.fixture
async def pool(pool_cls: type[Pool]) -> AsyncIterator[Pool]:
    p = pool_cls(max_connections=4, timeout=2.0, connect_timeout=2.0, max_body=1000)
    yield p
    await p.aclose()


async def test_content_length_reuses_one_connection(pool: Pool) -> None:
    async with RawServer(lambda t: ok(t.encode())) as srv:
        for i in range(5):
            r = await pool.get(f"{srv.url}/m/{i}?x=1", headers={"Authorization": "Bearer t"})
            assert (r.status_code, r.content) == (200, f"/m/{i}?x=1".encode())
        assert srv.connections == 1
        assert "Authorization: Bearer t" in srv.requests[0]
        assert srv.requests[0].startswith("GET /m/0?x=1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_chunked_and_close_delimited_bodies(pool: Pool) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n"
    async with RawServer(lambda t: chunked) as srv:
        r = await pool.get(srv.url + "/c")
        assert r.content == b"hello world"
        r = await pool.get(srv.url + "/c")
        assert r.content == b"hello world" and srv.connections == 1
    async with RawServer(lambda t: b"HTTP/1.0 404 Not Found\r\n\r\nnope", close_after=1) as srv:
        r = await pool.get(srv.url + "/x")
        assert (r.status_code, r.content) == (404, b"nope")
        r = await pool.get(srv.url + "/x")
        assert r.status_code == 404 and srv.connections == 2


async def test_server_closing_idle_connections_is_retried_once(pool: Pool) -> None:
    async with RawServer(lambda t: ok(b"x"), close_after=1) as srv:
        for _ in range(3):
            assert (await pool.get(srv.url + "/m")).content == b"x"
            await asyncio.sleep(0.05)  # let the server's close arrive (or not) first
        assert srv.connections == 3


async def test_a_kept_connection_closed_without_an_answer_is_retried_on_a_new_one(
    pool: Pool,
) -> None:
    """The server takes the second request on the kept-alive connection and closes it without
    a byte (as a server timing out an idle connection does): the request goes again on a new
    connection, once; a new connection that does the same is an error."""
    seen: list[str] = []

    def second_unanswered(target: str) -> bytes | None:
        seen.append(target)
        return None if len(seen) == 2 else ok(b"x")

    async with RawServer(second_unanswered) as srv:
        assert (await pool.get(srv.url + "/a")).content == b"x"
        assert (await pool.get(srv.url + "/b")).content == b"x"
        assert seen == ["/a", "/b", "/b"] and srv.connections == 2
    async with RawServer(lambda t: None) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/never")


async def test_the_daemons_pool_closes_connections_left_unused() -> None:
    """An idle daemon holds no connection to the server: a connection unused for `keepalive`
    seconds is closed (the server sees it end), one in use meanwhile stays for reuse."""
    ended = asyncio.Event()
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    ended.set()
                    return
                writer.write(ok(b"x"))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/m"
    pool = StreamPool(max_connections=2)
    try:
        pool.keepalive = 3600.0
        for _ in range(3):  # in use: kept and reused
            assert (await pool.get(url)).content == b"x"
        assert connections == 1 and not ended.is_set()
        pool.keepalive = 0.01
        assert pool._expiry is not None
        pool._expiry.cancel()
        pool._expire()  # the timer's work now: it closes it, or looks again 0.01 s after its use
        await asyncio.wait_for(ended.wait(), 10)
        assert not pool._idle and pool._expiry is None
        assert (await pool.get(url)).content == b"x" and connections == 2
    finally:
        await pool.aclose()
        server.close()


async def test_bodies_over_the_limit_are_refused(pool: Pool) -> None:
    big = b"y" * 1001
    async with RawServer(lambda t: ok(big)) as srv:
        with pytest.raises(http_errors.RemoteProtocolError, match="over 1000"):
            await pool.get(srv.url + "/big")
    chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + big + b"\r\n0\r\n\r\n"
    async with RawServer(lambda t: chunk) as srv:
        with pytest.raises(http_errors.RemoteProtocolError, match="over 1000"):
            await pool.get(srv.url + "/big")
    async with RawServer(lambda t: b"HTTP/1.1 200 OK\r\n\r\n" + big, close_after=1) as srv:
        with pytest.raises(http_errors.RemoteProtocolError, match="over 1000"):
            await pool.get(srv.url + "/big")


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    ],
)
async def test_malformed_answers_are_protocol_errors(pool: Pool, answer: bytes) -> None:
    async with RawServer(lambda t: answer, close_after=1) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


async def test_unreachable_stalled_and_unsupported(pool: Pool, pool_cls: type[Pool]) -> None:
    async with RawServer(lambda t: ok(b"")) as srv:
        url = srv.url
    with pytest.raises(http_errors.ConnectError):
        await pool.get(url + "/m")  # the server is gone
    stall = asyncio.Event()

    async def never(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await stall.wait()

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fast = pool_cls(timeout=0.3)
    try:
        with pytest.raises(http_errors.ReadTimeout):
            await fast.get(f"http://127.0.0.1:{port}/m")
    finally:
        stall.set()
        server.close()
        await fast.aclose()
    with pytest.raises(http_errors.UnsupportedProtocol):
        await pool.get("ftp://127.0.0.1/x")
    await pool.aclose()
    with pytest.raises(http_errors.TransportError):
        await pool.get(url + "/m")


async def test_requests_beyond_the_limit_wait_without_their_timeout_running(
    pool_cls: type[Pool],
) -> None:
    """Thousands of agents share one pool: requests over `max_connections` queue in the pool,
    never more than that many reach the server at once, and time spent queueing does not
    count against a request's own timeout."""
    in_flight = peak = 0

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, peak
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.3)
                in_flight -= 1
                writer.write(ok(b"<x/>"))
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/m"
    try:
        # 12 requests, 2 at a time, 0.3 s each: the last waits ~1.5 s, its timeout is 1 s.
        async with pool_cls(max_connections=2, timeout=1.0) as pool:
            answers = await asyncio.gather(*(pool.get(url) for _ in range(12)))
        assert [a.status_code for a in answers] == [200] * 12
        assert peak == 2
    finally:
        server.close()


# Hostile servers. Each answer below is refused with a RemoteProtocolError (a ReadTimeout, the
# sibling error, fails the test), most while the server holds the connection open and sends
# nothing more: the client decides from what it has, it does not wait for its timeout.

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"y" * 10,
        CHUNKED + b"7d0\r\n" + b"y" * 2000 + b"\r\n",
        CHUNKED + (b"a\r\n" + b"y" * 10 + b"\r\n") * 101,
        b"HTTP/1.1 200 OK\r\n\r\n" + b"y" * 2000,
    ],
    ids=["content-length", "one-chunk", "many-chunks", "until-close"],
)
async def test_a_body_over_the_cap_is_refused_without_waiting_for_the_rest(
    pool: Pool, answer: bytes
) -> None:
    async with RawServer(lambda t: answer, stall=True) as srv:
        with pytest.raises(http_errors.RemoteProtocolError, match="over 1000"):
            await pool.get(srv.url + "/big")


@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"1" + b"0" * 40 + b"\r\nhello\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["not-hex", "negative", "no-crlf-after-data", "absurd-size", "empty-size"],
)
async def test_malformed_chunk_sizes_are_protocol_errors(pool: Pool, chunks: bytes) -> None:
    async with RawServer(lambda t: CHUNKED + chunks, stall=True) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000,
        b"HTTP/1.1 200 OK" + b"x" * 70_000,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["endless-header", "endless-status-line", "long-header"],
)
async def test_oversized_heads_are_refused_without_waiting_for_their_end(
    pool: Pool, head: bytes
) -> None:
    async with RawServer(lambda t: head, stall=True) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


async def test_many_headers_over_the_head_limit_are_refused() -> None:
    """64 KiB of short headers that never end: h11's buffer cap (`MAX_HEAD`) refuses them."""
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%05d: v\r\n" % i for i in range(7000))
    async with RawServer(lambda t: head, stall=True) as srv, StreamPool(timeout=5.0) as pool:
        with pytest.raises(http_errors.RemoteProtocolError, match="over 65536 bytes"):
            await pool.get(srv.url + "/m")


async def test_content_length_with_transfer_encoding_is_refused(pool: Pool) -> None:
    """Both framings in one answer is how responses are split (RFC 9112 6.3): no body trusted."""
    both = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    async with RawServer(lambda t: both, stall=True) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"y" * 50,
        CHUNKED + b"a\r\nhel",
        CHUNKED + b"5\r\nhello\r\n",
        CHUNKED + b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\n",
    ],
    ids=["in-headers", "content-length", "in-chunk", "before-last-chunk", "in-trailers"],
)
async def test_a_server_closing_mid_answer_is_a_protocol_error(pool: Pool, answer: bytes) -> None:
    async with RawServer(lambda t: answer, close_after=1) as srv:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


async def test_the_daemons_pool_sends_no_header_or_path_that_breaks_the_request() -> None:
    """A CR/LF in a header or the path would end the request line early and smuggle another
    request or header: refused before anything is sent."""
    async with RawServer(lambda t: ok(b"x")) as srv, StreamPool() as pool:
        with pytest.raises(http_errors.LocalProtocolError):
            await pool.get(srv.url + "/m", headers={"X-Tag": "a\r\nAuthorization: Bearer x"})
        with pytest.raises(http_errors.LocalProtocolError):
            await pool.get(srv.url + "/m a HTTP/1.1\r\nX: y")
        assert srv.requests == []
        assert (await pool.get(srv.url + "/m")).content == b"x"


async def test_the_daemons_pool_skips_interim_answers_and_refuses_a_protocol_switch() -> None:
    early = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with RawServer(lambda t: early + ok(b"x")) as srv, StreamPool() as pool:
        r = await pool.get(srv.url + "/m")
        assert (r.status_code, r.content) == (200, b"x")
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with RawServer(lambda t: switch, stall=True) as srv, StreamPool() as pool:
        with pytest.raises(http_errors.RemoteProtocolError):
            await pool.get(srv.url + "/m")


async def test_the_daemons_pool_drops_a_connection_that_answered_twice() -> None:
    """A second answer sent with the first is nobody's: the connection is not reused, so it
    cannot pass for the answer to the next request."""
    async with RawServer(lambda t: ok(b"first") + ok(b"second")) as srv, StreamPool() as pool:
        assert (await pool.get(srv.url + "/a")).content == b"first"
        assert (await pool.get(srv.url + "/b")).content == b"first"
        assert srv.connections == 2
