"""The periodic directory sync of `serve` ([directory] interval in server.toml): read LDAP in
a thread, apply the differences as one revision through the running server's service (so the
publisher sends them at once), sleep, again. A failed read or a refused sync (too many
removals, the database busy or failing) is logged and retried at the next interval; it
never stops the server, nor the syncs after it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from addin_runtime.logs import context
from server_stub.db import TRANSIENT_ERRORS
from server_stub.ldap_directory import LdapError, LdapSettings, read_directory
from server_stub.service import OperationError, Service

log = logging.getLogger("addin_server.directory_sync")


async def sync_once(service: Service, settings: LdapSettings, max_removal_share: float) -> None:
    try:
        data = await asyncio.to_thread(read_directory, settings)
        result = await service.sync_directory(data, max_removal_share=max_removal_share)
    except LdapError as e:
        log.warning("directory sync: %s", e)
        return
    except OperationError as e:
        log.error("directory sync refused: %s", e.message)
        return
    except TRANSIENT_ERRORS as e:
        log.warning("directory sync: the database could not be written (%s); not synced", e)
        return
    for line in data.skipped:
        log.warning("directory sync skipped %s", line)
    if result["revision"] is not None:
        log.info(
            "directory sync: revision %d: %d to add, %d to change, %d to remove",
            result["revision"],
            result["add"],
            result["change"],
            result["remove"],
            extra=context(revision=result["revision"], operation="directory_sync"),
        )


async def sync_forever(
    service: Service,
    settings: LdapSettings,
    interval: float,
    max_removal_share: float,
    leader: Callable[[], bool] = lambda: True,
) -> None:
    """Until cancelled: a sync at start, then one every `interval` seconds, each only while
    `leader()` (on PostgreSQL, the one replica that holds the outbox syncs)."""
    while True:
        if leader():
            try:
                await sync_once(service, settings, max_removal_share)
            except Exception:
                # Whatever broke this round (a bug, an error of a kind not foreseen), the
                # next one is tried: an exception here ended the task, and with it every
                # later sync, with nothing in the log until the server stopped.
                log.exception("directory sync failed; tried again in %g s", interval)
        await asyncio.sleep(interval)
