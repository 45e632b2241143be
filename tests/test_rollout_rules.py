"""The rules of rollouts, rollbacks and exclusions as plain functions: ring and gate syntax
and the gate's verdict (`server_stub/rollout_rules.py`), the wire models
(`addin_core/protocol.py`), the agent's resolver and plan (`agent/resolver.py`,
`agent/pending.py`), its losses (`agent/losses.py`) and the oracle (`simulator/oracle.py`).
No broker, no files, no clock."""

from __future__ import annotations

import pytest
from test_agent_core import S, U, gone, inst, rec, sha

from addin_core.protocol import (
    Assignment,
    CatalogEntry,
    Host,
    InvalidPayload,
    Membership,
    Mode,
    RingVersion,
    Topic,
    decode,
)
from agent.losses import lost_reach
from agent.pending import plan
from agent.resolver import explain, reach, resolve
from server_stub.rollout_rules import (
    DeviceReport,
    Gate,
    OpenRollout,
    Ring,
    RuleError,
    catalog_rings,
    check_rings,
    evaluate_gate,
    parse_gate,
    parse_ring,
    version_for,
)
from simulator.oracle import AdminAction, GroundTruth

T = "contoso"


# -- ring and gate syntax ------------------------------------------------------------------


def test_rings_parse_and_the_last_reaches_everyone() -> None:
    assert parse_ring("wide=group:sales+user:bob") == Ring("wide", ("group:sales", "user:bob"))
    rings = check_rings([parse_ring("pilot=group:pilot"), parse_ring("all=everyone")])
    assert [r.name for r in rings] == ["pilot", "all"]
    assert check_rings([]) == [Ring("all", ("everyone",))], "no ring: everyone at once"
    with pytest.raises(RuleError, match="must reach everyone"):
        check_rings([parse_ring("pilot=group:pilot")])
    with pytest.raises(RuleError, match="given twice"):
        check_rings([parse_ring("a=everyone"), parse_ring("a=everyone")])
    for bad in ("pilot", "=everyone", "p=group:", "p=group:a/b", "p=team:x"):
        with pytest.raises(RuleError):
            parse_ring(bad)


def test_gate_syntax() -> None:
    g = parse_gate("applied>=95%, failed=0, wait=10m")
    assert (g.applied_pct, g.max_failed, g.wait_s) == (95.0, 0, 600.0)
    assert parse_gate("failed<=3").max_failed == 3
    assert parse_gate("wait=2h").wait_s == 7200
    for bad in ("applied>95%", "applied>=101%", "failed>=1", "wait=10", "wait>=1m", "speed=1"):
        with pytest.raises(RuleError):
            parse_gate(bad)


def dev(client: str, applied: str = "", failed: str = "") -> DeviceReport:
    return DeviceReport(client, client, frozenset({applied} - {""}), frozenset({failed} - {""}))


def test_gate_verdicts() -> None:
    gate = parse_gate("applied>=95%,failed=0,wait=10m")
    devices = [dev(f"d{i}", "2.0") for i in range(19)] + [dev("d19", "1.0")]
    assert evaluate_gate(gate, "2.0", devices, 600).holds  # 19/20 = 95%
    r = evaluate_gate(gate, "2.0", devices, 599)
    assert not r.holds and r.unmet == ("at its version for 599 s of 600 s",)
    r = evaluate_gate(gate, "2.0", [*devices[:18], dev("x", failed="2.0"), dev("y")], 600)
    assert not r.holds and set(r.unmet) == {
        "applied on 18/20 devices (90.0% < 95%)",
        "1 devices failed (at most 0)",
    }
    assert evaluate_gate(gate, "2.0", [], 600).unmet == ("no device of the ring has reported yet",)
    assert evaluate_gate(Gate(wait_s=60), "2.0", [], 60).holds, "a wait alone needs no report"


def test_catalog_rings_newest_rollout_first_and_version_for() -> None:
    pilot, wide, alll = (
        Ring("p", ("group:pilot",)),
        Ring("w", ("group:sales",)),
        Ring("a", ("everyone",)),
    )
    forward = OpenRollout(1, "2.0", None, (pilot, wide, alll), 2)  # aborted after wide
    back = OpenRollout(2, "1.0", 7, (pilot, wide, alll), 1)  # a rollback, at pilot
    rings = catalog_rings([forward, back])
    assert [(r.name, o.version) for r, o in rings] == [("p", "1.0"), ("p", "2.0"), ("w", "2.0")]
    assert version_for("1.0", rings, "ann", ["pilot", "sales"]) == ("1.0", "p")
    assert version_for("1.0", rings, "bob", ["sales"]) == ("2.0", "w")
    assert version_for("1.0", rings, "cat", []) == ("1.0", None)


# -- the wire -----------------------------------------------------------------------------


def ring(
    name: str, targets: list[str], version: str, digest: str, rollback: int | None = None
) -> RingVersion:
    return RingVersion(
        ring=name, targets=targets, version=version, manifest_sha256=digest,
        manifest_url=f"/v1/manifests/{digest}", hosts=[Host.WORD], permissions="ReadDocument",
        rollback=rollback,
    )  # fmt: skip


def test_old_payloads_are_byte_for_byte_unchanged() -> None:
    a = Assignment(revision=3, mode=Mode.FIXED)
    assert a.to_bytes() == b'{"revision":3,"mode":"fixed"}'
    topic = Topic.assign_everyone(T, "x")
    got = decode(topic, b'{"revision":3,"mode":"fixed","except_groups":["contractors"]}')
    assert isinstance(got, Assignment) and got.except_groups == ["contractors"]
    with pytest.raises(InvalidPayload, match="except_groups"):
        decode(topic, b'{"revision":3,"mode":"fixed","except_groups":["a/b"]}')
    with pytest.raises(InvalidPayload, match="targets"):
        decode(
            Topic.catalog(T, "x"),
            b'{"revision":1,"addin_id":"x","name":"X","source":"lob","version":"1.0",'
            b'"manifest_sha256":"'
            + sha("a").encode()
            + b'","manifest_url":"/v1/manifests/'
            + sha("a").encode()
            + b'","hosts":["Word"],"permissions":"ReadDocument",'
            b'"enabled":true,"rings":[{"ring":"p","targets":["team:x"],"version":"2.0",'
            b'"manifest_sha256":"'
            + sha("b").encode()
            + b'","manifest_url":"/v1/manifests/'
            + sha("b").encode()
            + b'","hosts":["Word"],"permissions":"ReadDocument"}]}',
        )


# -- the agent's resolver and plan --------------------------------------------------------


def ringed(
    s: S, addin: str, rings: list[RingVersion], version: str = "1.0", rollback: int | None = None
) -> None:
    base = s.state.catalog.get(addin)
    e = CatalogEntry(
        revision=s.r(), addin_id=addin, name=addin.title(), source=base.source if base else "lob",  # type: ignore[arg-type]
        version=version, manifest_sha256=sha("a"), manifest_url=f"/v1/manifests/{sha('a')}",
        hosts=[Host.WORD], permissions="ReadDocument", enabled=True, rings=rings or None,
        rollback=rollback,
    )  # fmt: skip
    s.state.apply(Topic.catalog(T, addin), e)


def test_the_first_ring_reaching_the_user_decides_the_version() -> None:
    s = S().cat("a").everyone("a").member("sales")
    ringed(
        s,
        "a",
        [ring("p", ["group:pilot"], "3.0", sha("c")), ring("w", ["group:sales"], "2.0", sha("b"))],
    )
    ent = resolve(s.state, U, (Host.WORD,))["a"]
    assert (ent.version, ent.sha256, ent.ring) == ("2.0", sha("b"), "w")
    s.member("sales", "pilot")
    assert resolve(s.state, U, (Host.WORD,))["a"].version == "3.0"
    s.member()
    ent = resolve(s.state, U, (Host.WORD,))["a"]
    assert (ent.version, ent.ring) == ("1.0", None)


def test_ring_groups_follow_the_nesting_policy() -> None:
    s = S().cat("a").everyone("a").member("emea").parents("emea", "sales")
    ringed(s, "a", [ring("w", ["group:sales"], "2.0", sha("b"))])
    assert resolve(s.state, U, (Host.WORD,))["a"].version == "1.0", "nesting off"
    s.nested(True)
    assert resolve(s.state, U, (Host.WORD,))["a"].version == "2.0"


def test_a_lower_version_is_applied_only_as_a_rollback() -> None:
    s = S().cat("a").everyone("a")
    ringed(s, "a", [], version="1.0")
    e = s.state.catalog["a"]
    have = {Host.WORD: {"a": inst(e, version="2.0")}}
    ents = resolve(s.state, U, (Host.WORD,))
    assert plan(ents, have, {sha("a"): rec(e)}, {}, (Host.WORD,), gone) == {}
    ringed(s, "a", [], version="1.0", rollback=9)
    e = s.state.catalog["a"]
    ents = resolve(s.state, U, (Host.WORD,))
    p = plan(ents, have, {sha("a"): rec(e)}, {}, (Host.WORD,), gone)[(Host.WORD, "a")]
    assert (p.action, p.from_version, p.to_version, p.state) == ("update", "2.0", "1.0", "ready")
    assert p.reason == "the admin's rollback (revision 9) applies when Word next starts"
    # A rollback in a ring the user is not in authorises nothing for them.
    ringed(s, "a", [ring("p", ["group:pilot"], "1.0", sha("a"), rollback=9)], version="1.0")
    ents = resolve(s.state, U, (Host.WORD,))
    assert plan(ents, have, {sha("a"): rec(e)}, {}, (Host.WORD,), gone) == {}


def test_an_exclusion_wins_over_every_assignment() -> None:
    s = S().cat("a").user("a").member("sales", "contractors")
    s.state.apply(
        Topic.assign_group(T, "sales", "a"),
        Assignment(revision=s.r(), mode=Mode.FIXED, except_groups=["contractors"]),
    )
    assert "a" not in resolve(s.state, U, (Host.WORD,))
    x = explain(s.state, U, "a", (Host.WORD,))
    assert x.excluded is not None and x.entitlement is None
    assert (
        x.excluded.describe() == "excluded by group contractors from the assignment to group sales"
    )
    # Leaving the excluded group lifts it; an exclusion naming the user works alike.
    s.member("sales")
    assert "a" in resolve(s.state, U, (Host.WORD,))
    s.state.apply(
        Topic.assign_everyone(T, "a"), Assignment(revision=s.r(), mode=Mode.FIXED, except_users=[U])
    )
    assert explain(s.state, U, "a").excluded.describe() == (  # type: ignore[union-attr]
        "excluded by user ann from the assignment to Everyone"
    )


def test_an_exclusion_on_an_assignment_that_does_not_reach_the_user_is_not_theirs() -> None:
    s = S().cat("a").everyone("a").member("contractors")
    s.state.apply(
        Topic.assign_group(T, "sales", "a"),
        Assignment(revision=s.r(), mode=Mode.FIXED, except_groups=["contractors"]),
    )
    assert "a" in resolve(s.state, U, (Host.WORD,))


def test_becoming_excluded_is_recorded_as_a_loss() -> None:
    s = S().cat("a").member("sales").group("sales", "a")
    before = reach(s.state, U)
    s.state.apply(Topic.member(T, U), Membership(revision=s.r(), groups=["sales", "contractors"]))
    assert lost_reach(before, s.state, U) == {}, "joining contractors excludes nobody yet"
    before = reach(s.state, U)
    s.state.apply(
        Topic.assign_group(T, "sales", "a"),
        Assignment(revision=s.r(), mode=Mode.FIXED, except_groups=["contractors"]),
    )
    loss = lost_reach(before, s.state, U)["a"]
    assert (loss.cause, loss.link, loss.grant.group_id) == (
        "excluded",
        ("group", "contractors"),
        "sales",
    )


# -- the oracle ---------------------------------------------------------------------------


def test_the_oracle_serves_ring_versions_rollbacks_and_exclusions() -> None:
    t = GroundTruth(["ann", "bob", "cat"], {"pilot": ["ann"], "contractors": ["cat"]})
    t.apply(
        AdminAction(
            "upload",
            {"addin_id": "a", "version": "1.0", "hosts": ["Word"], "permissions": "ReadDocument"},
        )
    )
    t.apply(
        AdminAction(
            "stage",
            {"addin_id": "a", "version": "2.0", "hosts": ["Word"], "permissions": "ReadDocument"},
        )
    )
    t.apply(AdminAction("assign", {"addin_id": "a", "target": "everyone", "mode": "fixed",
                                   "except": ["group:contractors"]}))  # fmt: skip
    t.apply(AdminAction("rollout_start", {"addin_id": "a", "version": "2.0",
                                          "rings": ["p=group:pilot", "all=everyone"]}))  # fmt: skip
    ents = t.entitlements_for_all((Host.WORD,))
    assert ents == {"ann": {"a": Mode.FIXED}, "bob": {"a": Mode.FIXED}, "cat": {}}
    assert t.installed_for(ents["ann"], (Host.WORD,), user="ann") == {Host.WORD: {"a": "2.0"}}
    assert t.installed_for(ents["bob"], (Host.WORD,), user="bob") == {Host.WORD: {"a": "1.0"}}
    t.apply(AdminAction("rollout_advance", {"addin_id": "a"}))
    assert t.installed_for(ents["bob"], (Host.WORD,), user="bob") == {Host.WORD: {"a": "2.0"}}
    t.apply(AdminAction("rollback", {"addin_id": "a", "version": "1.0", "rings": []}))
    assert t.installed_for(ents["ann"], (Host.WORD,), user="ann") == {Host.WORD: {"a": "1.0"}}
