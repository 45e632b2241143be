"""Latency histograms, convergence samples and process resource use.

Workers record every latency in an HDR histogram (microsecond resolution, 3 significant
digits) per stage and per step, ship them encoded, and the coordinator adds them up: a merged
histogram is exactly the histogram of the pooled samples, so percentiles are never averaged.
"""

from __future__ import annotations

import math
import os
import resource
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram

STAGES: tuple[str, ...] = ("notified", "cached", "applied")
"""Stages of one change reaching one client: message accepted, manifest verified in the cache,
applied at a host's launch."""

_LOWEST_US = 1
_HIGHEST_US = 24 * 3600 * 1_000_000
_DIGITS = 3


def new_histogram() -> HdrHistogram:
    return HdrHistogram(_LOWEST_US, _HIGHEST_US, _DIGITS)


class LatencyHistogram:
    """One HDR histogram of latencies, recorded in seconds, reported in milliseconds."""

    def __init__(self, hist: HdrHistogram | None = None) -> None:
        self.hist = hist if hist is not None else new_histogram()

    def record(self, seconds: float) -> None:
        # Clock skew between machines can make a latency slightly negative; count it as 1 µs
        # rather than losing it.
        us = min(_HIGHEST_US, max(_LOWEST_US, round(seconds * 1_000_000)))
        self.hist.record_value(us)

    @property
    def count(self) -> int:
        return int(self.hist.get_total_count())

    def percentile_ms(self, p: float) -> float:
        if self.count == 0:
            return 0.0
        return float(self.hist.get_value_at_percentile(p)) / 1000.0

    def max_ms(self) -> float:
        return float(self.hist.get_max_value()) / 1000.0 if self.count else 0.0

    def summary(self) -> dict[str, float | int]:
        return {
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "max_ms": round(self.max_ms(), 3),
            "count": self.count,
        }

    def cdf(self, points: int = 60) -> list[tuple[float, float]]:
        """(latency ms, fraction of samples at or below it), for plotting."""
        if self.count == 0:
            return []
        out: list[tuple[float, float]] = []
        for i in range(points + 1):
            pct = 100.0 * i / points
            out.append((self.percentile_ms(max(pct, 0.0001)), pct / 100.0))
        return out

    def encode(self) -> str:
        return self.hist.encode().decode("ascii")

    @classmethod
    def decode(cls, text: str) -> LatencyHistogram:
        return cls(HdrHistogram.decode(text.encode("ascii")))

    def merge(self, other: LatencyHistogram) -> None:
        if other.count:
            self.hist.add(other.hist)


@dataclass
class StageSet:
    """A histogram per stage."""

    stages: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {s: LatencyHistogram() for s in STAGES}
    )

    def record(self, stage: str, seconds: float) -> None:
        self.stages[stage].record(seconds)

    def merge(self, other: StageSet) -> None:
        for s, h in other.stages.items():
            self.stages.setdefault(s, LatencyHistogram()).merge(h)

    def encode(self) -> dict[str, str]:
        return {s: h.encode() for s, h in self.stages.items()}

    @classmethod
    def decode(cls, data: Mapping[str, str]) -> StageSet:
        out = cls()
        for s, text in data.items():
            out.stages[s] = LatencyHistogram.decode(text)
        return out

    def summary(self) -> dict[str, dict[str, float | int]]:
        return {s: self.stages[s].summary() for s in STAGES if s in self.stages}


TICK_S = 0.1
"""Time resolution of a `Timeline`."""

BINS_PER_DECADE = 20
"""Latency resolution of a `Timeline`: bins 12 % wide, so a percentile read from them is within
6 % of the true value."""


class Timeline:
    """Events over time, per series (a stage, or manifest requests): how many happened in each
    0.1 s tick and how long they took, in logarithmic bins.

    The HDR histograms give the exact percentiles of a whole step; this gives their shape over
    the run (deliveries per second, p50/p99 per second) at a fraction of the size: one counter
    per (tick, bin) that saw an event. Merging two is adding the counters, so workers' timelines
    add up exactly like their histograms.
    """

    def __init__(self) -> None:
        self.series: dict[str, Counter[tuple[int, int]]] = {}

    def record(self, series: str, at: float, seconds: float) -> None:
        """One event at Unix time `at` that took `seconds` (its latency)."""
        ms = max(seconds * 1000.0, 0.01)
        key = (math.floor(at / TICK_S), math.floor(math.log10(ms) * BINS_PER_DECADE))
        self.series.setdefault(series, Counter())[key] += 1

    def count(self, series: str) -> int:
        return sum(self.series.get(series, Counter()).values())

    def merge(self, other: Timeline) -> None:
        for name, counts in other.series.items():
            self.series.setdefault(name, Counter()).update(counts)

    def encode(self) -> dict[str, list[list[int]]]:
        return {
            name: [[tick, b, n] for (tick, b), n in sorted(counts.items())]
            for name, counts in self.series.items()
        }

    @classmethod
    def decode(cls, data: Mapping[str, Iterable[Iterable[int]]]) -> Timeline:
        out = cls()
        for name, rows in data.items():
            counts = out.series.setdefault(name, Counter())
            for tick, b, n in rows:
                counts[(int(tick), int(b))] += int(n)
        return out

    def buckets(self, series: str, origin: float, width: float) -> list[list[float]]:
        """`[[start s after origin, events, p50 ms, p99 ms], ...]` per `width`-second bucket
        that saw an event, in time order."""
        grouped: dict[int, Counter[int]] = {}
        for (tick, b), n in self.series.get(series, Counter()).items():
            i = math.floor((tick * TICK_S - origin) / width + 1e-9)
            grouped.setdefault(i, Counter())[b] += n
        out: list[list[float]] = []
        for i in sorted(grouped):
            bins = grouped[i]
            total = sum(bins.values())
            out.append(
                [
                    round(i * width, 3),
                    total,
                    round(_bin_percentile(bins, total, 0.50), 3),
                    round(_bin_percentile(bins, total, 0.99), 3),
                ]
            )
        return out

    def peak_rate(self, *series: str, window: float = 1.0) -> float:
        """The most events of these series together in any `window`-second bucket (aligned on
        whole seconds), per second."""
        per: Counter[int] = Counter()
        for name in series:
            for (tick, _b), n in self.series.get(name, Counter()).items():
                per[math.floor(tick * TICK_S / window + 1e-9)] += n
        return max(per.values(), default=0) / window


def _bin_percentile(bins: Mapping[int, int], total: int, q: float) -> float:
    """The latency (ms) at quantile `q` of a bucket: the geometric middle of the bin holding it."""
    rank = max(1, math.ceil(q * total))
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return float(10 ** ((b + 0.5) / BINS_PER_DECADE))
    return 0.0


def convergence_curve(
    offsets_s: Iterable[float], total: int, points: int = 50
) -> list[tuple[float, float]]:
    """(seconds since the step started, share of `total` clients converged), step-shaped.

    `offsets_s` holds one time per converged client; clients that never converged are simply
    absent, so the curve ends below 1.0 for them.
    """
    times = sorted(offsets_s)
    if total <= 0:
        return []
    if not times:
        return [(0.0, 0.0)]
    out: list[tuple[float, float]] = [(0.0, 0.0)]
    step = max(1, len(times) // points)
    for i in range(step - 1, len(times), step):
        out.append((round(times[i], 4), (i + 1) / total))
    if out[-1][1] != len(times) / total:
        out.append((round(times[-1], 4), len(times) / total))
    return out


@dataclass
class ProcessSample:
    role: str
    pid: int
    cpu_s: float
    rss_max_kb: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "pid": self.pid,
            "cpu_s": round(self.cpu_s, 3),
            "rss_max_kb": self.rss_max_kb,
        }


class ProcessMonitor:
    """Tracks CPU time and the peak RSS of a process (sampled; the peak is the highest
    sample, or the kernel's own high-water mark when it is our own process)."""

    def __init__(self, role: str, pid: int | None = None) -> None:
        self.role = role
        self.pid = pid or os.getpid()
        self._proc = psutil.Process(self.pid)
        self._rss_max_kb = 0
        self._cpu_s = 0.0
        self.sample()

    def sample(self) -> None:
        try:
            with self._proc.oneshot():
                cpu = self._proc.cpu_times()
                self._cpu_s = float(cpu.user + cpu.system)
                rss = self._proc.memory_info().rss // 1024
            self._rss_max_kb = max(self._rss_max_kb, int(rss))
            if self.pid == os.getpid():
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self._rss_max_kb = max(self._rss_max_kb, int(peak))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass  # the process ended: keep the last sample

    def result(self) -> ProcessSample:
        self.sample()
        return ProcessSample(self.role, self.pid, self._cpu_s, self._rss_max_kb)
