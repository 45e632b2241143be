"""The audit log as data: who changed what, when, through which way in.

Every change writes its line in the same transaction as the change
(`unit_of_work`); this module only reads them, newest first, filtered."""

from __future__ import annotations

import json
from typing import Any

from server_stub.db import Database

MAX_AUDIT_ROWS = 5000
"""The most lines one read returns (`--limit` and `?limit=` are capped here)."""


class AuditLog:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def entries(
        self,
        *,
        since: float | None = None,
        actor: str | None = None,
        operation: str | None = None,
        limit: int = 200,
    ) -> list[dict[str, Any]]:
        """Audit lines, newest first: at or after `since` (epoch seconds), by `actor` (its
        name), of `operation`; at most `limit` (capped at `MAX_AUDIT_ROWS`)."""
        where: list[str] = []
        args: list[Any] = []
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        if actor:
            where.append("actor = ?")
            args.append(actor)
        if operation:
            where.append("operation = ?")
            args.append(operation)
        sql = "SELECT id, revision, at, actor, role, via, operation, detail FROM audit"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(max(1, min(limit, MAX_AUDIT_ROWS)))
        return [
            {
                "id": r["id"],
                "revision": r["revision"],
                "at": r["at"],
                "actor": r["actor"],
                "role": r["role"],
                "via": r["via"],
                "operation": r["operation"],
                "detail": json.loads(r["detail"]),
            }
            for r in await self.database.rows(sql, args)
        ]

    async def actors(self) -> list[str]:
        """Every actor the log names (for the console's filter)."""
        rows = await self.database.rows("SELECT DISTINCT actor FROM audit ORDER BY actor")
        return [str(r[0]) for r in rows]
