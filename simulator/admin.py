"""The scenario's admin actions: each goes to the server's HTTP admin API and, once the server
accepted it, to the oracle (`simulator.oracle`), which keeps the ground truth."""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import httpx

from addin_core.protocol import Host, Mode
from simulator.oracle import AdminAction, GroundTruth
from simulator.orggen import Org, addin_guid, make_manifest
from simulator.results import RunError, StepResult
from simulator.scenario import Scenario

Args = Mapping[str, Any]


class AdminActions:
    """Admin actions on the server and in the oracle, by the scenario's names."""

    def __init__(self, scenario: Scenario, seed: int, org: Org, truth: GroundTruth) -> None:
        self.scenario = scenario
        self.seed = seed
        self.org = org
        self.truth = truth
        self.addin_ids = {a: addin_guid(a, seed) for a in scenario.addins}
        self.addin_state: dict[str, dict[str, Any]] = {
            a: {
                "version": s.version,
                "hosts": [str(h) for h in s.hosts],
                "permissions": s.permissions,
            }
            for a, s in scenario.addins.items()
        }
        self.disagreements: list[str] = []
        """Where the server's answer differed from the oracle's."""
        self.retries = 0
        """Admin API calls sent again because the server was unreachable (a restart)."""
        self.rollout_ids: dict[str, int] = {}
        """The last rollout started per add-in id."""
        self.reached: dict[str, int] = {}
        """Rings of that rollout the oracle knows reached (beyond its first)."""
        self.manifests: list[str] = []
        """The sha256 of every manifest uploaded, in order (the download baseline GETs one)."""
        self._http: httpx.AsyncClient | None = None
        self._ops: dict[str, Callable[[str, Args], Awaitable[dict[str, Any]]]] = {
            "upload": self._upload,
            "assign": self._assignment,
            "unassign": self._assignment,
            "consent": self._addin_switch,
            "enable": self._addin_switch,
            "disable": self._addin_switch,
            "remove": self._remove,
            "add_member": self._membership,
            "remove_member": self._membership,
            "add_parent": self._nesting,
            "remove_parent": self._nesting,
            "policy": self._policy,
            "rollout": self._rollout,
            "rollback": self._rollout,
            "rollout_advance": self._rollout_advance,
            "rollout_wait": self._rollout_wait,
        }

    def open(self, server_url: str, admin_token: str, verify: ssl.SSLContext | bool = True) -> None:
        self._http = httpx.AsyncClient(
            base_url=server_url,
            verify=verify,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=60,
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("the admin API client is not open")
        return self._http

    async def load_org(self) -> None:
        r = await self.http.post("/v1/org", json=self.org.to_document())
        if r.status_code >= 400:
            raise RunError(f"POST /v1/org: {r.status_code} {r.text[:300]}")

    async def apply(self, item: Args, step: StepResult | None) -> list[int]:
        """Do one admin action on the server and in the oracle; return the revisions."""
        ((op, a),) = item.items()
        if op == "churn":
            return await self._churn(a, step)
        handler = self._ops.get(op)
        if handler is None:
            raise RunError(f"unknown admin action {op!r}")
        res = await handler(op, a)
        rev = int(res.get("revision", 0))
        if step is not None and rev:
            step.revisions.append(rev)
        return [rev] if rev else []

    # -- references in a scenario -------------------------------------------------------------
    def group(self, ref: str) -> str:
        if ref.startswith("@rank:"):
            return self.org.groups_by_size()[int(ref[6:])].id
        if ref == "@child":
            for g in self.org.groups:
                if g.parents:
                    return g.id
            raise RunError("@child: the organisation has no nested group (nesting_depth 0)")
        return ref

    def user(self, ref: str) -> str:
        if ref.startswith("@user:"):
            return self.org.users[int(ref[6:])]
        return ref

    def target(self, target: str) -> tuple[str, str | None]:
        if target == "everyone":
            return "everyone", None
        kind, _, ref = target.partition(":")
        if kind == "group":
            return "group", self.group(ref)
        if kind == "user":
            return "user", self.user(ref)
        raise RunError(f"target {target!r}: use everyone, group:ID or user:ID")

    def _addin_id(self, a: Args) -> str:
        alias = a.get("addin")
        return self.addin_ids.get(alias, "") if alias else ""

    # -- the actions --------------------------------------------------------------------------
    async def _churn(self, a: Args, step: StepResult | None) -> list[int]:
        group = self.group(a["group"])
        rng = random.Random(f"{self.seed}:{a.get('seed', 0)}:{group}")
        members = sorted(u for u, g in self.truth.membership if g == group)
        outsiders = sorted(set(self.org.users) - set(members))
        revs: list[int] = []
        for u in rng.sample(members, min(int(a.get("remove", 0)), len(members))):
            revs += await self.apply({"remove_member": {"user": u, "group": group}}, step)
        for u in rng.sample(outsiders, min(int(a.get("add", 0)), len(outsiders))):
            revs += await self.apply({"add_member": {"user": u, "group": group}}, step)
        return revs

    async def _upload(self, op: str, a: Args) -> dict[str, Any]:
        alias: str = a["addin"]
        addin_id = self._addin_id(a)
        st = self.addin_state[alias]
        for k in ("version", "permissions", "hosts"):
            if k in a:
                st[k] = [str(h) for h in a[k]] if k == "hosts" else str(a[k])
        spec = self.scenario.addins[alias]
        xml = make_manifest(
            addin_id,
            name=spec.name or alias,
            version=st["version"],
            hosts=[Host(h) for h in st["hosts"]],
            permissions=st["permissions"],
        )
        staged = bool(a.get("staged", False))
        action = AdminAction("stage" if staged else "upload", {"addin_id": addin_id, **st})
        res = await self._call(
            "POST",
            "/v1/addins" + ("?staged=true" if staged else ""),
            content=xml,
            headers={"Content-Type": "application/xml"},
        )
        self.manifests.append(hashlib.sha256(xml).hexdigest())
        expected = self.truth.apply(action)
        if res.get("state") != expected:
            self.disagreements.append(
                f"upload {alias} {st['version']}: server says {res.get('state')}, oracle {expected}"
            )
        return res

    async def _assignment(self, op: str, a: Args) -> dict[str, Any]:
        addin_id = self._addin_id(a)
        kind, tid = self.target(a["target"])
        body: dict[str, Any] = {"target": kind, "target_id": tid}
        if op == "assign":
            body["mode"] = str(Mode(a["mode"]))
            if a.get("except"):
                body["except"] = [self._ring_target(x) for x in a["except"]]
        res = await self._call("POST", f"/v1/addins/{addin_id}/{op}", json=body)
        self.truth.apply(AdminAction(op, {"addin_id": addin_id, **body}))
        return res

    def _ring_target(self, text: str) -> str:
        """``group:@rank:0`` → ``group:g0007``: a target with its placeholders resolved."""
        kind, tid = self.target(text)
        return "everyone" if kind == "everyone" else f"{kind}:{tid}"

    def _rings(self, a: Args) -> list[str]:
        out = []
        for ring in a.get("rings") or []:
            name, _, targets = str(ring).partition("=")
            out.append(f"{name}=" + "+".join(self._ring_target(t) for t in targets.split("+")))
        return out

    async def _rollout(self, op: str, a: Args) -> dict[str, Any]:
        """`rollout` / `rollback`: start one (a rollback's version is `version`)."""
        addin_id = self._addin_id(a)
        version = str(a["version"])
        body = {"addin": addin_id, "version": version, "rings": self._rings(a),
                "gate": a.get("gate"), "rollback": op == "rollback"}  # fmt: skip
        res = await self._call("POST", "/v1/rollouts", json=body)
        self.rollout_ids[addin_id] = int(res["rollout_id"])
        self.reached[addin_id] = 1
        self.truth.apply(AdminAction("rollback" if op == "rollback" else "rollout_start",
                                     {"addin_id": addin_id, "version": version,
                                      "rings": body["rings"]}))  # fmt: skip
        return res

    async def _rollout_advance(self, op: str, a: Args) -> dict[str, Any]:
        addin_id = self._addin_id(a)
        res = await self._call("POST", f"/v1/rollouts/{self.rollout_ids[addin_id]}/advance")
        self.truth.apply(AdminAction("rollout_advance", {"addin_id": addin_id}))
        self.reached[addin_id] = self.reached.get(addin_id, 1) + 1
        return res

    async def _rollout_wait(self, op: str, a: Args) -> dict[str, Any]:
        """Wait (bounded by `timeout`) until the server's gate advanced the add-in's rollout
        to ring `ring` by itself, then mirror each advance it made into the oracle."""
        addin_id = self._addin_id(a)
        rid = self.rollout_ids[addin_id]
        deadline = time.monotonic() + float(a.get("timeout", 120))
        seen = None
        while time.monotonic() < deadline:
            seen = await self._call("GET", f"/v1/rollouts/{rid}")
            names = [r["name"] for r in seen["rings"] if r["reached"]]
            if a["ring"] in names:
                break
            await asyncio.sleep(0.5)
        else:
            gate = (seen or {}).get("gate_now")
            raise RunError(f"rollout {rid} did not reach ring {a['ring']!r} by its gate in "
                           f"{a.get('timeout', 120)} s (gate now: {gate})")  # fmt: skip
        if a.get("pause"):
            # Paused at once, so the next ring's gate (its wait counts from this advance)
            # cannot move the rollout on while the step's checkpoint compares.
            seen = await self._call("POST", f"/v1/rollouts/{rid}/pause")
            self.truth.apply(AdminAction("rollout_pause", {"addin_id": addin_id}))
        before = self.reached.get(addin_id, 1)
        now = sum(1 for r in seen["rings"] if r["reached"])
        for _ in range(now - before):
            self.truth.apply(AdminAction("rollout_advance", {"addin_id": addin_id}))
        self.reached[addin_id] = now
        # The gate's advance is the step's change (its latencies); a pause publishes nothing.
        advanced = [e["revision"] for e in seen["history"] if e["event"] == "advanced"]
        return {"revision": max(advanced, default=0)}

    async def _addin_switch(self, op: str, a: Args) -> dict[str, Any]:
        addin_id = self._addin_id(a)
        res = await self._call("POST", f"/v1/addins/{addin_id}/{op}")
        self.truth.apply(AdminAction(op, {"addin_id": addin_id}))
        return res

    async def _remove(self, op: str, a: Args) -> dict[str, Any]:
        addin_id = self._addin_id(a)
        res = await self._call("DELETE", f"/v1/addins/{addin_id}")
        self.truth.apply(AdminAction("remove_addin", {"addin_id": addin_id}))
        return res

    async def _membership(self, op: str, a: Args) -> dict[str, Any]:
        g, u = self.group(a["group"]), self.user(a["user"])
        res = await self._call(
            "PUT" if op == "add_member" else "DELETE", f"/v1/groups/{g}/members/{u}"
        )
        self.truth.apply(AdminAction(op, {"user": u, "group": g}))
        return res

    async def _nesting(self, op: str, a: Args) -> dict[str, Any]:
        g, p = self.group(a["group"]), self.group(a["parent"])
        res = await self._call(
            "PUT" if op == "add_parent" else "DELETE", f"/v1/groups/{g}/parents/{p}"
        )
        self.truth.apply(AdminAction(op, {"group": g, "parent": p}))
        return res

    async def _policy(self, op: str, a: Args) -> dict[str, Any]:
        nested = bool(a["nested_groups"])
        res = await self._call("PUT", "/v1/policy", json={"nested_groups": nested})
        self.truth.apply(AdminAction("policy", {"nested_groups": nested}))
        return res

    async def _call(self, method: str, url: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(50):
            try:
                r = await self.http.request(method, url, **kw)
                break
            except httpx.TransportError:
                # The server may be restarting (a fault of this scenario): retry briefly.
                self.retries += 1
                await asyncio.sleep(0.2 * min(attempt + 1, 5))
        else:
            raise RunError(f"{method} {url}: server unreachable")
        if r.status_code >= 400:
            raise RunError(f"{method} {url}: {r.status_code} {r.text[:300]}")
        data: dict[str, Any] = r.json()
        return data
