"""`text_table` draws the read commands' tables with click alone: columns aligned by display
width (wide characters count two), hostile text inert, a header and a rule."""

from __future__ import annotations

import click

from agent.cli_common import display_width, text_table

COLUMNS = ("host", "name", "via")
ROWS = [
    ("Word", "Contoso CRM", "assigned to Everyone"),
    ("Excel", "[bold]not markup[/bold]", "group sales"),
    ("PowerPoint", "名前の長いアドイン", "user ann"),  # double-width characters
    ("Word", "evil\u202eexe.txt\x1b[31m", ""),
]


def test_columns_line_up_by_display_width() -> None:
    lines = click.unstyle(text_table("Add-ins", COLUMNS, ROWS)).splitlines()
    assert lines[0] == "Add-ins"
    assert lines[1].split() == ["host", "name", "via"]
    assert set(lines[2].replace(" ", "")) == {"─"}
    body = lines[3:]
    assert len(body) == len(ROWS)
    # The third column starts at the same display column on every row that has one.
    starts = {
        display_width(line[: line.index(via)])
        for line, (_, _, via) in zip(body, ROWS, strict=True)
        if via
    }
    assert len(starts) == 1
    assert display_width("名前") == 4 and display_width("e\u0301") == 1


def test_hostile_text_is_shown_not_obeyed() -> None:
    out = click.unstyle(text_table(None, COLUMNS, ROWS))
    assert "[bold]not markup[/bold]" in out
    assert "\\u202e" in out and "\u202e" not in out
    assert "\\u001b[31m" in out and "\x1b" not in out


def test_no_rows_prints_the_header_only() -> None:
    lines = click.unstyle(text_table("Per host app", COLUMNS, [])).splitlines()
    assert lines[1].split() == list(COLUMNS) and len(lines) == 3
