"""Manifest downloads: one task per entitled manifest the agent does not hold, retried with
a jittered, doubling delay while it is still needed. The outcome (verified, refused, or a
failed round) goes back to the daemon, which records it as a state transition."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable

from addin_core.protocol import CatalogEntry
from addin_runtime.tasks import cancel_and_wait
from agent.fetcher import Fetcher, FetchResult

FETCH_RETRY_DELAY = (5.0, 60.0)
"""After a round of fetch attempts fails, wait this long (jittered, doubling) to retry."""

Cause = tuple[int, float | None]
"""(revision, committed_at) of the change that made a manifest needed."""


class Downloads:
    def __init__(
        self,
        fetcher: Fetcher,
        fetched: Callable[[CatalogEntry, FetchResult, Cause | None], Awaitable[None]],
        failed: Callable[[CatalogEntry, str], Awaitable[None]],
        needed: Callable[[str], bool],
    ) -> None:
        self.fetcher: Fetcher | None = fetcher
        self._fetched, self._failed, self._needed = fetched, failed, needed
        self.running: dict[str, asyncio.Task[None]] = {}
        """Downloads in progress (or waiting to retry), by manifest sha256."""

    def start(self, entries: Iterable[tuple[CatalogEntry, Cause | None]]) -> None:
        for entry, cause in entries:
            sha = entry.manifest_sha256
            if sha not in self.running:
                self.running[sha] = asyncio.create_task(self._loop(entry, cause))

    async def stop(self, timeout: float) -> None:
        """Cancel every download, waiting at most `timeout` seconds for each."""
        fetches = list(self.running.items())
        self.running.clear()
        await asyncio.gather(
            *(cancel_and_wait(t, timeout, f"download of {sha[:12]}") for sha, t in fetches)
        )
        fetcher, self.fetcher = self.fetcher, None
        if fetcher is not None:
            await fetcher.aclose()

    async def _loop(self, entry: CatalogEntry, cause: Cause | None) -> None:
        sha = entry.manifest_sha256
        delay = FETCH_RETRY_DELAY[0]
        try:
            while self.fetcher is not None:
                result = await self.fetcher.fetch(entry)
                if result.status != "failed":
                    await self._fetched(entry, result, cause)
                    return
                await self._failed(entry, result.reason or "failed")
                if not self._needed(sha):
                    return
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, FETCH_RETRY_DELAY[1])
        finally:
            self.running.pop(sha, None)
