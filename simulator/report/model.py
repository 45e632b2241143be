"""report.json: the run's figures as one JSON document (documented in docs/simulator.md), from
which the terminal summary and the HTML page are both drawn."""

from __future__ import annotations

import json
import os
import platform
import re
from typing import Any

from simulator.fleetstats import MANIFEST_FAILED_SERIES, MANIFEST_SERIES
from simulator.metrics import STAGES, convergence_curve
from simulator.results import RunResult, StepResult, curve_of

MAX_LISTED_MISMATCHES = 1000

TIMELINE_BUCKETS = 150
"""About this many buckets across the run in the over-time charts."""

_NICE_WIDTHS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _ratio(a: Any, b: Any) -> float | None:
    if not a or not b:
        return None
    return round(float(a) / float(b), 3)


def bucket_width(duration_s: float) -> float:
    """The over-time charts' bucket: the smallest round width giving at most
    `TIMELINE_BUCKETS` buckets over the run."""
    for w in _NICE_WIDTHS:
        if duration_s / w <= TIMELINE_BUCKETS:
            return w
    return _NICE_WIDTHS[-1]


def build_report(r: RunResult) -> dict[str, Any]:
    stages = r.stages.summary()
    return {
        "clients": r.options.clients,
        "scenario": r.scenario.name,
        "description": r.scenario.description.strip(),
        "seed": r.options.seed,
        "workers": r.workers,
        "agent_cache": r.options.cache or r.scenario.cache,
        "state_signed": r.state_signed,
        "tls": r.options.tls,
        "connect_storms": [{"step": s.name, **s.storm} for s in r.steps if s.storm],
        "mismatches": len(r.mismatches),
        "mismatch_list": r.mismatches[:MAX_LISTED_MISMATCHES],
        "server_disagreements": r.server_disagreements,
        "stages": stages,
        "cdf": _cdf(r),
        "baseline": _baseline(r, stages),
        "throughput": _throughput(r, stages),
        "manifest_requests": _manifest_requests(r),
        "errors": _errors(r),
        "timeline": _timeline(r),
        "processes": r.processes,
        "rss_per_client_kb": round(
            sum(p["rss_max_kb"] for p in r.processes if "worker" in p["role"])
            / max(1, r.options.clients),
            1,
        ),
        "steps": [_step(s, r.started_at) for s in r.steps],
        "started_at": r.started_at,
        "duration_s": round(r.duration_s, 3),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }


def _step(s: StepResult, run_started_at: float) -> dict[str, Any]:
    # A client whose convergence time is after the step started accepted a message of the
    # step (or started during it); the others already matched the oracle.
    reached = [o for o in s.offsets if o > 0]
    return {
        "name": s.name,
        "revisions": s.revisions,
        "started_s": round(s.started_at - run_started_at, 3),
        "duration_s": round(s.duration_s, 3),
        "online_clients": s.online,
        "converged": len(s.offsets),
        "unconverged": s.unconverged,
        "reached": len(reached) + s.unconverged,
        "converged_p99_s": round(sorted(s.offsets)[int(0.99 * (len(s.offsets) - 1))], 3)
        if s.offsets
        else None,
        "notes": s.notes,
        "storm": s.storm,
        "stages": s.stages.summary(),
        "convergence": [[t, round(f, 4)] for t, f in curve_of(s)],
        "reached_convergence": [
            [t, round(f, 4)] for t, f in convergence_curve(reached, len(reached) + s.unconverged)
        ],
    }


def _cdf(r: RunResult) -> dict[str, Any]:
    return {
        **{
            s: [[round(ms, 3), share] for ms, share in h.cdf()]
            for s, h in r.stages.stages.items()
            if h.count
        },
        "baseline": [[round(ms, 3), share] for ms, share in r.baseline.get("cdf", [])],
    }


def _baseline(r: RunResult, stages: dict[str, Any]) -> dict[str, Any]:
    """The floor (paho callbacks), which the ratio uses, with the aiomqtt figure inside it,
    and the download floor (the same fan-out plus one manifest GET), which the cached ratio
    uses."""
    notified = stages.get("notified", {})

    def figures(b: dict[str, Any]) -> dict[str, Any]:
        return {
            "subscriber": b.get("subscriber"),
            "clients": b.get("clients"),
            "received": b.get("received"),
            "p50_ms": b.get("p50_ms"),
            "p95_ms": b.get("p95_ms"),
            "p99_ms": b.get("p99_ms"),
            "max_ms": b.get("max_ms"),
            "notified_p99_ratio": _ratio(notified.get("p99_ms"), b.get("p99_ms")),
        }

    out = figures(r.baseline)
    if "aiomqtt" in r.baseline:
        out["aiomqtt"] = figures(r.baseline["aiomqtt"])
    d = r.baseline.get("download")
    if d is not None:
        fig = figures(d)
        del fig["notified_p99_ratio"]
        # When each of its subscribers was notified, while the others downloaded: the
        # notify floor of a step in which every client downloads as soon as it is notified.
        under = (d.get("notified") or {}).get("p99_ms")
        out["download"] = {
            **fig,
            "failed": d.get("failed", 0),
            "cached_p99_ratio": _ratio(stages.get("cached", {}).get("p99_ms"), d.get("p99_ms")),
            "notified_p99_ms": under,
            "notified_p99_ratio": _ratio(notified.get("p99_ms"), under),
        }
    return out


def _throughput(r: RunResult, stages: dict[str, Any]) -> dict[str, Any]:
    fleet = r.fleet
    deliveries = sum(int(v.get("count", 0)) for v in stages.values())
    return {
        "deliveries": deliveries,
        "deliveries_per_s": round(deliveries / max(r.duration_s, 1e-9), 1),
        "peak_deliveries_per_s": fleet.timeline.peak_rate(*STAGES),
        "messages_accepted": fleet.messages.get("accepted", 0),
    }


def _manifest_requests(r: RunResult) -> dict[str, Any]:
    fleet = r.fleet
    return {
        # Latency of the answered requests: a refused connection says nothing of it.
        **fleet.requests.summary(),
        "count": fleet.all_requests,
        "answered": fleet.requests.count,
        "failed": fleet.failed_requests,
        "answers": dict(sorted(fleet.answers.items())),
        "peak_per_s": fleet.timeline.peak_rate(MANIFEST_SERIES, MANIFEST_FAILED_SERIES),
    }


def _errors(r: RunResult) -> dict[str, Any]:
    fleet = r.fleet
    return {
        "manifest_requests_failed": fleet.failed_requests,
        "fetch_rounds_failed": fleet.events.get("fetch_failed", 0),
        "connection_failures": fleet.events.get("disconnected", 0),
        "subscriptions_refused": fleet.events.get("subscription_refused", 0),
        "reconnects": fleet.reconnects,
        "messages_stale": fleet.messages.get("stale", 0),
        "messages_invalid": fleet.messages.get("invalid", 0),
        "messages_signature_refused": fleet.messages.get("signature_refused", 0),
        "admin_retries": r.admin_retries,
        "unconverged": sum(s.unconverged for s in r.steps),
    }


def _timeline(r: RunResult) -> dict[str, Any]:
    fleet = r.fleet
    width = bucket_width(r.duration_s)
    series = [*STAGES, MANIFEST_SERIES, MANIFEST_FAILED_SERIES]
    return {
        "bucket_s": width,
        "series": {
            s: fleet.timeline.buckets(s, r.started_at, width)
            for s in series
            if fleet.timeline.count(s)
        },
    }


_NUMBER_LIST = re.compile(r"\[\s+(-?[\d.eE+-]+(?:,\s+-?[\d.eE+-]+)*)\s+\]")


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON, with each innermost list of numbers (a plot point, a timeline bucket)
    on one line: thousands of them would otherwise take a line per number."""
    text = json.dumps(report, indent=2)
    return _NUMBER_LIST.sub(
        lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text
    )
