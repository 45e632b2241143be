"""Giving freed memory back after a burst (agent/memory.py) and when the daemon asks for it."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest
from agent_helpers import offline_agent

from agent import memory


async def test_requests_coalesce_into_one_release_and_the_next_waits_its_interval() -> None:
    calls: list[int] = []
    r = memory.MemoryReleaser(lambda: calls.append(1), settle=0.0, min_interval=3600.0)
    for _ in range(3):
        r.request()
    await asyncio.sleep(0)  # call_later(0): runs at the loop's next turn
    await asyncio.sleep(0)
    assert calls == [1]
    r.request()  # within the interval: scheduled, not run
    r.request()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls == [1]
    assert r._timer is not None and r._timer.when() - asyncio.get_running_loop().time() > 3000
    r.cancel()
    assert r._timer is None


def test_release_runs_here() -> None:
    """A full collection plus malloc_trim on glibc; on this platform it must not fail."""
    trim = memory._glibc_trim()
    if sys.platform == "linux":
        import os

        assert (trim is not None) == bool(os.confstr("CS_GNU_LIBC_VERSION"))
    memory.release_freed_memory()
    try:
        memory.freeze_started()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_the_agent_says_settled_after_a_report_without_downloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent import daemon

    agent = offline_agent()
    settled: list[int] = []

    async def publish() -> bool:
        return True

    monkeypatch.setattr(agent, "publish_report", publish)
    monkeypatch.setattr(daemon, "REPORT_DELAY", 0.0)
    agent._schedule_report()
    assert agent._report_task is not None
    await agent._report_task
    assert settled == []  # nobody listening: nothing called, nothing failed
    agent.settled = lambda: settled.append(1)
    agent._schedule_report()
    await agent._report_task
    assert settled == [1]

    class Busy:  # a download still running: the work has not settled
        running: dict[str, Any] = {"ab" * 32: object()}

    monkeypatch.setattr(agent, "downloads", Busy())
    agent._schedule_report()
    await agent._report_task
    assert settled == [1]
