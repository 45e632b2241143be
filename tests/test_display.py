"""addin_core.display.printable: what reaches a terminal from a manifest's names."""

from __future__ import annotations

import pytest

from addin_core.display import printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("Contoso", "Contoso"),
        ("Café 日本 émoji 🙂", "Café 日本 émoji 🙂"),
        ("a\u009bb", "a\\u009bb"),
        ("evil\u202etxt.exe", "evil\\u202etxt.exe"),
        ("\u2066x\u2069", "\\u2066x\\u2069"),
        ("l\u200er\u200f", "l\\u200er\\u200f"),
        ("esc\x1b[31m", "esc\\u001b[31m"),
        ("two\nlines\ttab", "two\\u000alines\\u0009tab"),
        ("line\u2028sep", "line\\u2028sep"),
    ],
)
def test_control_and_format_characters_are_shown_as_escapes(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def test_keep_newlines_keeps_only_newlines() -> None:
    assert printable("a\nb\u202e\n", keep_newlines=True) == "a\nb\\u202e\n"
