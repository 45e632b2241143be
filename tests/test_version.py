"""Version rules: 1-4 numeric parts of at most 5 digits, missing parts are 0, numeric compare."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addin_core.version import InvalidVersion, compare_versions, is_newer, parse_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", (1, 0, 0, 0)),
        ("1.2", (1, 2, 0, 0)),
        ("1.2.3", (1, 2, 3, 0)),
        ("1.2.3.4", (1, 2, 3, 4)),
        ("99999.0.00001.0", (99999, 0, 1, 0)),
        ("01.002", (1, 2, 0, 0)),
    ],
)
def test_parse_pads_missing_parts_with_zero(text: str, expected: tuple[int, ...]) -> None:
    assert parse_version(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("1.0.0.0.0", "has 5 parts; at most 4 are allowed"),
        ("1..0", "empty part 2"),
        ("1.0.", "empty part 3"),
        (".1", "empty part 1"),
        ("1.a", "part 2 ('a') is not a number"),
        ("1.-1", "is not a number"),
        ("1.+1", "is not a number"),
        (" 1.0", "is not a number"),
        ("1.0 ", "is not a number"),
        ("1.²", "is not a number"),  # a Unicode digit that str.isdigit() accepts
        ("1.٣", "is not a number"),  # Arabic-Indic three
        ("123456.0", "part 1 ('123456') has 6 digits; at most 5 are allowed"),
        ("v1.0", "is not a number"),
    ],
)
def test_parse_rejects_with_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidVersion, match=None) as info:
        parse_version(text)
    assert reason in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.10", "1.9", 1),
        ("1.9", "1.10", -1),
        ("1.0", "1.0.0.0", 0),
        ("1", "1.0.0.0", 0),
        ("1.10.0.0", "1.9.0.0", 1),
        ("2.0", "1.99999.99999.99999", 1),
        ("1.0.0.1", "1.0.0", 1),
        ("01.2", "1.02", 0),
    ],
)
def test_compare(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_is_newer_is_strict() -> None:
    assert is_newer("1.0.0.1", "1.0")
    assert not is_newer("1.0.0.0", "1.0")
    assert not is_newer("1.9", "1.10")


def test_compare_rejects_invalid_operand() -> None:
    with pytest.raises(InvalidVersion):
        compare_versions("1.0", "1.0.0.0.0")


parts = st.lists(st.integers(0, 99999), min_size=1, max_size=4)


@given(parts, parts)
def test_compare_matches_padded_tuple_order(a: list[int], b: list[int]) -> None:
    pa, pb = a + [0] * (4 - len(a)), b + [0] * (4 - len(b))
    expected = (pa > pb) - (pa < pb)
    assert compare_versions(".".join(map(str, a)), ".".join(map(str, b))) == expected


@given(st.text(max_size=30))
def test_parse_never_raises_anything_but_invalid_version(text: str) -> None:
    try:
        result = parse_version(text)
    except InvalidVersion:
        return
    assert len(result) == 4 and all(0 <= n <= 99999 for n in result)
