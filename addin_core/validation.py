"""How a pydantic validation error reads in one line, everywhere: ``where: what; ...``.

Used for protocol payloads, the server's org documents and request bodies, and the
simulator's scenarios, so every tool names a bad field the same way.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any


def validation_problems(
    errors: Iterable[Mapping[str, Any]], whole: str, *, skip: Collection[object] = ()
) -> str:
    """Each error as ``a.b.c: message``, joined by ``; ``.

    `errors` is what pydantic's ``ValidationError.errors()`` returns; `whole` names the
    location of an error that has none (the payload, the document); path parts in `skip`
    (FastAPI's ``"body"``) are left out."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in skip) or whole}: {e.get('msg')}"
        for e in errors
    )
