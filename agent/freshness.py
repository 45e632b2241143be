"""How fresh a cache's state is: is the daemon running and connected, when did this cache
last hear from the broker and from the server (anti-entropy). `status` and `why` read it
from the ``sync`` keys the daemon writes; a verdict on stale data says "as of <time>".

The threshold (docs/agent.md, "How fresh is the answer"): the state is **live** while the
daemon runs and is connected to the broker (every change reaches it as it is made). It is
**stale** when the daemon is not running (nothing keeps the cache current, however recent
its last contact), or when the daemon runs but has heard neither from the broker nor, through
a matching anti-entropy check, from the server for more than `STALE_AFTER` seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

STALE_AFTER = 600.0
"""Seconds without broker contact nor a matching anti-entropy check after which a running
daemon's state counts as stale: the default anti-entropy interval, so a daemon cut off from
the broker but checking against the server stays fresh."""

IN_SYNC = ("ok", "resynced")
"""Anti-entropy results after which the cache held what the server computes."""


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, ValueError, TypeError):
        return False


def daemon_state(sync: dict[str, Any], cache_path: str | None = None) -> tuple[bool, int | None]:
    """(is a daemon running on this cache, its pid)."""
    from addin_runtime.instance_lock import SUPPORTED, held_by

    if cache_path and SUPPORTED:
        # The daemon holds the cache's lock for as long as it runs: exact, unlike a pid
        # that may have been reused since.
        holder = held_by(cache_path)
        return holder is not None, holder.pid if holder else None
    running = _pid_alive(sync.get("pid")) and sync.get("connected") is not None
    return running, sync.get("pid") if running else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and v else None


@dataclass(frozen=True, slots=True)
class Freshness:
    daemon_running: bool
    connected: bool
    """Connected to the broker right now (only while the daemon runs)."""
    broker_at: float | None
    """When this cache last heard from the broker (now while connected; None: never)."""
    server_at: float | None
    """The last anti-entropy check that found the cache in sync with the server (None: never)."""
    as_of: float | None
    """The state is known current up to this time (the later of the two)."""
    stale: bool

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "stale_after": STALE_AFTER}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Freshness:
        return cls(*(d[k] for k in cls.__dataclass_fields__))

    @property
    def why_stale(self) -> str:
        if not self.daemon_running:
            return "the agent is not running"
        return "the agent is not connected to the broker"


def freshness(sync: dict[str, Any], running: bool, now: float | None = None) -> Freshness:
    """The freshness of the state whose ``sync`` keys are `sync`, with the daemon `running`."""
    now = time.time() if now is None else now
    connected = running and bool(sync.get("connected"))
    heard = [
        t
        for t in (
            _num(sync.get("last_message_at")),
            _num(sync.get("connected_at")),
            _num(sync.get("disconnected_at")),
        )
        if t is not None
    ]
    broker_at = now if connected else max(heard, default=None)
    server_at = _num(sync.get("anti_entropy_ok_at"))
    last = sync.get("anti_entropy")
    if isinstance(last, dict) and last.get("result") in IN_SYNC:
        at = _num(last.get("at"))
        server_at = max(server_at or 0.0, at or 0.0) or None
    known = [t for t in (broker_at, server_at) if t is not None]
    as_of = max(known, default=None)
    stale = not connected and (not running or as_of is None or now - as_of > STALE_AFTER)
    return Freshness(running, connected, broker_at, server_at, as_of, stale)


def clock(t: float | None) -> str:
    """A time for a sentence: ``14:05`` today, ``2026-11-28 14:05`` another day."""
    if not t:
        return "an unknown time"
    lt = time.localtime(t)
    if time.strftime("%Y-%m-%d", lt) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M", lt)
    return time.strftime("%Y-%m-%d %H:%M", lt)


def describe(f: Freshness) -> str:
    """One line for people: how current the answer is."""
    server = (
        f"the server last confirmed it at {clock(f.server_at)}"
        if f.server_at
        else ("no check against the server yet")
    )
    if f.connected:
        return f"live: the agent is running and connected to the broker; {server}"
    broker = (
        f"last heard from the broker at {clock(f.broker_at)}"
        if f.broker_at
        else "never heard from the broker"
    )
    head = "STALE" if f.stale else "recent"
    return f"{head}: {f.why_stale}; {broker}; {server}"
