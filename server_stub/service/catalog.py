"""The catalog: LOB and Store add-ins, their versions, consent, turning on and off, removal.

Manifest bytes are stored by content hash and never deleted. An update whose hosts or
permissions differ from the consented version waits (``pending_version``) until an admin
gives `consent`; until then agents keep getting the consented one, and the catalog entry names
the waiting one as ``withheld`` (shown by `why`, never installed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from addin_core.manifest import (
    MAX_MANIFEST_BYTES,
    Manifest,
    hosts_or_permissions_changed,
    parse_manifest,
    read_manifest,
)
from addin_core.protocol import Host, Source, Topic
from addin_core.version import compare_versions, parse_version
from server_stub.service.errors import Conflict, InvalidManifest, NotFound
from server_stub.service.lookup import need
from server_stub.service.messages import assign_topic, emit_catalog
from server_stub.service.unit_of_work import Tx, UnitOfWork
from server_stub.store import StoreAddin, StoreCatalog, StoreError

DEFAULT_MAX_ADDINS = 200


def checked_manifest(content: bytes) -> Manifest:
    """The manifest in `content`, or InvalidManifest listing what is wrong with it."""
    if len(content) > MAX_MANIFEST_BYTES:
        raise InvalidManifest(
            f"manifest is {len(content)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes (512 KB)"
        )
    report = read_manifest(content)
    if not report.valid or report.manifest is None:
        findings = [str(e) for e in report.errors]
        raise InvalidManifest(
            "invalid manifest: " + ("; ".join(findings) or "unreadable"), findings=findings
        )
    return report.manifest


async def _highest_version(tx: Tx, addin_id: str) -> str:
    versions = [r[0] for r in await tx.rows(
        "SELECT version FROM addin_versions WHERE addin_id=?", (addin_id,))]  # fmt: skip
    return max(versions, key=parse_version)


class Catalog:
    def __init__(
        self, uow: UnitOfWork, store: StoreCatalog, max_addins: int = DEFAULT_MAX_ADDINS
    ) -> None:
        self.uow = uow
        self.database = uow.database
        self.store = store
        self.max_addins = max_addins

    def store_addin(self, asset_id: str) -> StoreAddin:
        try:
            return self.store.get(asset_id)
        except StoreError as e:
            raise NotFound(str(e)) from None

    async def published_version(self, tx: Tx, asset: StoreAddin) -> str:
        r = await tx.row("SELECT version FROM store_published WHERE asset_id=?", (asset.asset_id,))
        return str(r[0]) if r else str(asset.published)

    async def _store_version(
        self, tx: Tx, addin_id: str, manifest: Manifest, content: bytes
    ) -> None:
        sha = hashlib.sha256(content).hexdigest()
        await tx.execute(
            "INSERT INTO manifests(sha256, content) VALUES (?, ?) ON CONFLICT DO NOTHING", (sha, content)
        )
        await tx.execute(
            "INSERT INTO addin_versions(addin_id, version, sha256, display_name, "
            "hosts, permissions, added_revision) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(addin_id, version) DO UPDATE SET sha256=excluded.sha256, "
            "display_name=excluded.display_name, hosts=excluded.hosts, "
            "permissions=excluded.permissions, added_revision=excluded.added_revision",
            (
                addin_id,
                manifest.version,
                sha,
                (manifest.display_name or addin_id)[:250],
                json.dumps([str(Host(h)) for h in manifest.hosts]),
                str(getattr(manifest.permissions, "value", manifest.permissions)),
                tx.revision,
            ),
        )

    async def add_or_update(
        self,
        tx: Tx,
        manifest: Manifest,
        content: bytes,
        source: Source,
        asset_id: str | None,
        *,
        stage: bool = False,
    ) -> dict[str, Any]:
        """Add the add-in, or make `manifest` its next version (current, or waiting for
        consent); with `stage`, only store it, for a rollout to deploy ring by ring."""
        addin_id = manifest.id
        existing = await tx.row("SELECT * FROM addins WHERE id=?", (addin_id,))
        if existing is None and stage:
            raise NotFound(
                f"add-in {addin_id} is not in the catalog: add it first; --staged stores a "
                "further version of an add-in for `addin-server rollout start`"
            )
        if existing is None:
            (count,) = await tx.row("SELECT count(*) FROM addins") or (0,)
            if count >= self.max_addins:
                raise Conflict(
                    f"the tenant already holds {count} add-ins, the limit is {self.max_addins}; "
                    "remove one first"
                )
            await tx.execute(
                "INSERT INTO addins(id, source, store_asset_id, enabled, current_version, "
                "created_revision) VALUES (?,?,?,1,?,?)",
                (addin_id, source.value, asset_id, manifest.version, tx.revision),
            )
            await self._store_version(tx, addin_id, manifest, content)
            await emit_catalog(tx, addin_id)
            return {"addin_id": addin_id, "version": manifest.version, "state": "current"}
        if existing["source"] != source.value:
            raise Conflict(
                f"add-in {addin_id} is already in the catalog as a {existing['source']} add-in"
            )
        deployed = existing["pending_version"] or existing["current_version"]
        which = "version waiting for consent" if existing["pending_version"] else "deployed version"
        staged = await _highest_version(tx, addin_id)
        if compare_versions(staged, deployed) > 0:
            deployed, which = staged, "highest stored (staged) version"
        if compare_versions(manifest.version, deployed) <= 0:
            raise Conflict(
                f"add-in {addin_id}: version {manifest.version} is not greater than the {which} "
                f"{deployed}; an update needs a strictly greater <Version>"
            )
        if stage:
            await self._store_version(tx, addin_id, manifest, content)
            return {"addin_id": addin_id, "version": manifest.version, "state": "staged"}
        active = await tx.row(
            "SELECT id, version FROM rollouts WHERE addin_id=? AND state IN ('running','paused')",
            (addin_id,),
        )
        if active is not None:
            raise Conflict(
                f"add-in {addin_id} has rollout {active[0]} of version {active[1]} in progress: "
                "abort it or let it finish before uploading a version for everyone "
                "(or add this one with --staged and roll it out next)"
            )
        return await self._update(tx, manifest, content, existing["current_version"])

    async def _update(
        self, tx: Tx, manifest: Manifest, content: bytes, current_version: str
    ) -> dict[str, Any]:
        addin_id = manifest.id
        cur = await tx.row(
            "SELECT m.content FROM addin_versions v JOIN manifests m ON m.sha256=v.sha256 "
            "WHERE v.addin_id=? AND v.version=?",
            (addin_id, current_version),
        )
        assert cur is not None
        old = parse_manifest(bytes(cur[0]))
        await self._store_version(tx, addin_id, manifest, content)
        if hosts_or_permissions_changed(old, manifest):
            # Escalation path: keep serving the consented version until `consent`.
            await tx.execute(
                "UPDATE addins SET pending_version=? WHERE id=?", (manifest.version, addin_id)
            )
            # The entry keeps the consented version and names the withheld one.
            await emit_catalog(tx, addin_id)
            return {"addin_id": addin_id, "version": manifest.version, "state": "needs_consent"}
        await tx.execute(
            "UPDATE addins SET current_version=?, pending_version=NULL WHERE id=?",
            (manifest.version, addin_id),
        )
        # A newer version for everyone: stopped rollouts' rings no longer apply.
        await tx.execute(
            "UPDATE rollouts SET state='superseded', updated_revision=? WHERE addin_id=? "
            "AND state='aborted'",
            (tx.revision, addin_id),
        )
        await emit_catalog(tx, addin_id)
        return {"addin_id": addin_id, "version": manifest.version, "state": "current"}

    async def add_lob(self, content: bytes, staged: bool = False) -> dict[str, Any]:
        manifest = checked_manifest(content)
        detail = {"id": manifest.id, "version": manifest.version, "staged": staged}
        async with self.uow.write("add_lob", detail) as tx:
            result = await self.add_or_update(
                tx, manifest, content, Source.LOB, None, stage=staged
            )
        return {**result, "revision": tx.revision}

    async def add_store(self, asset_id: str) -> dict[str, Any]:
        asset = self.store_addin(asset_id)
        async with self.uow.write("add_store", {"asset_id": asset_id}) as tx:
            if await tx.row("SELECT id FROM addins WHERE store_asset_id=?", (asset_id,)):
                raise Conflict(f"store add-in {asset_id} is already in the catalog")
            content = asset.manifest(await self.published_version(tx, asset))
            manifest = checked_manifest(content)
            result = await self.add_or_update(tx, manifest, content, Source.STORE, asset_id)
        return {**result, "store_asset_id": asset_id, "revision": tx.revision}

    async def store_publish(self, asset_id: str, version: str | None = None) -> dict[str, Any]:
        """The Store releases `version` (default: the newest in the catalog folder).

        A tenant that has the add-in gets it as current automatically, unless its hosts or
        permissions changed (then it waits for consent like any update)."""
        asset = self.store_addin(asset_id)
        versions = asset.versions()
        version = version or versions[-1]
        if version not in versions:
            raise NotFound(
                f"store add-in {asset_id} has no version {version!r}; available: "
                + ", ".join(versions)
            )
        async with self.uow.write(
            "store_publish", {"asset_id": asset_id, "version": version}
        ) as tx:
            current = await self.published_version(tx, asset)
            if compare_versions(version, current) <= 0:
                raise Conflict(
                    f"store add-in {asset_id}: version {version} is not greater than the "
                    f"published version {current}"
                )
            await tx.execute(
                "INSERT INTO store_published(asset_id, version) VALUES (?, ?) "
                "ON CONFLICT(asset_id) DO UPDATE SET version=excluded.version",
                (asset_id, version),
            )
            result: dict[str, Any] = {"asset_id": asset_id, "version": version, "state": None}
            if await tx.row("SELECT id FROM addins WHERE store_asset_id=?", (asset_id,)):
                content = asset.manifest(version)
                manifest = checked_manifest(content)
                upd = await self.add_or_update(tx, manifest, content, Source.STORE, asset_id)
                result.update(addin_id=upd["addin_id"], state=upd["state"])
        return {**result, "revision": tx.revision}

    async def consent(self, addin_id: str) -> dict[str, Any]:
        async with self.uow.write("consent", {"id": addin_id}) as tx:
            a = await need(self.database, tx, "addins", addin_id, "add-in")
            if not a["pending_version"]:
                raise Conflict(f"add-in {addin_id} has no version waiting for consent")
            await tx.execute(
                "UPDATE addins SET current_version=pending_version, pending_version=NULL "
                "WHERE id=?",
                (addin_id,),
            )
            await emit_catalog(tx, addin_id)
        return {
            "addin_id": addin_id,
            "version": a["pending_version"],
            "state": "current",
            "revision": tx.revision,
        }

    async def set_enabled(self, addin_id: str, enabled: bool) -> dict[str, Any]:
        async with self.uow.write("enable" if enabled else "disable", {"id": addin_id}) as tx:
            await need(self.database, tx, "addins", addin_id, "add-in")
            await tx.execute("UPDATE addins SET enabled=? WHERE id=?", (int(enabled), addin_id))
            await emit_catalog(tx, addin_id)
        return {"addin_id": addin_id, "enabled": enabled, "revision": tx.revision}

    async def remove_addin(self, addin_id: str) -> dict[str, Any]:
        async with self.uow.write("remove", {"id": addin_id}) as tx:
            await need(self.database, tx, "addins", addin_id, "add-in")
            for r in await tx.rows(
                "SELECT target, target_id FROM assignments WHERE addin_id=?", (addin_id,)
            ):
                tx.tombstone(assign_topic(tx.tenant, addin_id, r[0], r[1]))
            tx.tombstone(Topic.catalog(tx.tenant, addin_id))
            await tx.execute("DELETE FROM addins WHERE id=?", (addin_id,))
        return {"addin_id": addin_id, "deleted": True, "revision": tx.revision}
