"""`long_table` draws many rows as one cell per column when they fit: it must print exactly
what the row-by-row table prints, keep hostile text inert, and fall back to row-by-row
layout (wrapping) when the console is too narrow."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.table import Table

from agent import cli_common
from agent.cli_common import long_table, plain_table

COLUMNS = ("host", "name", "via")
ROWS = [
    ("Word", "Contoso CRM", "assigned to Everyone"),
    ("Excel", "[bold]not markup[/bold]", "group sales"),
    ("PowerPoint", "名前の長いアドイン", "user ann"),  # double-width characters
    ("Word", "evil\u202eexe.txt", ""),
]


def _render(table: Table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, legacy_windows=False).print(table)
    return out.getvalue()


def _row_by_row() -> Table:
    t = plain_table(title="Add-ins")
    for col in COLUMNS:
        t.add_column(col, overflow="fold")
    for r in ROWS:
        t.add_row(*r)
    return t


def test_fast_layout_prints_what_the_row_by_row_table_prints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_common, "console", Console(width=120))
    fast = _render(long_table("Add-ins", COLUMNS, ROWS), 120)
    assert fast == _render(_row_by_row(), 120)
    assert "[bold]not markup[/bold]" in fast
    assert "\\u202e" in fast and "\u202e" not in fast


def test_a_narrow_console_wraps_rows_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_common, "console", Console(width=30))
    narrow = _render(long_table("Add-ins", COLUMNS, ROWS), 30)
    assert narrow == _render(_row_by_row(), 30)
    assert len(narrow.splitlines()) > len(ROWS) + 5  # cells folded onto several lines


def test_no_rows_prints_the_header_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_common, "console", Console(width=80))
    assert "host" in _render(long_table("Add-ins", COLUMNS, []), 80)
