"""The server's Prometheus metrics (``GET /metrics``), with the official `prometheus_client`.

Three kinds of source, each read where it is cheapest:

- counted as it happens, in this process: HTTP requests and their latency (`HttpMetrics`,
  an ASGI middleware outside every other one, so the manifest fast path is timed too),
  manifest downloads, anti-entropy requests, agent reports received (`count_reports`);
- read from the publisher at scrape time: messages published, connections, broker
  connection state;
- read from the database at scrape time (`refresh`): the outbox's depth and age, the
  revisions, admin writes by operation (the audit log, so writes by CLI commands in other
  processes count too), and the devices by add-in, version and state (the agents' reports).

A registry per app, not the library's global one: two servers in one test process must not
share counters.
"""

from __future__ import annotations

import json
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from addin_core.protocol import AgentReport
from server_stub.db import Database

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

UNKNOWN_ADDIN = "(unknown)"
"""The `addin` label of devices reporting an add-in the catalog does not hold."""
OTHER_VERSION = "(other)"
"""The `version` label of devices reporting a version of a catalog add-in it never held."""
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""The methods a request's `method` label names; any other is "other"."""

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; the manifest fast path answers in well under a millisecond, an ORG load in seconds."""


class PublisherState(Protocol):
    """What the metrics read from the publisher (`server_stub.publisher.Publisher`)."""

    published: int
    connections: int
    republished_all: int

    def is_connected(self) -> bool: ...


@dataclass
class _DbSnapshot:
    """The database's side of the metrics, read at the last scrape."""

    revision: int = 0
    published_revision: int = 0
    outbox_depth: int = 0
    outbox_lag: float = 0.0
    writes: dict[str, int] = field(default_factory=dict)
    devices: dict[tuple[str, str, str], int] = field(default_factory=dict)
    reporting: dict[str, int] = field(default_factory=dict)


async def read_snapshot(database: Database, now: float) -> _DbSnapshot:
    s = _DbSnapshot()
    async with database.snapshot():
        s.revision = await database.revision()
        s.published_revision = await database.published_revision()
        backlog = await database.outbox_backlog()
        s.outbox_depth = int(backlog["waiting"])
        oldest = backlog["oldest_created_at"]
        s.outbox_lag = max(0.0, now - float(oldest)) if oldest is not None else 0.0
        rows = await database.rows("SELECT operation, count(*) FROM audit GROUP BY operation")
        s.writes = {str(r[0]): int(r[1]) for r in rows}
        reports = await database.rows("SELECT revision, applied, errors FROM reports")
        catalog = await database.rows("SELECT addin_id, version FROM addin_versions")
    # Label values only from the catalog, which admins fill: the add-ins and versions come
    # from agents' reports, and a device naming thousands of made-up ones must not make as
    # many series (every scrape would carry them, and Prometheus would keep them).
    known = {(str(r[0]), str(r[1])) for r in catalog}
    known_addins = {a for a, _ in known}
    devices: Tally[tuple[str, str, str]] = Tally()
    reporting: Tally[str] = Tally()
    for revision, applied, errors in reports:
        # One device may apply an add-in to several hosts: it counts once per label set.
        labels: set[tuple[str, str]] = set()
        for a in json.loads(applied):
            addin, version = str(a["addin_id"]), str(a["version"])
            if addin not in known_addins:
                addin, version = UNKNOWN_ADDIN, OTHER_VERSION
            elif (addin, version) not in known:
                version = OTHER_VERSION
            labels.add((addin, version))
        for addin, version in labels:
            devices[(addin, version, "installed")] += 1
        if json.loads(errors):
            reporting["errors"] += 1
        reporting["current" if int(revision) >= s.published_revision else "behind"] += 1
    s.devices, s.reporting = dict(devices), dict(reporting)
    return s


class _StateCollector(Collector):
    """Gauges and counters read from the database snapshot and the publisher."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        s = self.m.snapshot
        yield _gauge("addin_revision", "The tenant revision: the last committed change.", s.revision)
        yield _gauge(
            "addin_published_revision",
            "The revision of the last message the broker acknowledged.",
            s.published_revision,
        )
        yield _gauge(
            "addin_outbox_depth", "Messages committed and not yet published.", s.outbox_depth
        )
        yield _gauge(
            "addin_outbox_lag_seconds",
            "Age of the oldest message waiting in the outbox (0 when empty): the publish lag.",
            s.outbox_lag,
        )
        writes = CounterMetricFamily(
            "addin_admin_writes",
            "Admin changes committed (one per revision), by operation, from the audit log.",
            labels=["operation"],
        )
        for op, n in sorted(s.writes.items()):
            writes.add_metric([op], n)
        yield writes
        devices = GaugeMetricFamily(
            "addin_devices",
            "Devices whose last report shows the add-in at that version, by state.",
            labels=["addin", "version", "state"],
        )
        for (addin, version, state), n in sorted(s.devices.items()):
            devices.add_metric([addin, version, state], n)
        yield devices
        reporting = GaugeMetricFamily(
            "addin_devices_reporting",
            "Devices that reported: at the published revision (current) or not (behind), "
            "and those whose last report carried errors.",
            labels=["state"],
        )
        for state in ("current", "behind", "errors"):
            reporting.add_metric([state], s.reporting.get(state, 0))
        yield reporting
        p = self.m.publisher
        if p is not None:
            yield _gauge(
                "addin_broker_connected",
                "1 while the publisher holds a session with the broker.",
                1 if p.is_connected() else 0,
            )
            yield _counter("addin_published_messages", "Messages published (PUBACKed).", p.published)
            yield _counter(
                "addin_broker_connections", "Sessions the publisher opened.", p.connections
            )
            yield _counter(
                "addin_broker_republished_all",
                "Times the broker had lost our session and got all retained state again.",
                p.republished_all,
            )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    """The registry of one server and its instruments."""

    def __init__(self, database: Database, publisher: PublisherState | None = None) -> None:
        self.database = database
        self.publisher = publisher
        self.snapshot = _DbSnapshot()
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_latency = Histogram(
            "addin_http_request_duration_seconds",
            "HTTP requests by method, route and status, and how long they took.",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.manifest_downloads = Counter(
            "addin_manifest_downloads",
            "Manifest requests answered, by status (200 sent, 304 not modified, 404...).",
            ["status"],
            registry=self.registry,
        )
        self.antientropy = Counter(
            "addin_antientropy_requests",
            "Anti-entropy requests from agents: digest comparisons and state fetches.",
            ["kind"],
            registry=self.registry,
        )
        self.reports = Counter(
            "addin_agent_reports_received",
            "Agent reports received from the broker (stored or refused).",
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))

    def count_reports(
        self, sink: Callable[[list[AgentReport]], Awaitable[None]]
    ) -> Callable[[list[AgentReport]], Awaitable[None]]:
        """The report sink, counting each batch it is given."""

        async def counted(batch: list[AgentReport]) -> None:
            self.reports.inc(len(batch))
            await sink(batch)

        return counted

    async def render(self) -> bytes:
        """The text exposition, after reading the database's side afresh."""
        self.snapshot = await read_snapshot(self.database, time.time())
        return generate_latest(self.registry)

    def observe(self, method: str, path: str, route: str, status: int, seconds: float) -> None:
        # The method is the client's to choose (any token): a known one or "other", so
        # requests with made-up methods cannot make a series each.
        known = method if method in HTTP_METHODS else "other"
        self.http_latency.labels(known, route, str(status)).observe(seconds)
        if path.startswith("/v1/manifests/"):
            self.manifest_downloads.labels(str(status)).inc()
        elif path.startswith("/v1/agents/") and status == 200:
            self.antientropy.labels(path.rsplit("/", 1)[-1]).inc()


def _route_of(scope: Scope) -> str:
    """The route's template (``/v1/addins/{addin_id}``), never the raw path: one label
    value per route, not one per add-in or user."""
    route: Any = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        return template
    if str(scope.get("path", "")).startswith("/v1/manifests/"):
        return "/v1/manifests/{sha256}"  # answered by the fast path, before routing
    return "unmatched"


class HttpMetrics:
    """ASGI middleware timing every HTTP request, from its arrival to its last byte."""

    def __init__(self, app: ASGIApp, *, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.observe(
                scope["method"],
                scope["path"],
                _route_of(scope),
                status,
                time.perf_counter() - started,
            )
