"""What a ``--db`` value names: an SQLite file, or a PostgreSQL URL; and how messages show
one (without its password). No driver is imported here: every command asks this first."""

from __future__ import annotations

from urllib.parse import urlsplit

SCHEMES = ("postgresql://", "postgres://")


def is_url(target: object) -> bool:
    return isinstance(target, str) and target.startswith(SCHEMES)


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    u = urlsplit(url)
    host = u.hostname or "localhost"
    port = f":{u.port}" if u.port else ""
    user = f"{u.username}@" if u.username else ""
    return f"postgresql://{user}{host}{port}{u.path}"
