"""Permission levels and their order per manifest type."""

from __future__ import annotations

import itertools

import pytest

from addin_core.manifest import ManifestType
from addin_core.permissions import (
    MAIL_LEVELS,
    TASKPANE_LEVELS,
    is_escalation,
    levels_for,
    permission_rank,
)


def test_levels_per_type() -> None:
    assert levels_for("TaskPaneApp") == TASKPANE_LEVELS
    assert levels_for("ContentApp") == TASKPANE_LEVELS
    assert levels_for("MailApp") == MAIL_LEVELS
    assert levels_for(ManifestType.MAIL) == MAIL_LEVELS


def test_taskpane_order() -> None:
    ranks = [
        permission_rank("TaskPaneApp", level)
        for level in (
            "Restricted",
            "ReadDocument",
            "ReadAllDocument",
            "WriteDocument",
            "ReadWriteDocument",
        )
    ]
    assert ranks == sorted(ranks) == list(range(5))


def test_mail_order() -> None:
    ranks = [
        permission_rank("MailApp", level)
        for level in ("Restricted", "ReadItem", "ReadWriteItem", "ReadWriteMailbox")
    ]
    assert ranks == list(range(4))


@pytest.mark.parametrize("mtype", ["TaskPaneApp", "ContentApp", "MailApp"])
def test_escalation_is_strictly_higher(mtype: str) -> None:
    levels = levels_for(mtype)
    for old, new in itertools.product(levels, levels):
        assert is_escalation(mtype, old, new) == (levels.index(new) > levels.index(old))


def test_examples() -> None:
    assert is_escalation("MailApp", "ReadItem", "ReadWriteMailbox")
    assert not is_escalation("MailApp", "ReadWriteMailbox", "ReadItem")
    assert is_escalation("TaskPaneApp", "ReadDocument", "ReadAllDocument")


@pytest.mark.parametrize(
    ("mtype", "level"),
    [
        ("MailApp", "ReadWriteDocument"),  # a level of another type
        ("TaskPaneApp", "ReadItem"),
        ("TaskPaneApp", "readwritedocument"),  # the schema is case-sensitive
        ("TaskPaneApp", ""),
    ],
)
def test_unknown_level_is_a_clear_error(mtype: str, level: str) -> None:
    with pytest.raises(ValueError, match=f"is not a permission level of {mtype}"):
        permission_rank(mtype, level)


def test_unknown_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown manifest type 'OfficeApp'"):
        levels_for("OfficeApp")
