"""CPU per manifest download: httpx vs the agent's HttpPool (aiohttp) vs StreamPool (h11 on
asyncio streams, the daemon's), against one loopback server.

    .venv/bin/python bench/bench_http_clients.py [--requests 2000] [--concurrency 32]

The server runs in another process, so the CPU figures are the client's alone. This is why
agent/http_pool.py exists: in a simulator worker thousands of agents share one client. A
workstation's daemon uses agent/http_lite.py: h11 alone to keep in memory (~0.2 MB), a few
manifests at a time. (`--concurrency 4` is the daemon's default `fetch_concurrency`.)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable

import httpx

from agent.http_lite import StreamPool
from agent.http_pool import HttpPool
from simulator.mosquitto import free_port

BODY_BYTES = 5000

SERVER = """
import asyncio, sys
from aiohttp import web
body = b"x" * {size}
async def manifest(request): return web.Response(body=body, content_type="application/xml")
app = web.Application(); app.router.add_get("/v1/manifests/{{sha}}", manifest)
web.run_app(app, host="127.0.0.1", port={port}, print=None)
"""


async def measure(
    name: str, get: Callable[[str], Awaitable[bytes]], base: str, n: int, concurrency: int
) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            assert len(await get(f"{base}/v1/manifests/{i:064x}")) == BODY_BYTES

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"{name:10} {n} GETs: client CPU {cpu:.2f} s ({cpu / n * 1000:.3f} ms each), wall {wall:.2f} s"
    )


async def main(n: int, concurrency: int) -> None:
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER.format(size=BODY_BYTES, port=port)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with asyncio.timeout(15):
            while True:
                try:
                    async with httpx.AsyncClient() as c:
                        await c.get(base + "/")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        async with httpx.AsyncClient() as client:

            async def via_httpx(url: str) -> bytes:
                return (await client.get(url)).content

            await measure("httpx", via_httpx, base, n, concurrency)
        async with HttpPool() as pool:

            async def via_pool(url: str) -> bytes:
                return (await pool.get(url)).content

            await measure("HttpPool", via_pool, base, n, concurrency)
        async with StreamPool(max_connections=concurrency) as lite:

            async def via_lite(url: str) -> bytes:
                return (await lite.get(url)).content

            await measure("StreamPool", via_lite, base, n, concurrency)
    finally:
        server.kill()
        await server.wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    asyncio.run(main(args.requests, args.concurrency))
