"""The run's report: a terminal summary, `report.json` (documented in docs/simulator.md) and
a self-contained `report.html` with inline SVG plots (no plotting dependency, no network).

`report.html` is drawn from `report.json` alone, so a report can be re-rendered or inspected
without the run. Modules: `model` builds report.json, `terminal` prints the summary, `page`
renders the HTML, `charts` draws its plots with the primitives of `svg`, and `wording` holds
what the terminal and the page say alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulator.report.model import bucket_width, build_report, to_json
from simulator.report.page import render_html
from simulator.report.svg import labelled, linear_ticks, log_ticks
from simulator.report.terminal import print_summary
from simulator.results import RunResult

__all__ = [
    "bucket_width",
    "build_report",
    "labelled",
    "linear_ticks",
    "log_ticks",
    "print_summary",
    "render_html",
    "to_json",
    "write_reports",
]


def write_reports(r: RunResult, directory: Path) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    report = build_report(r)
    (directory / "report.json").write_text(to_json(report) + "\n")
    (directory / "report.html").write_text(render_html(report))
    return report
