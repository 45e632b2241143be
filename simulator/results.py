"""What a run is asked to do and what it found: the options, the per-step results and the run's
result that the reports (`simulator.report`) are written from."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulator.fleetstats import FleetStats
from simulator.metrics import StageSet, convergence_curve
from simulator.scenario import Scenario


class RunError(RuntimeError):
    """The run could not proceed (server refused an action, a worker failed, ...)."""


@dataclass
class RunOptions:
    clients: int = 1000
    workers: int = 0
    """Worker subprocesses; 0 runs one worker inside the coordinator's own event loop."""
    seed: int = 1
    broker_url: str | None = None
    server_url: str | None = None
    admin_token: str | None = None
    agent_token: str | None = None
    signing_key: str | None = None
    """With `server_url`: the server's state signing public key (base64), so every agent
    enforces signatures. A private server always gets a fresh key per run."""
    tls: bool = False
    """The private broker and server in TLS mode, every client an enrolled device with its
    own certificate and token (`addin-sim run --tls`)."""
    remote_workers: int = 0
    """Workers expected to join from elsewhere (`addin-sim worker --run ID ...`)."""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    workdir: Path | None = None
    baseline: bool = True
    cache: str | None = None
    """Override the scenario's agent cache: "memory", "file" or "none"."""
    agent_brokers: tuple[str, ...] = ()
    """Where the agents connect, spread by client id (`--agent-broker`, e.g. every node of a
    cluster); by default the run's broker. The control channel and the server use that."""
    agent_mqtt_version: str = "auto"
    """The agents' `mqtt_version` (auto, 5 or 3.1.1)."""
    agent_anti_entropy: float | None = None
    """The agents' `anti_entropy_interval` (None: the agent's default)."""
    tenant: str = "contoso"
    """The tenant of the run (an external server's, with `server_url`)."""
    netns: int = 0
    """Local workers spread over this many network namespaces (root only), reaching the
    broker and server over veth pairs (`simulator/netns.py`)."""
    progress: Callable[[str, int, int], None] | None = None
    """progress(task, done, total): live progress for the terminal."""
    on_environment: Callable[[str, str], None] | None = None
    """on_environment(broker_url, server_url) once both are up: where workers join."""
    before_steps: Callable[[], Awaitable[None]] | None = None
    """Awaited once the fleet is up, before the scenario's first step (`--console`: time
    to open the console)."""
    after_steps: Callable[[], Awaitable[None]] | None = None
    """Awaited after the last step, before the fleet and the environment stop (`--console`:
    until Ctrl-C)."""
    join_timeout: float | None = None
    """Seconds to wait for every worker to join (default 60, 600 with remote workers)."""
    checkpoint_settle: float = 3.0
    """Seconds to let the fleet settle after a checkpoint before the scenario goes on.
    A checkpoint launches every host of every client at once — a burst no real fleet
    produces — and the reports and work it leaves behind slowed the next step's fan-out
    (10,000 clients: Everyone-step notified p99 3.1-3.3 s right after, 2.1-2.8 s after 3 s)."""


@dataclass
class StepResult:
    name: str
    revisions: list[int] = field(default_factory=list)
    started_at: float = 0.0
    duration_s: float = 0.0
    offsets: list[float] = field(default_factory=list)
    unconverged: int = 0
    online: int = 0
    stages: StageSet = field(default_factory=StageSet)
    notes: list[str] = field(default_factory=list)
    storm: dict[str, Any] | None = None
    """When the step started clients: {"clients", "connected", "seconds"}: how many were
    started, how many connected, and how long after the step's start the last one did."""


@dataclass
class RunResult:
    scenario: Scenario
    options: RunOptions
    steps: list[StepResult]
    mismatches: list[dict[str, Any]]
    stages: StageSet
    baseline: dict[str, Any]
    processes: list[dict[str, Any]]
    started_at: float
    duration_s: float
    workers: int
    server_disagreements: list[str]
    fleet: FleetStats = field(default_factory=FleetStats)
    """The workers' counters merged: timeline, manifest requests, connection events."""
    admin_retries: int = 0
    """Admin API calls sent again because the server was unreachable (a restart)."""
    state_signed: bool = False
    """The server signed every state payload and every agent verified it."""


def curve_of(step: StepResult) -> list[tuple[float, float]]:
    return convergence_curve(step.offsets, max(1, step.online))
