"""The server's side of anti-entropy: one user's digest and retained state.

An agent periodically asks ``GET /v1/agents/{user}/digest`` and compares the answer with
the digest of what it resolved itself; on a mismatch it asks ``GET /v1/agents/{user}/state``
for the retained messages it should hold and feeds them through its normal,
revision-ordered message path.

The digest is computed from the DATABASE with the server's own resolver
(`server_stub.entitlement`), not from the `retained` table, so it checks the agent's
resolver against an independent one. `/state` returns the `retained` rows (the exact bytes
published: signed here as the publisher signs them, `server_stub/signer.py`), filtered like
the agent's subscriptions: tenant-wide topics, the user's own ``member/`` and
``assign/user/`` topics, and for every group in the user's ancestry
(nesting followed whatever the policy, like the agent) its ``parents`` and ``assign/group``
topics. Both reads run in one read transaction, so the revision returned is the one the
answer was computed at, even while other processes (the CLI) write.
"""

from __future__ import annotations

from typing import Any

from addin_core.digest import EntitlementDigest, entitlement_digest
from addin_core.protocol import Mode
from addin_core.user_topics import matches, split_filters, user_filters
from server_stub.entitlement import effective_mode, exclusion, group_paths, paths_for_user
from server_stub.rollout_rules import catalog_rings, version_for
from server_stub.service import Service
from server_stub.service.errors import checked_id


async def user_digest(service: Service, user_id: str) -> dict[str, Any]:
    """The digest of `user_id`'s entitlements as the server resolves them now.

    Entitled = enabled add-in whose consented (current) version lists at least one host,
    with an assignment that counts under the nesting policy; the strongest mode wins.
    """
    user_id = checked_id(user_id, "user id")
    async with service.agent_snapshot() as snap:
        revision = await snap.revision()
        nested = await snap.nested_groups()
        known = await snap.user_exists(user_id)
        direct = await snap.direct_groups(user_id)
        parents = await snap.parents()
        addins = await snap.enabled_current_versions()
        by_addin = await snap.assignments_reaching(user_id, sorted(group_paths(direct, parents)))
        rollouts = await snap.open_rollouts()
    groups = set(group_paths(direct, parents)) if nested else set(direct)
    lines: list[tuple[str, Mode, str]] = []
    for addin_id, rows in by_addin.items():
        if addin_id not in addins:
            continue  # turned off (or an orphan row): not entitled anywhere
        version, hosts = addins[addin_id]
        if not hosts:
            continue  # shows in no host app: the agent's resolver drops it too
        paths = paths_for_user(user_id, direct, parents, rows, nested)
        if exclusion(user_id, paths, direct, parents, nested) is not None:
            continue
        mode = effective_mode(paths)
        if mode is not None:
            rings = catalog_rings(rollouts.get(addin_id, []))
            lines.append((addin_id, mode, version_for(version, rings, user_id, groups)[0]))
    d: EntitlementDigest = entitlement_digest(lines, revision)
    return {**d.to_json(user_id), "known_user": known}


async def user_state(service: Service, user_id: str) -> dict[str, Any]:
    """The retained messages (tombstones included) an agent of `user_id` should hold."""
    user_id = checked_id(user_id, "user id")
    async with service.agent_snapshot() as snap:
        revision = await snap.revision()
        paths = group_paths(await snap.direct_groups(user_id), await snap.parents())
        exact, prefixes = split_filters(user_filters(service.tenant, user_id, paths))
        rows = await snap.retained(exact, prefixes)
    wanted = set(exact)
    sign = service.signer.sign if service.signer is not None else (lambda _t, p: p)
    messages = [
        {"topic": topic, "revision": rev, "payload": sign(topic, payload).decode("utf-8")}
        for topic, rev, payload in rows
        # A `+` filter matches one level only: a deeper topic under a prefix is not the agent's.
        if topic in wanted or any(matches(p + "+", topic) for p in prefixes)
    ]
    return {"user_id": user_id, "revision": revision, "messages": messages}
