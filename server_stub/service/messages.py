"""Payload builders: the full-state MQTT message of a user, group, add-in or assignment,
read from the state inside the unit of work that changed it."""

from __future__ import annotations

import json

from addin_core.protocol import (
    CatalogEntry,
    GroupParents,
    Host,
    Membership,
    RingVersion,
    Source,
    Topic,
    WithheldVersion,
)
from server_stub.rollout_rules import OpenRollout, Ring, catalog_rings
from server_stub.service.unit_of_work import Tx


async def emit_membership(tx: Tx, user_id: str) -> None:
    rows = await tx.rows(
        "SELECT group_id FROM memberships WHERE user_id=? ORDER BY group_id", (user_id,)
    )
    tx.emit(
        Topic.member(tx.tenant, user_id),
        Membership(groups=[r[0] for r in rows], revision=tx.revision, committed_at=tx.now),
    )


async def emit_parents(tx: Tx, group_id: str) -> None:
    rows = await tx.rows("SELECT parent FROM nesting WHERE child=? ORDER BY parent", (group_id,))
    tx.emit(
        Topic.group_parents(tx.tenant, group_id),
        GroupParents(parents=[r[0] for r in rows], revision=tx.revision, committed_at=tx.now),
    )


async def emit_catalog(tx: Tx, addin_id: str) -> None:
    r = await tx.row(
        "SELECT a.id, a.source, a.store_asset_id, a.enabled, v.version, v.sha256, "
        "v.display_name, v.hosts, v.permissions, w.version AS w_version, w.hosts AS w_hosts, "
        "w.permissions AS w_permissions FROM addins a JOIN addin_versions v "
        "ON v.addin_id=a.id AND v.version=a.current_version "
        "LEFT JOIN addin_versions w ON w.addin_id=a.id AND w.version=a.pending_version "
        "WHERE a.id=?",
        (addin_id,),
    )
    assert r is not None
    rings, rollback = await _rollout_state(tx, addin_id, r["version"])
    tx.emit(
        Topic.catalog(tx.tenant, addin_id),
        CatalogEntry(
            addin_id=r["id"],
            name=r["display_name"],
            source=Source(r["source"]),
            version=r["version"],
            manifest_sha256=r["sha256"],
            manifest_url=f"/v1/manifests/{r['sha256']}",
            hosts=[Host(h) for h in json.loads(r["hosts"])],
            permissions=r["permissions"],
            enabled=bool(r["enabled"]),
            store_asset_id=r["store_asset_id"],
            # A version waiting for consent is shown (so `why` can say why the user keeps
            # the old one), never offered: it carries no manifest hash or URL.
            withheld=WithheldVersion(
                version=r["w_version"],
                permissions=r["w_permissions"],
                hosts=[Host(h) for h in json.loads(r["w_hosts"])],
            )
            if r["w_version"]
            else None,
            rings=rings or None,
            rollback=rollback,
            revision=tx.revision,
            committed_at=tx.now,
        ),
    )


async def _rollout_state(
    tx: Tx, addin_id: str, base: str
) -> tuple[list[RingVersion], int | None]:
    """The rings of the add-in's open rollouts (first match wins), and the revision of the
    rollback that made `base` its version, if one did."""
    opened = []
    for x in await tx.rows(
        "SELECT * FROM rollouts WHERE addin_id=? AND state IN ('running','paused','aborted')",
        (addin_id,),
    ):
        rings = tuple(Ring(i["name"], tuple(i["targets"])) for i in json.loads(x["rings"]))
        opened.append(OpenRollout(int(x["id"]), x["version"],
                                  int(x["started_revision"]) if x["rollback"] else None,
                                  rings, int(x["reached"])))  # fmt: skip
    versions = {
        v["version"]: v
        for v in await tx.rows(
            "SELECT version, sha256, hosts, permissions FROM addin_versions WHERE addin_id=?",
            (addin_id,),
        )
    }
    out = []
    for ring, ro in catalog_rings(opened):
        v = versions[ro.version]
        out.append(
            RingVersion(
                ring=ring.name,
                targets=list(ring.targets),
                version=ro.version,
                manifest_sha256=v["sha256"],
                manifest_url=f"/v1/manifests/{v['sha256']}",
                hosts=[Host(h) for h in json.loads(v["hosts"])],
                permissions=v["permissions"],
                rollback=ro.rollback_revision,
            )
        )
    back = await tx.row(
        "SELECT started_revision FROM rollouts WHERE addin_id=? AND state='completed' "
        "AND rollback=1 AND version=? ORDER BY id DESC LIMIT 1",
        (addin_id, base),
    )
    return out, int(back[0]) if back else None


def assign_topic(tenant: str, addin_id: str, target: str, target_id: str) -> Topic:
    if target == "everyone":
        return Topic.assign_everyone(tenant, addin_id)
    if target == "group":
        return Topic.assign_group(tenant, target_id, addin_id)
    return Topic.assign_user(tenant, target_id, addin_id)
