"""Add-in `<Version>` rules: 1 to 4 numeric parts of at most 5 digits; missing parts count as 0.

Pure: no I/O. Used by the manifest reader (validation), the server (an LOB update must be strictly
newer) and the agent (never downgrade on its own).
"""

from __future__ import annotations

MAX_PARTS = 4
MAX_DIGITS = 5

VersionTuple = tuple[int, int, int, int]


class InvalidVersion(ValueError):
    """A version string that does not follow the n[.n[.n[.n]]] rule; the message says why."""


def parse_version(text: str) -> VersionTuple:
    """Parse `text` into four integers, padding missing parts with 0.

    Raises InvalidVersion naming the reason (empty, too many parts, empty part, non-digit,
    too many digits). Surrounding whitespace is not accepted: the manifest reader strips element
    text itself, and a stray space elsewhere is a sign of a broken file.
    """
    if not isinstance(text, str):
        raise InvalidVersion(f"{text!r} is not a string")
    if text == "":
        raise InvalidVersion("the version is empty")
    parts = text.split(".")
    if len(parts) > MAX_PARTS:
        raise InvalidVersion(f"{text!r} has {len(parts)} parts; at most {MAX_PARTS} are allowed")
    numbers: list[int] = []
    for index, part in enumerate(parts, start=1):
        if part == "":
            raise InvalidVersion(f"{text!r} has an empty part {index}")
        # str.isdigit() accepts non-ASCII digits such as '²' or Arabic-Indic digits; Office does
        # not, so insist on ASCII 0-9.
        if not (part.isascii() and part.isdigit()):
            raise InvalidVersion(f"{text!r}: part {index} ({part!r}) is not a number")
        if len(part) > MAX_DIGITS:
            raise InvalidVersion(
                f"{text!r}: part {index} ({part!r}) has {len(part)} digits; "
                f"at most {MAX_DIGITS} are allowed"
            )
        numbers.append(int(part))
    numbers.extend([0] * (MAX_PARTS - len(numbers)))
    return (numbers[0], numbers[1], numbers[2], numbers[3])


def compare_versions(a: str, b: str) -> int:
    """-1 if a < b, 0 if equal, 1 if a > b, comparing part by part as numbers.

    "1.10" > "1.9" and "1.0" == "1.0.0.0". Raises InvalidVersion if either is invalid.
    """
    left, right = parse_version(a), parse_version(b)
    return (left > right) - (left < right)


def is_newer(candidate: str, current: str) -> bool:
    """True when `candidate` is strictly greater than `current` (an acceptable LOB update)."""
    return compare_versions(candidate, current) > 0
