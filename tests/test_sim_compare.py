"""`addin-sim compare` on the report.json of real small runs (real Mosquitto, server and worker
processes), and its one-line errors for a missing or malformed report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def _sim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """report.json of two real runs, 100 then 50 clients (compare sorts them)."""
    base = tmp_path_factory.mktemp("compare")
    out = []
    for clients in (100, 50):
        d = base / f"r{clients}"
        r = _sim("run", "--clients", str(clients), "--workers", "1", "--cache", "none",
                 "--scenario", "phased-rollout", "--report", str(d))  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(d / "report.json")
    return out


@pytest.mark.slow
def test_compare_tables_real_runs_by_client_count(reports: list[Path], tmp_path: Path) -> None:
    page = tmp_path / "cmp.html"
    r = _sim("compare", *map(str, reports), "--html", str(page), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if re.search(r"r(50|100)\b", ln)]
    assert len(lines) == 2, r.stdout
    # Sorted by client count; each row has the run's own figures.
    for line, report_file in zip(lines, reversed(reports), strict=True):
        data = json.loads(report_file.read_text())
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        run, clients, cache, cpu, kb, step, notify, cached, floor, ratio = cells
        assert run == str(report_file.parent)  # named by its report directory
        assert clients == str(data["clients"]) and cache == "none"
        workers_cpu = sum(p["cpu_s"] for p in data["processes"] if "worker" in p["role"])
        assert int(cpu.replace(",", "")) == round(workers_cpu * 1e6 / data["clients"])
        assert kb == f"{data['rss_per_client_kb']:,.0f}"
        # The scenario step that notified most clients (the run's connect step notifies all).
        scenario_steps = [
            s for s in data["steps"] if s["name"] in ("pilot", "department", "everyone")
        ]
        everyone = max(scenario_steps, key=lambda s: s["stages"]["notified"]["count"])
        assert step == everyone["name"] and everyone["stages"]["notified"]["count"] > 0
        assert notify == f"{everyone['stages']['notified']['p99_ms']:,.0f}"
        assert cached == f"{everyone['stages']['cached']['p99_ms']:,.0f}"
        assert floor == f"{data['baseline']['p99_ms']:,.0f} (paho)"
        expected = everyone["stages"]["notified"]["p99_ms"] / data["baseline"]["p99_ms"]
        assert float(ratio) == pytest.approx(expected, abs=0.006)
    html = page.read_text()
    assert html.count("<svg") == 3 and "notify p99" in html and "no data" not in html
    assert "plots: " in r.stderr


@pytest.mark.slow
def test_compare_takes_the_report_directory(reports: list[Path]) -> None:
    r = _sim("compare", str(reports[0].parent), timeout=60)
    assert r.returncode == 0, r.stderr
    assert " 100 " in r.stdout and " none " in r.stdout


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"scenario": "x"}', "not a report.json of `addin-sim run`"),
        ('{"clients": 5, "steps": 3}', "not a report.json of `addin-sim run`"),
    ],
)
def test_compare_refuses_a_bad_report_in_one_line(
    tmp_path: Path, content: str | None, says: str
) -> None:
    bad = tmp_path / "report.json"
    if content is not None:
        bad.write_text(content)
    r = _sim("compare", str(bad), timeout=60)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and says in errors[0] and str(bad) in errors[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
