"""The deployment service: every admin operation and read of one tenant.

`Service` is the facade the HTTP API (`server_stub/api/`), the CLI (`server_stub/cli/`),
anti-entropy and the publisher's report intake call. Behind it, one module per concept:

- `unit_of_work`: one change = one transaction (revision, audit, outbox, retained);
- `messages`: the full-state MQTT payloads a change emits;
- `directory`, `catalog`, `assignments`, `org_load`: the writes;
- `devices`: enrolled devices, their token hashes and revocation (credentials, not state);
- `reads`, `troubleshooting` (explain, status), `agent_state` (anti-entropy's reads);
- `audit`: the audit log's reads (each change writes its line in `unit_of_work`);
- `lookup`: finding things by what an admin typed; `errors`: refusals.

A change for a group or for Everyone is one message; nothing here loops over users to
notify them (the broker fans out). A refused operation raises an `OperationError` and
changes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from addin_core.protocol import AgentReport, check_id
from addin_runtime.logs import context
from server_stub.db import Database
from server_stub.service.agent_state import AgentStateReader, agent_snapshot
from server_stub.service.assignments import Assignments
from server_stub.service.audit import AuditLog
from server_stub.service.catalog import DEFAULT_MAX_ADDINS, MAX_MANIFEST_BYTES, Catalog
from server_stub.service.declarative import Declarative
from server_stub.service.devices import Devices
from server_stub.service.directory import Directory
from server_stub.service.errors import (
    BadRequest,
    Conflict,
    InvalidManifest,
    NotFound,
    OperationError,
)
from server_stub.service.lookup import find_addin
from server_stub.service.org_load import OrgLoader
from server_stub.service.reads import Reads
from server_stub.service.rollouts import Rollouts
from server_stub.service.troubleshooting import Troubleshooting
from server_stub.service.unit_of_work import UnitOfWork
from server_stub.signer import StateSigner
from server_stub.store import StoreCatalog

log = logging.getLogger("addin_server.reports")

__all__ = [
    "DEFAULT_MAX_ADDINS",
    "MAX_MANIFEST_BYTES",
    "BadRequest",
    "Conflict",
    "InvalidManifest",
    "NotFound",
    "OperationError",
    "Service",
]


class Service:
    """All admin operations and reads of one tenant, over one `Database`."""

    def __init__(
        self,
        database: Database,
        tenant: str,
        *,
        store: StoreCatalog | None = None,
        max_addins: int = DEFAULT_MAX_ADDINS,
        admin_user: str | None = None,
        actor: str = "admin",
        on_commit: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.enrolled_reports_only = False
        """Set by `serve --pki`: reports only from enrolled, unrevoked devices of their user."""
        self.tenant = check_id(tenant, "tenant id")
        self.clock = clock
        self.signer: StateSigner | None = None
        """Signs state payloads on their way out (anti-entropy's ``/state``), with the key
        the publisher signs with; set by ``serve``. None: they go out unsigned."""
        self._uow = UnitOfWork(database, self.tenant, actor=actor, on_commit=on_commit, clock=clock)
        self._directory = Directory(self._uow)
        self._catalog = Catalog(self._uow, store or StoreCatalog(), max_addins)
        self._assignments = Assignments(self._uow, admin_user)
        self._org = OrgLoader(self._uow, self._catalog, admin_user)
        self._declarative = Declarative(self._uow, self._catalog, self._org, admin_user)
        self._reads = Reads(database)
        self.devices = Devices(database)
        self.audit = AuditLog(database)
        self._troubleshooting = Troubleshooting(database, self._reads)
        self.rollouts = Rollouts(self._uow, clock)
        """Rollouts and rollbacks: start, advance, pause, resume, abort, the gate's tick."""
        # Each operation and read under the name the API and the CLI call, bound to the
        # object of the module that owns it (directory, catalog, assignments, org_load...).
        d, c, a = self._directory, self._catalog, self._assignments
        self.create_user, self.delete_user = d.create_user, d.delete_user
        self.create_group, self.delete_group = d.create_group, d.delete_group
        self.add_member, self.remove_member = d.add_member, d.remove_member
        self.nest, self.unnest, self.set_policy = d.nest, d.unnest, d.set_policy
        self.add_lob, self.add_store, self.store_publish = c.add_lob, c.add_store, c.store_publish
        self.consent, self.set_enabled, self.remove_addin = c.consent, c.set_enabled, c.remove_addin
        self.assign, self.unassign = a.assign, a.unassign
        self.load_org = self._org.load_org
        decl = self._declarative
        self.plan_org, self.apply_org, self.export_org = decl.plan, decl.apply, decl.export
        self.plan_directory, self.sync_directory = decl.plan_directory, decl.sync_directory
        r, t = self._reads, self._troubleshooting
        self.list_addins, self.get_addin = r.list_addins, r.get_addin
        self.get_user, self.get_group, self.nested_groups = r.get_user, r.get_group, r.nested_groups
        self.explain, self.status = t.explain, t.status
        self.revision, self.manifest = database.revision, database.manifest
        self.outbox_waiting, self.outbox_backlog = database.outbox_waiting, database.outbox_backlog
        self.user_ids = database.user_ids

    @property
    def actor(self) -> str:
        """Who the audit log names for this service's changes (cli, api...)."""
        return self._uow.actor

    @actor.setter
    def actor(self, value: str) -> None:
        self._uow.actor = value

    def act_as_server(self) -> None:
        """Changes made outside any request (none today, or a timer's) name the server."""
        self._uow.actor, self._uow.via = "server", "server"

    @property
    def on_commit(self) -> Callable[[int], None] | None:
        """Called with the revision after each commit (the publisher's `wake`)."""
        return self._uow.on_commit

    @on_commit.setter
    def on_commit(self, value: Callable[[int], None] | None) -> None:
        self._uow.on_commit = value

    async def close(self) -> None:
        await self.database.close()

    async def find_addin(self, name_or_id: str) -> str:
        """An add-in id from what an admin typed: its id, or its display name (any case)."""
        return await find_addin(self.database, name_or_id)

    def agent_snapshot(self) -> AbstractAsyncContextManager[AgentStateReader]:
        """One read transaction for anti-entropy's reads of one user."""
        return agent_snapshot(self.database)

    async def record_reports(self, reports: Sequence[AgentReport]) -> None:
        """Store a batch of reports in one transaction. After a rollout thousands of agents
        report within a second; one commit each kept the server busy while the next change
        was fanning out. A report with a lower revision never replaces a higher one (at
        equal revision the later received wins); a report claiming another user than the
        one its client id is bound to is refused and logged."""
        if not reports:
            return
        now = self.clock()
        refused = await self.database.record_reports(
            [
                (
                    r.client_id,
                    r.user_id,
                    r.revision,
                    r.reported_at,
                    now,
                    json.dumps([a.model_dump(mode="json") for a in r.applied]),
                    json.dumps(list(r.errors)),
                    json.dumps([f.model_dump(mode="json") for f in r.failed or ()]),
                    json.dumps([a.model_dump(mode="json") for a in r.cached]),
                )
                for r in reports
            ],
            enrolled_only=self.enrolled_reports_only,
        )
        try:
            await self._troubleshooting.reports.catch_up()
        except Exception:
            # The reports are stored; `status` catches up on its next call.
            log.exception("could not fold the reports just stored into the status summary")
        for client_id, claimed, why in refused:
            log.warning(
                "refused a report from client %r claiming user %r: %s",
                client_id,
                claimed,
                why,
                extra=context(user=claimed, device=client_id),
            )
