"""What a worker counts besides the stage latencies, for the report's load-test sections:
deliveries and latency over time, the manifest endpoint as the agents saw it (requests,
answers, latency), and errors and retries (failed requests and fetch rounds, lost connections,
reconnects, stale and invalid messages).

Everything here adds up across workers: counters are summed, histograms and timelines merged.
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from agent.http_errors import HttpError
from agent.http_pool import HttpPool, HttpResponse
from simulator.metrics import LatencyHistogram, Timeline

MANIFEST_SERIES = "manifest_get"
"""The timeline series of answered manifest requests (the stages use their own names)."""

MANIFEST_FAILED_SERIES = "manifest_get_failed"
"""The timeline series of manifest requests that failed: no answer, or not 200."""

AGENT_EVENTS = ("connected", "disconnected", "fetch_failed", "subscription_refused")
"""Agent events counted (not timed): see `agent.daemon.AgentEvent`."""

MESSAGE_STATS = ("accepted", "stale", "invalid", "signature_refused")
"""The agents' own message counters (`Agent.stats`)."""


class FleetStats:
    """One worker's counters (or, merged, the whole fleet's)."""

    def __init__(self) -> None:
        self.timeline = Timeline()
        self.requests = LatencyHistogram()
        """Latency of the answered requests (whatever the status)."""
        self.answers: Counter[str] = Counter()
        """Manifest requests by outcome: "200", "503", ..., or the transport error's name."""
        self.events: Counter[str] = Counter()
        self.reconnects = 0
        self.messages: Counter[str] = Counter()

    def request(self, at: float, seconds: float, outcome: str) -> None:
        """One manifest request answered (`outcome` is the HTTP status) or failed (the
        transport error's name) at Unix time `at`, after `seconds`. A failure without an
        answer counts, but its time is not the endpoint's latency."""
        self.answers[outcome] += 1
        if outcome.isdigit():
            self.requests.record(seconds)
            self.timeline.record(MANIFEST_SERIES, at, seconds)
        if outcome != "200":
            self.timeline.record(MANIFEST_FAILED_SERIES, at, seconds)

    def add_messages(self, stats: Mapping[str, int]) -> None:
        """Fold in one agent's message counters (when it is replaced, and at the end)."""
        for k in MESSAGE_STATS:
            if stats.get(k):
                self.messages[k] += int(stats[k])

    def merge(self, other: FleetStats) -> None:
        self.timeline.merge(other.timeline)
        self.requests.merge(other.requests)
        self.answers.update(other.answers)
        self.events.update(other.events)
        self.reconnects += other.reconnects
        self.messages.update(other.messages)

    def encode(self) -> dict[str, Any]:
        return {
            "timeline": self.timeline.encode(),
            "requests": self.requests.encode(),
            "answers": dict(self.answers),
            "events": dict(self.events),
            "reconnects": self.reconnects,
            "messages": dict(self.messages),
        }

    @classmethod
    def decode(cls, data: Mapping[str, Any]) -> FleetStats:
        out = cls()
        out.timeline = Timeline.decode(data.get("timeline", {}))
        if data.get("requests"):
            out.requests = LatencyHistogram.decode(data["requests"])
        out.answers.update({str(k): int(v) for k, v in data.get("answers", {}).items()})
        out.events.update({str(k): int(v) for k, v in data.get("events", {}).items()})
        out.reconnects = int(data.get("reconnects", 0))
        out.messages.update({str(k): int(v) for k, v in data.get("messages", {}).items()})
        return out

    @property
    def failed_requests(self) -> int:
        return sum(n for outcome, n in self.answers.items() if outcome != "200")

    @property
    def all_requests(self) -> int:
        return sum(self.answers.values())


class MeteredHttpPool(HttpPool):
    """The worker's shared manifest client, timing every request into a `FleetStats`.

    The time runs from the moment the request has a connection slot until its answer is read:
    the endpoint's latency as a client sees it, without the wait for a free connection (that
    wait is part of the "cached" stage instead)."""

    def __init__(self, stats: FleetStats, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stats = stats

    async def _get(
        self, url: str, headers: dict[str, str] | None, tls: ssl.SSLContext | None
    ) -> HttpResponse:
        t0 = time.perf_counter()
        try:
            resp = await super()._get(url, headers, tls)
        except HttpError as e:
            self.stats.request(time.time(), time.perf_counter() - t0, type(e).__name__)
            raise
        self.stats.request(time.time(), time.perf_counter() - t0, str(resp.status_code))
        return resp
