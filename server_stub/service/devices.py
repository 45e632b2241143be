"""Enrolled devices: who each device acts for, its certificate serial, its HTTP token's hash,
and revocation.

A device is not part of the tenant's published state (no revision, no message): it is a
credential. The broker learns about devices from the ACL `broker-config` writes and the CRL;
the HTTP API looks a device token up here on every request, so a revocation takes effect
on the next request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from addin_core.protocol import InvalidTopic, check_unreserved
from server_stub.db import Database
from server_stub.service.errors import BadRequest, Conflict, NotFound


def token_hash(token: str | bytes) -> str:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def checked_device_id(value: str) -> str:
    try:
        return check_unreserved(value, "device id")
    except InvalidTopic as e:
        raise BadRequest(str(e)) from None


def _refuse(device_id: str, user_id: str, revoked_at: float | None) -> None:
    state = "revoked" if revoked_at is not None else "enrolled"
    raise Conflict(
        f"device {device_id!r} is already {state} (user {user_id!r}); --replace issues it "
        "a new certificate and token and revokes the old ones"
    )


class Devices:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def enroll(
        self,
        user_id: str,
        device_id: str,
        cert_serial: str,
        token_sha256: str,
        at: float,
        *,
        replace: bool,
    ) -> dict[str, Any]:
        """Record `device_id` for `user_id`. An enrolled device (revoked or not) is replaced
        only with `replace`; its old certificate is then revoked (listed in the CRL)."""
        checked_device_id(device_id)
        async with self.database.write() as conn:
            cur = await conn.execute("SELECT 1 FROM users WHERE id=?", (user_id,))
            if await cur.fetchone() is None:
                raise NotFound(f"unknown user {user_id!r}: add it first (`addin-server user add`)")
            cur = await conn.execute(
                "SELECT user_id, cert_serial, revoked_at FROM devices WHERE device_id=?",
                (device_id,),
            )
            old = await cur.fetchone()
            if old is not None and not replace:
                _refuse(device_id, str(old[0]), old[2])
            if old is not None:
                await conn.execute(
                    "INSERT INTO revoked_certs(cert_serial, device_id, revoked_at) "
                    "VALUES (?,?,?) ON CONFLICT DO NOTHING",
                    (old[1], device_id, at),
                )
            await conn.execute(
                "INSERT INTO devices(device_id, user_id, cert_serial, token_sha256, enrolled_at, "
                "revoked_at) VALUES (?,?,?,?,?,NULL) ON CONFLICT(device_id) DO UPDATE SET "
                "user_id=excluded.user_id, cert_serial=excluded.cert_serial, "
                "token_sha256=excluded.token_sha256, enrolled_at=excluded.enrolled_at, "
                "revoked_at=NULL",
                (device_id, user_id, cert_serial, token_sha256, at),
            )
        return {
            "device": device_id,
            "user": user_id,
            "serial": cert_serial,
            "replaced_serial": None if old is None else str(old[1]),
            "was_revoked": old is not None and old[2] is not None,
        }

    async def enroll_many(self, devices: Sequence[tuple[str, str, str, str]], at: float) -> int:
        """Record many new devices in one transaction: (user id, device id, certificate
        serial, token sha256) each, as `enroll` does one by one without `replace`. Refuses
        (and records none) if a user is unknown or a device is already enrolled; the
        simulator enrolls its whole fleet so (`addin-sim run --tls`)."""
        for _, device_id, _, _ in devices:
            checked_device_id(device_id)
        users = sorted({d[0] for d in devices})
        ids = [d[1] for d in devices]
        async with self.database.write() as conn:
            for start in range(0, len(users), 500):
                chunk = users[start : start + 500]
                cur = await conn.execute(
                    f"SELECT id FROM users WHERE id IN ({','.join('?' * len(chunk))})", chunk
                )
                missing = set(chunk) - {str(r[0]) for r in await cur.fetchall()}
                if missing:
                    raise NotFound(
                        f"unknown user {min(missing)!r}: add it first (`addin-server user add`)"
                    )
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                cur = await conn.execute(
                    "SELECT device_id, user_id, revoked_at FROM devices WHERE device_id IN "
                    f"({','.join('?' * len(chunk))})",
                    chunk,
                )
                old = await cur.fetchone()
                if old is not None:
                    _refuse(str(old[0]), str(old[1]), old[2])
            await conn.executemany(
                "INSERT INTO devices(device_id, user_id, cert_serial, token_sha256, enrolled_at, "
                "revoked_at) VALUES (?,?,?,?,?,NULL)",
                [(device, user, serial, token, at) for user, device, serial, token in devices],
            )
        return len(devices)

    async def refuse_enrolled(self, device_id: str) -> None:
        """Conflict if `device_id` has been enrolled (revoked or not)."""
        rows = await self.database.rows(
            "SELECT user_id, revoked_at FROM devices WHERE device_id=?", (device_id,)
        )
        if rows:
            _refuse(device_id, str(rows[0][0]), rows[0][1])

    async def revoke(self, device_id: str, at: float) -> dict[str, Any]:
        """Mark `device_id` revoked and its certificate serial for the CRL. Revoking a
        revoked device changes nothing (and says so), so a revoke whose broker reload
        failed can simply be run again."""
        async with self.database.write() as conn:
            cur = await conn.execute(
                "SELECT user_id, cert_serial, revoked_at FROM devices WHERE device_id=?",
                (device_id,),
            )
            row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no enrolled device {device_id!r} (see `addin-server device list`)")
            if row[2] is None:
                await conn.execute(
                    "UPDATE devices SET revoked_at=? WHERE device_id=?", (at, device_id)
                )
            await conn.execute(
                "INSERT INTO revoked_certs(cert_serial, device_id, revoked_at) "
                "VALUES (?,?,?) ON CONFLICT DO NOTHING",
                (row[1], device_id, row[2] if row[2] is not None else at),
            )
        return {
            "device": device_id,
            "user": str(row[0]),
            "serial": str(row[1]),
            "revoked_at": row[2] if row[2] is not None else at,
            "already_revoked": row[2] is not None,
        }

    async def revoked_serials(self) -> list[tuple[str, float]]:
        rows = await self.database.rows("SELECT cert_serial, revoked_at FROM revoked_certs")
        return [(str(r[0]), float(r[1])) for r in rows]

    async def active(self) -> list[tuple[str, str]]:
        """(device id, user id) of every device not revoked, by device id."""
        rows = await self.database.rows(
            "SELECT device_id, user_id FROM devices WHERE revoked_at IS NULL ORDER BY device_id"
        )
        return [(str(r[0]), str(r[1])) for r in rows]

    async def listing(self) -> list[dict[str, Any]]:
        rows = await self.database.rows(
            "SELECT device_id, user_id, cert_serial, enrolled_at, revoked_at FROM devices "
            "ORDER BY user_id, device_id"
        )
        return [
            {"device": r[0], "user": r[1], "serial": r[2], "enrolled_at": r[3], "revoked_at": r[4]}
            for r in rows
        ]

    async def user_of_token(self, token: bytes) -> str | None:
        """The user of the unrevoked device whose token this is; None for any other token."""
        rows = await self.database.rows(
            "SELECT user_id FROM devices WHERE token_sha256=? AND revoked_at IS NULL",
            (token_hash(token),),
        )
        return str(rows[0][0]) if rows else None
