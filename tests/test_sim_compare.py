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


def _sim(*args: str, timeout: float = 300, width: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": str(width)},
        check=False,
    )


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """report.json of three real runs, 100 then 50 clients (compare sorts them), then 50
    again (a repeat, for --median)."""
    base = tmp_path_factory.mktemp("compare")
    out = []
    for name, clients in (("r100", 100), ("r50", 50), ("again50", 50)):
        d = base / name
        r = _sim("run", "--clients", str(clients), "--workers", "1", "--cache", "none",
                 "--scenario", "phased-rollout", "--report", str(d))  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        out.append(d / "report.json")
    return out


@pytest.mark.slow
def test_compare_tables_real_runs_by_client_count(reports: list[Path], tmp_path: Path) -> None:
    page = tmp_path / "cmp.html"
    r = _sim("compare", *map(str, reports[:2]), "--html", str(page), timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if re.search(r"r(50|100)\b", ln)]
    assert len(lines) == 2, r.stdout
    # Sorted by client count; each row has the run's own figures.
    for line, report_file in zip(lines, reversed(reports[:2]), strict=True):
        data = json.loads(report_file.read_text())
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        run, clients, cache, cpu, kb, step, notify, cached, floor, ratio, down, dratio, nratio = cells
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
        # The download floor, and the main step's cached p99 over it.
        download = data["baseline"]["download"]
        assert down == f"{download['p99_ms']:,.0f}"
        expected = everyone["stages"]["cached"]["p99_ms"] / download["p99_ms"]
        assert float(dratio) == pytest.approx(expected, abs=0.006)
        # And its subscribers' own notification (under the downloads) against the step's.
        expected = everyone["stages"]["notified"]["p99_ms"] / download["notified_p99_ms"]
        assert float(nratio) == pytest.approx(expected, abs=0.006)
    html = page.read_text()
    assert html.count("<svg") == 3 and "notify p99" in html and "no data" not in html
    assert "download floor p99" in html
    assert "plots: " in r.stderr


@pytest.mark.slow
def test_compare_median_makes_one_row_of_repeats_with_their_range(
    reports: list[Path], tmp_path: Path
) -> None:
    page = tmp_path / "cmp.html"
    # Wide enough for every row on one line: a median row's figures carry their range.
    r = _sim("compare", "--median", *map(str, reports), "--html", str(page), timeout=60, width=400)
    assert r.returncode == 0, r.stderr
    assert "3 runs, 2 rows (medians)" in r.stdout
    lines = [ln for ln in r.stdout.splitlines() if re.search(r"(r50|r100|again50)\b", ln)]
    assert len(lines) == 2, r.stdout
    cells = [c.strip() for c in re.split(r"[│┃]", lines[0]) if c.strip()]
    run, clients, cache = cells[:3]
    assert "(median of 2)" in run and clients == "50" and cache == "none"
    assert [c.strip() for c in re.split(r"[│┃]", lines[1]) if c.strip()][1] == "100"
    # Each figure: the median of the two runs' (their mean, for two), then their range.
    runs = [json.loads(f.read_text()) for f in reports[1:]]
    kbs = sorted(d["rss_per_client_kb"] for d in runs)
    kb = cells[4]
    median_kb = f"{round(sum(kbs) / 2, 2):,.0f}"
    assert (
        kb == median_kb
        if kbs[0] == kbs[1]
        else kb == (f"{median_kb} ({kbs[0]:,.0f}–{kbs[1]:,.0f})")
    )
    floors = sorted(d["baseline"]["p99_ms"] for d in runs)
    floor = cells[8]
    assert floor.startswith(f"{round(sum(floors) / 2, 2):,.0f}") and floor.endswith("(paho)")
    if f"{floors[0]:,.0f}" != f"{floors[1]:,.0f}":
        assert f"({floors[0]:,.0f}–{floors[1]:,.0f})" in floor
    assert "median of 2" in page.read_text()


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
