"""The report bundle's shape, shared by the agent that writes it (`addin-agent
report-bundle`, agent/bundle.py) and the server command that reads it back (`addin-server
bundle show`). Pure: parsing the bytes is the caller's; `check` says whether a decoded
document is a bundle this code can show, in one line when it is not.

A bundle comes from a user's machine through a ticket: anything in it may be hostile.
`check` guarantees the types `addin-server bundle show` relies on; the strings themselves
are shown through `addin_core.display.printable`.
"""

from __future__ import annotations

from typing import Any

FORMAT = "addin-agent-report-bundle"
VERSION = 1
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
"""A bundle holds at most 500 events and one `why` per add-in: a few MB at the very most."""

_SECTIONS: dict[str, type | tuple[type, ...]] = {
    "created_at": (int, float),
    "status": dict,
    "installed": dict,
    "pending": dict,
    "events": list,
    "why": list,
    "config": (dict, type(None)),
}


class BundleError(ValueError):
    """Not a report bundle this version can show; the message says why, in one line."""


def check(data: Any) -> dict[str, Any]:
    """`data` (decoded JSON) as a bundle, or BundleError naming what is wrong."""
    if not isinstance(data, dict):
        raise BundleError("not a report bundle: the document is not a JSON object")
    if data.get("format") != FORMAT:
        raise BundleError(f"not a report bundle: format is not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise BundleError(
            f"report bundle version {str(data.get('version'))[:20]!r} is not supported "
            f"(this version reads {VERSION})"
        )
    for name, kind in _SECTIONS.items():
        if name not in data:
            raise BundleError(f"report bundle has no {name!r} section")
        if not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise BundleError(f"report bundle section {name!r} has the wrong type")
    for name in ("installed", "pending"):
        for host, rows in data[name].items():
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise BundleError(f"report bundle section {name!r}: {host!r} is not a list")
    for name in ("events", "why"):
        if not all(isinstance(r, dict) for r in data[name]):
            raise BundleError(f"report bundle section {name!r} holds a non-object")
    for w in data["why"]:
        if not isinstance(w.get("steps", []), list) or not all(
            isinstance(s, dict) for s in w.get("steps", [])
        ):
            raise BundleError("report bundle section 'why': steps is not a list of objects")
    return data
