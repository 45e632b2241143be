"""The entitlement digest agent and server compare (addin_core/digest.py): pure unit tests."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addin_core.digest import DIGEST_FORMAT, EntitlementLine, digest_lines, entitlement_digest
from addin_core.protocol import InvalidTopic, Mode

A = "2b88e7e5-1f45-4d5b-9b0e-6f0e8d3c1a11"
B = "9475b9bb-ff88-476f-917d-33a9c632508a"


def test_known_value() -> None:
    # The exact bytes hashed are part of the contract between agent and server.
    d = entitlement_digest([(B, "optional", "1.2.0.0"), (A, Mode.FIXED, "1.0.0.0")], revision=7)
    text = f"{DIGEST_FORMAT}\n{A}|fixed|1.0.0.0\n{B}|optional|1.2.0.0"
    assert d.digest == hashlib.sha256(text.encode()).hexdigest()
    assert (d.count, d.revision) == (2, 7)
    assert d.to_json("ann") == {"user_id": "ann", "revision": 7, "digest": d.digest, "count": 2}


def test_empty_set_has_a_digest_of_its_own() -> None:
    empty = entitlement_digest([], 0)
    assert empty.count == 0
    assert empty.digest == hashlib.sha256(DIGEST_FORMAT.encode()).hexdigest()
    assert empty.digest != entitlement_digest([(A, "available", "1.0")], 0).digest


def test_revision_is_not_hashed() -> None:
    # The agent's revision trails the tenant's for changes that do not concern its user.
    assert entitlement_digest([(A, "fixed", "1.0")], 3).digest == (
        entitlement_digest([(A, "fixed", "1.0")], 900).digest
    )


@pytest.mark.parametrize(
    "other",
    [
        [(A, "optional", "1.0.0.0")],  # mode changed
        [(A, "fixed", "1.0.0.1")],  # version changed
        [(B, "fixed", "1.0.0.0")],  # another add-in
        [(A, "fixed", "1.0.0.0"), (B, "fixed", "1.0.0.0")],  # one more
    ],
)
def test_every_difference_changes_the_digest(other: list[tuple[str, str, str]]) -> None:
    assert entitlement_digest([(A, "fixed", "1.0.0.0")], 1).digest != (
        entitlement_digest(other, 1).digest
    )


def test_bad_lines_are_refused_with_a_clear_error() -> None:
    with pytest.raises(InvalidTopic, match="add-in id"):
        EntitlementLine("a|b", Mode.FIXED, "1.0")
    with pytest.raises(ValueError, match="invalid version"):
        EntitlementLine(A, Mode.FIXED, "1.0|fixed")
    with pytest.raises(ValueError):
        EntitlementLine(A, "mandatory", "1.0")  # type: ignore[arg-type]


ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True)
lines = st.lists(
    st.tuples(
        ids,
        st.sampled_from(list(Mode)),
        st.from_regex(r"[0-9]{1,3}(\.[0-9]{1,3}){0,3}", fullmatch=True),
    ),
    max_size=20,
)


@given(lines, st.randoms())
def test_order_and_duplicates_do_not_matter(ls: list[tuple[str, Mode, str]], rnd: object) -> None:
    shuffled = list(ls) + list(ls[:3])
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = digest_lines(EntitlementLine(*x) for x in ls)
    b = digest_lines(EntitlementLine(*x) for x in shuffled)
    assert a == b
    assert a[1] == len(set(ls))
