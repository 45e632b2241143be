"""Add-in permission levels and their order, per manifest type. Pure: no I/O.

An update whose permission is higher than the deployed one is an escalation: the agent keeps the
old version until the admin re-consents.
"""

from __future__ import annotations

from collections.abc import Iterable

# Lowest first: the index in the tuple is the rank.
TASKPANE_LEVELS: tuple[str, ...] = (
    "Restricted",
    "ReadDocument",
    "ReadAllDocument",
    "WriteDocument",
    "ReadWriteDocument",
)
MAIL_LEVELS: tuple[str, ...] = ("Restricted", "ReadItem", "ReadWriteItem", "ReadWriteMailbox")

_LEVELS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "TaskPaneApp": TASKPANE_LEVELS,
    "ContentApp": TASKPANE_LEVELS,
    "MailApp": MAIL_LEVELS,
}


def levels_for(manifest_type: str) -> tuple[str, ...]:
    """The permission levels of a manifest type, lowest first.

    Accepts the `xsi:type` names (TaskPaneApp, ContentApp, MailApp) and ManifestType members
    (a StrEnum, so they compare equal to those names). Raises ValueError for anything else.
    """
    try:
        return _LEVELS_BY_TYPE[str(manifest_type)]
    except KeyError:
        known = ", ".join(_LEVELS_BY_TYPE)
        raise ValueError(
            f"unknown manifest type {manifest_type!r}; expected one of {known}"
        ) from None


def permission_rank(manifest_type: str, level: str) -> int:
    """0 for the lowest level of the type, increasing. Raises ValueError for an unknown level
    (matching is exact: Office's schema is case-sensitive)."""
    levels = levels_for(manifest_type)
    try:
        return levels.index(level)
    except ValueError:
        raise ValueError(
            f"{level!r} is not a permission level of {manifest_type}; "
            f"expected one of {', '.join(levels)}"
        ) from None


def is_escalation(manifest_type: str, old: str, new: str) -> bool:
    """True when `new` asks for more than `old` (strictly higher rank)."""
    return permission_rank(manifest_type, new) > permission_rank(manifest_type, old)


def consent_changes(
    old_permissions: str,
    old_hosts: Iterable[str],
    new_permissions: str,
    new_hosts: Iterable[str],
) -> str:
    """What an update asks the admin to consent to, in the words `why` and `explain` share:
    ``"permissions ReadDocument → ReadWriteDocument"``, ``"hosts Word → Word, Excel"``, or
    both joined by ``"; "`` ("" when neither changed)."""
    old_h, new_h = [str(h) for h in old_hosts], [str(h) for h in new_hosts]
    parts = []
    if old_permissions != new_permissions:
        parts.append(f"permissions {old_permissions} → {new_permissions}")
    if set(old_h) != set(new_h):
        parts.append(f"hosts {', '.join(old_h) or 'none'} → {', '.join(new_h) or 'none'}")
    return "; ".join(parts)
