"""Rollouts, rollbacks and exclusions on the server: the `Service` on a real SQLite file (the
clock injected, so a ``wait=10m`` gate needs no 10 minutes), what each write publishes (its
outbox row), the gate computed from recorded agent reports, `explain` and the anti-entropy
digest; then the same through real HTTP and the real `addin-server` command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agent_helpers import ServerProcess, addin_id, manifest

from addin_core.protocol import AgentReport, AppliedAddin, FailedAddin, Host, Topic, decode
from server_stub.antientropy import user_digest
from server_stub.db import Database
from server_stub.explain import render_explain
from server_stub.service import BadRequest, Conflict, NotFound, Service
from simulator.mosquitto import MosquittoBroker

A = addin_id("ringed")
TENANT = "contoso"


class Clock:
    """The service's time source, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def svc(db_target: str) -> AsyncIterator[tuple[Service, Clock]]:
    clock = Clock()
    db = await Database.open(db_target)
    await db.bind_tenant(TENANT)
    s = Service(db, TENANT, clock=clock)
    for u in ("ann", "bob", "cat", "dan", "eve"):
        await s.create_user(u, u)
    for g in ("pilot", "sales", "contractors"):
        await s.create_group(g, g)
    await s.add_member("pilot", "ann")
    await s.add_member("sales", "bob")
    await s.add_member("sales", "cat")
    await s.add_member("contractors", "cat")
    await s.add_lob(manifest("ringed", "1.0"))
    await s.assign(A, "everyone", None, "fixed")
    yield s, clock
    await s.close()


async def catalog(s: Service) -> dict[str, object]:
    rows = await s.database.rows(
        "SELECT payload FROM retained WHERE topic=?", (str(Topic.catalog(TENANT, A)),)
    )
    entry = decode(Topic.catalog(TENANT, A), bytes(rows[0][0]))
    return json.loads(entry.to_bytes())  # type: ignore[no-any-return]


def report(client: str, user: str, version: str, failed: bool = False) -> AgentReport:
    return AgentReport(
        client_id=client,
        user_id=user,
        revision=1,
        reported_at=0.0,
        applied=[] if failed else [AppliedAddin(addin_id=A, version=version, host=Host.WORD)],
        failed=[FailedAddin(addin_id=A, version=version, host=Host.WORD, reason="refused")]
        if failed
        else None,
    )


RINGS = ("pilot=group:pilot", "wide=group:sales", "all=everyone")


async def test_rollout_rings_gate_and_completion(svc: tuple[Service, Clock]) -> None:
    s, clock = svc
    await s.add_lob(manifest("ringed", "2.0"), staged=True)
    assert (await catalog(s))["version"] == "1.0", "a staged version is not deployed"
    started = await s.rollouts.start(A, "2.0", RINGS, "applied>=50%,failed=0,wait=10m")
    rid = started["rollout_id"]
    entry = await catalog(s)
    assert entry["version"] == "1.0"
    assert entry["revision"] == started["revision"]
    assert [(r["ring"], r["version"], r["targets"]) for r in entry["rings"]] == [
        ("pilot", "2.0", ["group:pilot"])
    ]
    # The gate: no report yet, and no time waited.
    assert await s.rollouts.tick() == []
    view = await s.rollouts.get(rid)
    assert view["gate_now"]["holds"] is False
    assert "no device of the ring has reported yet" in view["gate_now"]["unmet"]
    await s.record_reports([report("ann-pc", "ann", "2.0"), report("bob-pc", "bob", "1.0")])
    view = await s.rollouts.get(rid)
    # bob is in ring wide, not pilot: the pilot ring has one device, applied.
    assert view["rings"][0] | {"targets": None} == {
        "name": "pilot", "targets": None, "reached": True, "devices": 1, "applied": 1, "failed": 0
    }  # fmt: skip
    assert view["gate_now"]["unmet"] == ["at its version for 0 s of 600 s"]
    clock.now += 599
    assert await s.rollouts.tick() == []
    clock.now += 1
    advanced = await s.rollouts.tick()
    assert [a["current_ring"] for a in advanced] == ["wide"]
    audit = await s.database.rows("SELECT actor, operation FROM audit ORDER BY id DESC LIMIT 1")
    assert tuple(audit[0]) == ("rollout-gate", "rollout_advance")
    entry = await catalog(s)
    assert [r["ring"] for r in entry["rings"]] == ["pilot", "wide"]
    # A failed device holds the gate even after the wait.
    await s.record_reports([report("cat-pc", "cat", "2.0", failed=True)])
    clock.now += 3600
    assert await s.rollouts.tick() == []
    assert "1 devices failed (at most 0)" in (await s.rollouts.get(rid))["gate_now"]["unmet"]
    # Pause: an admin still advances; the last ring completes the rollout.
    await s.rollouts.set_state(rid, "pause")
    with pytest.raises(Conflict, match="paused: it cannot pause"):
        await s.rollouts.set_state(rid, "pause")
    done = await s.rollouts.advance(rid)
    assert done["state"] == "completed"
    entry = await catalog(s)
    assert entry["version"] == "2.0" and "rings" not in entry and "rollback" not in entry


async def test_rollback_everywhere_and_in_rings(svc: tuple[Service, Clock]) -> None:
    s, _ = svc
    await s.add_lob(manifest("ringed", "2.0"))
    with pytest.raises(Conflict, match=re.escape("not newer than the current version 2.0")):
        await s.rollouts.start(A, "1.0", RINGS)
    ringed = await s.rollouts.start(A, "1.0", RINGS, rollback=True)
    entry = await catalog(s)
    assert entry["version"] == "2.0"
    assert entry["rings"] == [
        {
            "ring": "pilot",
            "targets": ["group:pilot"],
            "version": "1.0",
            "manifest_sha256": entry["rings"][0]["manifest_sha256"],  # type: ignore[index]
            "manifest_url": entry["rings"][0]["manifest_url"],  # type: ignore[index]
            "hosts": ["Word"],
            "permissions": "ReadDocument",
            "rollback": ringed["revision"],
        }
    ]
    # A rollback takes over from the running one: everywhere at once now.
    everywhere = await s.rollouts.start(A, "1.0", rollback=True)
    assert everywhere["state"] == "completed"
    assert (await s.rollouts.get(ringed["rollout_id"]))["state"] == "superseded"
    entry = await catalog(s)
    assert entry["version"] == "1.0" and entry["rollback"] == everywhere["revision"]
    text = render_explain(await s.explain("bob", A))
    assert f"Rollback: 1.0 is the admin's rollback {everywhere['rollout_id']} (revision " in text
    assert "rings" not in entry
    with pytest.raises(Conflict, match=re.escape("no user is served a version above 1.0")):
        await s.rollouts.start(A, "1.0", rollback=True)
    # A newer upload ends the rollback's mark: agents refuse downgrades again.
    await s.add_lob(manifest("ringed", "3.0"))
    assert "rollback" not in await catalog(s)


async def test_exclusion_wins_in_explain_and_digest(svc: tuple[Service, Clock]) -> None:
    s, _ = svc
    await s.assign(A, "group", "sales", "fixed", ["group:contractors", "user:bob"])
    rows = await s.database.rows(
        "SELECT payload FROM retained WHERE topic=?",
        (str(Topic.assign_group(TENANT, "sales", A)),),
    )
    assert json.loads(bytes(rows[0][0]))["except_groups"] == ["contractors"]
    # cat is in sales and in contractors; the Everyone assignment reaches her too, yet the
    # exclusion on the sales assignment wins.
    e = await s.explain("cat", A)
    assert e["entitled"] is False
    assert e["excluded"] == "excluded by group contractors from the assignment to group sales"
    assert (await s.explain("bob", A))["excluded"].startswith("excluded by user bob")
    assert (await s.explain("dan", A))["entitled"] is True
    assert (await user_digest(s, "cat"))["count"] == 0
    assert (await user_digest(s, "dan"))["count"] == 1
    shown = await s.get_addin(A)
    assert {"target": "group", "target_id": "sales", "mode": "fixed",
            "except": ["group:contractors", "user:bob"]} in shown["assignments"]  # fmt: skip
    # Re-assigning without exclusions lifts them.
    await s.assign(A, "group", "sales", "fixed")
    assert (await s.explain("cat", A))["entitled"] is True


async def test_digest_and_explain_follow_the_ring(svc: tuple[Service, Clock]) -> None:
    s, _ = svc
    await s.add_lob(manifest("ringed", "2.0"), staged=True)
    r = await s.rollouts.start(A, "2.0", RINGS)
    ann, bob = await s.explain("ann", A), await s.explain("bob", A)
    assert (ann["user_version"], ann["ring"], ann["rollout_id"]) == (
        "2.0",
        "pilot",
        r["rollout_id"],
    )
    assert (bob["user_version"], bob["ring"]) == ("1.0", None)
    before = (await user_digest(s, "ann"))["digest"]
    await s.rollouts.set_state(r["rollout_id"], "abort")
    assert (await user_digest(s, "ann"))["digest"] == before, "an abort keeps reached rings"


@pytest.mark.parametrize(
    ("rings", "gate", "error", "message"),
    [
        (("pilot=group:pilot",), None, BadRequest, "the last ring (pilot) must reach everyone"),
        (("pilot",), None, BadRequest, "invalid ring 'pilot': use NAME=TARGET"),
        (("p=team:x", "all=everyone"), None, BadRequest, "invalid ring target 'team:x'"),
        (("p=group:nope", "all=everyone"), None, NotFound, "ring p: unknown group 'nope'"),
        (RINGS, "applied>95%", BadRequest, "invalid gate condition 'applied>95%'"),
        (RINGS, "wait=10 minutes", BadRequest, "invalid duration '10 minutes'"),
    ],
)
async def test_bad_rollouts_are_refused_with_one_reason(
    svc: tuple[Service, Clock], rings: tuple[str, ...], gate: str | None, error: type, message: str
) -> None:
    s, _ = svc
    await s.add_lob(manifest("ringed", "2.0"), staged=True)
    before = await s.revision()
    with pytest.raises(error, match=re.escape(message)):
        await s.rollouts.start(A, "2.0", rings, gate)
    assert await s.revision() == before, "a refused rollout changes nothing"


async def test_one_rollout_at_a_time_and_no_upload_over_it(svc: tuple[Service, Clock]) -> None:
    s, _ = svc
    with pytest.raises(NotFound, match=re.escape("has no version 2.0; stored versions: 1.0")):
        await s.rollouts.start(A, "2.0", RINGS)
    await s.add_lob(manifest("ringed", "2.0"), staged=True)
    await s.add_lob(manifest("ringed", "2.1"), staged=True)
    await s.rollouts.start(A, "2.0", RINGS)
    with pytest.raises(Conflict, match="already has rollout"):
        await s.rollouts.start(A, "2.1", RINGS)
    with pytest.raises(Conflict, match="in progress"):
        await s.add_lob(manifest("ringed", "3.0"))
    with pytest.raises(Conflict, match="not greater than the highest stored"):
        await s.add_lob(manifest("ringed", "2.1"), staged=True)


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env |= {"ADDIN_SERVER_DB": str(tmp / "server.db"), "ADDIN_SERVER_PUBLISH_WAIT": "5"}
    return subprocess.run([sys.executable, "-m", "server_stub", *args], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


async def test_http_and_cli(tmp_path: Path, broker: MosquittoBroker) -> None:
    srv = ServerProcess(tmp_path, broker)
    try:
        await srv.user("ann")
        await srv.group("pilot")
        await srv.group("sales")
        await srv.join("pilot", "ann")
        await srv.upload(manifest("ringed", "1.0"))
        await srv.call(
            "POST", f"/v1/addins/{A}/assign",
            json={"target": "everyone", "mode": "fixed", "except": ["user:ann"]},
        )  # fmt: skip
        xml = manifest("ringed", "2.0")
        await srv.call("POST", "/v1/addins?staged=true", content=xml,
                       headers={"Content-Type": "application/xml"})  # fmt: skip
        body = {"addin": A, "version": "2.0", "rings": list(RINGS), "gate": "wait=1d"}
        started = await srv.call("POST", "/v1/rollouts", json=body)
        rid = started["rollout_id"]
        assert (await srv.call("GET", "/v1/rollouts"))[0]["rollout_id"] == rid  # type: ignore[index]
        bad = await srv.call("POST", "/v1/rollouts", 400, json={**body, "gate": "wait=soon"})
        assert "invalid duration 'soon'" in bad["detail"]
        await srv.call("POST", f"/v1/rollouts/{rid}/pause")
        status = cli(tmp_path, "rollout", "status", A)
        assert status.returncode == 0, status.stderr
        assert f"Rollout {rid}: ringed ({A}) 1.0 → 2.0, paused" in status.stdout
        assert "✓ pilot" in status.stdout and "· wide" in status.stdout
        out = cli(tmp_path, "rollout", "advance", A)
        assert out.returncode == 0, out.stderr
        assert "✓ wide" in out.stdout
        out = cli(tmp_path, "rollback", A, "--to", "1.0")
        assert out.returncode == 0, out.stderr
        assert f"Rollback {rid + 1}: ringed ({A}) 2.0 → 1.0, completed" in out.stdout
        err = cli(tmp_path, "rollout", "abort", str(rid))
        assert err.returncode == 1
        assert err.stderr.strip() == f"error: rollout {rid} is superseded: it cannot abort"
        explain = cli(tmp_path, "explain", "--user", "ann", "--addin", A)
        assert (
            "NOT ENTITLED: excluded by user ann from the assignment to Everyone" in explain.stdout
        )
    finally:
        await srv.aclose()


async def test_org_document_exclusions(svc: tuple[Service, Clock]) -> None:
    s, _ = svc
    doc = {"assignments": [{"addin": A, "target": "group:sales", "mode": "optional",
                            "except": ["user:bob", "group:contractors"]}]}  # fmt: skip
    await s.load_org(doc)
    assert (await s.explain("bob", A))["excluded"] == (
        "excluded by user bob from the assignment to group sales"
    )
    with pytest.raises(NotFound, match="cannot exclude unknown group 'nobody'"):
        await s.load_org({"assignments": [{"addin": A, "target": "everyone",
                                           "except": ["group:nobody"]}]})  # fmt: skip
    with pytest.raises(BadRequest, match=re.escape("assignments[0]: invalid exclusion 'bob'")):
        await s.load_org({"assignments": [{"addin": A, "target": "everyone", "except": ["bob"]}]})


async def test_aborted_rollouts_that_fill_the_catalog_entry_are_a_clear_conflict(
    svc: tuple[Service, Clock],
) -> None:
    """Every reached ring of every open rollout (aborted ones stay open) is listed in the
    catalog entry, which carries 16 at most: the write that would list a 17th is refused
    with the reason and changes nothing (it ended in a 500), and a rollout completed to
    everyone closes the older ones."""
    s, _ = svc
    for i in range(14):
        await s.create_group(f"g{i}", f"g{i}")
    await s.add_lob(manifest("ringed", "2.0"), staged=True)
    first = await s.rollouts.start(
        A, "2.0", [f"r{i}=group:g{i}" for i in range(14)] + ["all=everyone"]
    )
    for _ in range(13):
        await s.rollouts.advance(first["rollout_id"])
    await s.rollouts.set_state(first["rollout_id"], "abort")
    second = await s.rollouts.start(A, "2.0", [*RINGS[:2], "c=group:contractors", "all=everyone"])
    await s.rollouts.advance(second["rollout_id"])
    assert len((await catalog(s))["rings"]) == 16  # type: ignore[arg-type]
    revision = await s.revision()
    with pytest.raises(Conflict, match="would list 17 rings of open rollouts"):
        await s.rollouts.advance(second["rollout_id"])
    assert await s.revision() == revision
    assert (await s.rollouts.get(second["rollout_id"]))["current_ring"] == "wide"
    await s.rollouts.set_state(second["rollout_id"], "abort")
    with pytest.raises(Conflict, match="would list 17 rings"):
        await s.rollouts.start(A, "2.0", ["p=group:pilot", "all=everyone"], rollback=False)
    done = await s.rollouts.start(A, "2.0", ["all=everyone"])
    assert done["state"] == "completed"
    entry = await catalog(s)
    assert entry["version"] == "2.0" and entry.get("rings") is None
