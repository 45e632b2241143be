"""Manifests by sha256 over HTTP, then verification.

Downloads go through `agent.http_lite.StreamPool` (h11 on asyncio streams, with a body-size cap), one
per agent by default: the daemon's. A process running many agents passes one shared pool,
usually `agent.http_pool.HttpPool` (aiohttp: less CPU per download; the simulator runs
thousands of agents in one process and wants one connection pool). An `httpx.AsyncClient` is accepted too (httpx is
never imported here: only its user does). Concurrency per agent is bounded by a semaphore;
transient failures (connection errors, 5xx, 408/429) are retried with exponential backoff
and full jitter. A manifest is accepted only if its sha256 matches the one it was asked
for, the manifest reader accepts it, and its Id and Version equal the catalog entry's.
Anything else is a refusal, with the reason, and is never installed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import ssl
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, TypeAlias

from addin_core.protocol import CatalogEntry, Host
from agent.http_errors import transport_errors
from agent.http_lite import StreamPool
from agent.http_pool import HttpPool, HttpResponse

if TYPE_CHECKING:
    import httpx

    from addin_core.manifest import Manifest

log = logging.getLogger("addin_agent.fetcher")

SHARED_CLIENT_CONCURRENCY = 32
"""Requests in flight at once through one shared `httpx.AsyncClient`, whatever the number of
agents using it. httpcore's pool scans its whole wait queue on every request, so letting
thousands of agents queue there costs quadratic CPU and starves the event loop (measured:
300 agents x 10 manifests stalled the loop for 20 s); queueing on a semaphore is O(1)."""

HttpClient: TypeAlias = "HttpPool | StreamPool | httpx.AsyncClient"
HttpResponseLike: TypeAlias = "HttpResponse | httpx.Response"
"""What a Fetcher downloads with: both have ``await get(url, headers=...)`` returning an object
with ``status_code`` and ``content``, and raise one of `transport_errors()` on failure."""


def _is_httpx_client(http: object) -> bool:
    httpx = sys.modules.get("httpx")  # an httpx client exists only once httpx is imported
    return httpx is not None and isinstance(http, httpx.AsyncClient)


_shared_limits: weakref.WeakKeyDictionary[HttpClient, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def _shared_limit(http: HttpClient) -> asyncio.Semaphore:
    sem = _shared_limits.get(http)
    if sem is None:
        sem = _shared_limits[http] = asyncio.Semaphore(SHARED_CLIENT_CONCURRENCY)
    return sem


@dataclass(frozen=True, slots=True)
class FetchResult:
    """`verified` / `refused` are final for that sha256; `failed` means try again later."""

    status: Literal["verified", "refused", "failed"]
    sha256: str
    addin_id: str
    version: str
    reason: str | None = None
    xml: bytes | None = None
    permissions: str | None = None
    hosts: tuple[Host, ...] = ()
    attempts: int = 0
    fetched_at: float = 0.0


def verify(entry: CatalogEntry, body: bytes, memo: bool = True) -> FetchResult:
    """Check downloaded bytes against the catalog entry. Pure (no I/O). `memo`: remember the
    reader's verdict by sha256 for the other agents of this process (`_read_by_digest`)."""

    def refuse(reason: str) -> FetchResult:
        return FetchResult(
            "refused",
            entry.manifest_sha256,
            entry.addin_id,
            entry.version,
            reason=reason,
            fetched_at=time.time(),
        )

    # The manifest reader (lxml, ~6.5 MB of RSS) loads at the first download: an agent
    # restarted on a warm cache, with nothing new, never needs it.
    from addin_core.manifest import MAX_MANIFEST_BYTES

    if len(body) > MAX_MANIFEST_BYTES:
        return refuse(f"manifest is {len(body)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    digest = hashlib.sha256(body).hexdigest()
    if digest != entry.manifest_sha256:
        return refuse(f"content hash {digest[:12]}… does not match {entry.manifest_sha256[:12]}…")
    manifest = _read_by_digest(digest, body) if memo else _read(body)
    if isinstance(manifest, str):
        return refuse(f"the manifest reader rejected it: {manifest}")
    if str(manifest.id).lower() != entry.addin_id.lower():
        return refuse(f"manifest Id {manifest.id} is not the catalog's {entry.addin_id}")
    if manifest.version != entry.version:
        return refuse(f"manifest Version {manifest.version} is not the catalog's {entry.version}")
    perms = getattr(manifest.permissions, "value", manifest.permissions)
    return FetchResult(
        "verified",
        entry.manifest_sha256,
        entry.addin_id,
        entry.version,
        xml=body,
        permissions=str(perms) if perms is not None else None,
        hosts=tuple(Host(h) for h in manifest.hosts),
        fetched_at=time.time(),
    )


READ_MEMO_SIZE = 64

_read_memo: OrderedDict[str, Manifest | str] = OrderedDict()


def _read_by_digest(digest: str, body: bytes) -> Manifest | str:
    """The reader's verdict on `body` (its `Manifest`, or why it was rejected), once per
    sha256 per process. Every download is still hashed; bytes with the same hash are the same
    bytes, and reading them is a pure function. One agent gains nothing; a process running
    thousands (the simulator) reads each manifest once instead of thousands of times."""
    hit = _read_memo.get(digest)
    if hit is not None:
        _read_memo.move_to_end(digest)
        return hit
    verdict = _read(body)
    _read_memo[digest] = verdict
    if len(_read_memo) > READ_MEMO_SIZE:
        _read_memo.popitem(last=False)
    return verdict


def _read(body: bytes) -> Manifest | str:
    from addin_core.manifest import ManifestError, parse_manifest

    try:
        return parse_manifest(body)
    except ManifestError as e:
        return str(e)


class Fetcher:
    def __init__(
        self,
        server_url: str,
        token: str | None,
        http: HttpClient | None = None,
        concurrency: int = 4,
        attempts: int = 5,
        base_delay: float = 0.2,
        max_delay: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        mirrors: Sequence[str] = (),
        mirror_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`ssl_context` (agent/tls.py) verifies an https server; a shared `http` client
        brings its own. `mirrors` are base URLs of folders written by `addin-server manifests
        export` (each manifest at ``<base>/<sha256>``), tried in order before the server;
        `mirror_tls` verifies the https ones."""
        self.server_url = server_url.rstrip("/")
        self.mirrors = tuple(m.rstrip("/") for m in mirrors)
        self.mirror_tls = mirror_tls
        self.token = token
        self._own = http is None
        # A pool of its own means one agent in this process (the daemon): no other agent
        # would ever read a remembered verdict, so none is kept (a parsed manifest each).
        self._memo = not self._own
        self.http: HttpClient = http or StreamPool(
            max_connections=concurrency,
            timeout=10.0,
            connect_timeout=5.0,
            ssl_context=ssl_context,
        )
        self._sem = asyncio.Semaphore(concurrency)
        # An HttpPool bounds its own connections (O(1) wait); httpx's pool does not scale.
        self._shared = _shared_limit(http) if http is not None and _is_httpx_client(http) else None
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))

    def _sources(self, entry: CatalogEntry) -> list[tuple[str, dict[str, str], bool]]:
        """(url, headers, from a mirror) in the order tried: the mirrors, then the server.

        A mirror never receives the device's token: it is a static folder any web server or
        CDN serves, and the hash, not the mirror, vouches for what it sends."""
        auth = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        mirrored: list[tuple[str, dict[str, str], bool]] = [
            (f"{m}/{entry.manifest_sha256}", {}, True) for m in self.mirrors
        ]
        return [*mirrored, (self.server_url + entry.manifest_url, auth, False)]

    async def _get(self, url: str, headers: dict[str, str], mirror: bool) -> HttpResponseLike:
        async with self._sem:
            if self._shared is not None:
                async with self._shared:
                    return await self.http.get(url, headers=headers)
            if mirror and isinstance(self.http, HttpPool | StreamPool) and url.startswith("https:"):
                return await self.http.get(url, headers=headers, tls=self.mirror_tls)
            return await self.http.get(url, headers=headers)

    async def fetch(self, entry: CatalogEntry) -> FetchResult:
        """The manifest from the first source that has it, verified; each attempt tries every
        mirror, then the server. A mirror whose bytes do not hash to the entry's sha256 is
        skipped (stale or tampered), never believed: only the server's bytes can make a
        final refusal."""
        failures: list[str] = ["not attempted"]
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff(attempt))
            failures = []
            for url, headers, mirror in self._sources(entry):
                where = f"mirror {url}" if mirror else url
                try:
                    resp = await self._get(url, headers, mirror)
                except transport_errors() as e:
                    failures.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
                    log.info("manifest %s from %s failed: %s", entry.addin_id, where, failures[-1])
                    continue
                if resp.status_code != 200:
                    hint = " (check server_token)" if resp.status_code in (401, 403) else ""
                    failures.append(f"HTTP {resp.status_code} from {where}{hint}")
                    log.info("manifest %s: %s", entry.addin_id, failures[-1])
                    continue
                if mirror and hashlib.sha256(resp.content).hexdigest() != entry.manifest_sha256:
                    failures.append(f"{where} sent bytes that do not hash to the entry's sha256")
                    log.warning("manifest %s: %s; skipped", entry.addin_id, failures[-1])
                    continue
                return _with_attempts(verify(entry, resp.content, self._memo), attempt + 1)
        return FetchResult(
            "failed",
            entry.manifest_sha256,
            entry.addin_id,
            entry.version,
            reason="; ".join(failures),
            attempts=self.attempts,
            fetched_at=time.time(),
        )


def _with_attempts(r: FetchResult, n: int) -> FetchResult:
    return replace(r, attempts=n)
