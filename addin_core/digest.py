"""The entitlement digest that agent and server compare for anti-entropy. Pure.

Both sides resolve a user's entitlements with their own resolver (the server from its
database, the agent from the retained messages it holds) and reduce the result to one
sha256 here, so a disagreement between the two views shows up as different digests.

The digest is host-independent (the server does not know which host apps a workstation
has): one line ``addin_id|mode|version`` per entitled add-in, sorted, joined by newlines.
It does NOT include the revision: the agent holds only the topics that concern its user,
so its revision legitimately trails the tenant's; the revision travels next to the digest
(`EntitlementDigest.revision`) to tell "in flight" from "missed".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from addin_core.protocol import Mode, check_id

DIGEST_FORMAT = "v1"
"""Prefixed to the hashed text, so a future change of the line format cannot collide."""


@dataclass(frozen=True, slots=True)
class EntitlementLine:
    """One entitled add-in as the digest sees it."""

    addin_id: str
    mode: Mode
    version: str

    def __post_init__(self) -> None:
        check_id(self.addin_id, "add-in id")
        object.__setattr__(self, "mode", Mode(self.mode))
        if not self.version or "|" in self.version or "\n" in self.version:
            raise ValueError(f"invalid version {self.version!r} in an entitlement digest line")

    def text(self) -> str:
        return f"{self.addin_id}|{self.mode.value}|{self.version}"


@dataclass(frozen=True, slots=True)
class EntitlementDigest:
    """A digest of one user's entitlements, as computed at `revision`."""

    digest: str
    count: int
    revision: int

    def to_json(self, user_id: str) -> dict[str, Any]:
        return {
            "user_id": user_id,
            "revision": self.revision,
            "digest": self.digest,
            "count": self.count,
        }


def digest_lines(lines: Iterable[EntitlementLine]) -> tuple[str, int]:
    """(sha256 hex, number of distinct lines) of the entitlements, order-independent."""
    texts = sorted({line.text() for line in lines})
    h = hashlib.sha256()
    h.update(DIGEST_FORMAT.encode())
    for t in texts:
        h.update(b"\n")
        h.update(t.encode())
    return h.hexdigest(), len(texts)


def entitlement_digest(
    entitlements: Iterable[tuple[str, Mode | str, str]], revision: int
) -> EntitlementDigest:
    """Digest ``(addin_id, mode, version)`` triples computed at `revision`."""
    digest, count = digest_lines(EntitlementLine(a, Mode(m), v) for a, m, v in entitlements)
    return EntitlementDigest(digest, count, revision)
