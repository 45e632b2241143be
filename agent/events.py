"""What an agent tells its observer (the simulator measures latency and counts with it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from addin_core.topics import Host

EventKind = Literal[
    "notified",
    "manifest_cached",
    "applied",
    "connected",
    "disconnected",
    "fetch_failed",
    "subscription_refused",
]


@dataclass(frozen=True, slots=True)
class AgentEvent:
    """Reported synchronously to the `observer` (the simulator measures latency with it)."""

    kind: EventKind
    revision: int
    committed_at: float | None
    addin_id: str | None
    host: Host | None
    at: float
