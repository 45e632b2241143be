"""Unit tests of the simulator's pure parts: org generator, oracle, histogram merge."""

from __future__ import annotations

import random

import yaml

from addin_core.protocol import Host, Mode
from simulator.metrics import LatencyHistogram, StageSet, convergence_curve
from simulator.oracle import AdminAction, GroundTruth, diff_entitlements, diff_installed
from simulator.orggen import PILOT_GROUP, addin_guid, generate_org, make_manifest

# -- org generator ---------------------------------------------------------------------------


def test_org_generator_is_deterministic_for_a_seed() -> None:
    a = generate_org(500, 40, nesting_depth=3, seed=7).to_yaml()
    b = generate_org(500, 40, nesting_depth=3, seed=7).to_yaml()
    c = generate_org(500, 40, nesting_depth=3, seed=8).to_yaml()
    assert a == b
    assert a != c


def test_org_generator_shape() -> None:
    org = generate_org(2000, 100, nesting_depth=2, seed=3)
    doc = yaml.safe_load(org.to_yaml())
    assert len(doc["users"]) == 2000
    assert len(doc["groups"]) == 100
    assert doc["groups"][0]["id"] == PILOT_GROUP
    ids = {u["id"] for u in doc["users"]}
    group_ids = {g["id"] for g in doc["groups"]}
    for g in doc["groups"]:
        assert set(g["members"]) <= ids
        assert set(g["parents"]) <= group_ids
    sizes = sorted((len(g["members"]) for g in doc["groups"]), reverse=True)
    # heavy tail: the largest group is much larger than the median one
    assert sizes[0] > 4 * sizes[len(sizes) // 2]
    # nesting depth: longest parent chain is exactly 2 links
    parents = {g["id"]: g["parents"] for g in doc["groups"]}

    def depth(g: str, seen: frozenset[str] = frozenset()) -> int:
        return max((1 + depth(p, seen | {g}) for p in parents[g] if p not in seen), default=0)

    assert max(depth(g) for g in parents) == 2


def test_generated_manifests_are_stable_and_well_formed() -> None:
    guid = addin_guid("notes", 1)
    assert guid == addin_guid("notes", 1) != addin_guid("crm", 1)
    xml = make_manifest(
        guid, name="Notes", version="1.0.0.0", hosts=[Host.WORD], permissions="ReadDocument"
    )
    assert b"TaskPaneApp" in xml and guid.encode() in xml and b'Name="Document"' in xml
    mail = make_manifest(
        guid, name="Mail", version="1.0", hosts=[Host.OUTLOOK], permissions="ReadItem"
    )
    assert b"MailApp" in mail


def test_generated_manifests_pass_the_manifest_reader() -> None:
    import pytest

    manifest_mod = pytest.importorskip("addin_core.manifest")
    guid = addin_guid("notes", 1)
    for hosts, perm in (
        ([Host.WORD, Host.EXCEL], "ReadWriteDocument"),
        ([Host.OUTLOOK], "ReadItem"),
    ):
        m = manifest_mod.parse_manifest(
            make_manifest(guid, name="Notes & Co", version="1.2.0.0", hosts=hosts, permissions=perm)
        )
        assert m.id == guid
        assert m.version == "1.2.0.0"
        assert tuple(sorted(m.hosts)) == tuple(sorted(hosts))
        assert m.permissions == perm


# -- oracle ----------------------------------------------------------------------------------


def _truth(nested: bool) -> GroundTruth:
    t = GroundTruth(
        ["ann", "bob", "cid"],
        {"sales": ["ann"], "emea": ["bob"], "all": []},
        {"sales": ["emea"], "emea": ["all"], "all": ["sales"]},  # a cycle
        nested_groups=nested,
    )
    for alias, hosts in (("a", ["Word"]), ("b", ["Word", "Excel"]), ("m", ["Outlook"])):
        t.apply(
            AdminAction(
                "upload",
                {
                    "addin_id": alias,
                    "version": "1.0",
                    "hosts": hosts,
                    "permissions": "ReadDocument",
                },
            )
        )
    return t


def test_oracle_nested_off_and_on_with_a_cycle() -> None:
    t = _truth(nested=False)
    t.apply(
        AdminAction(
            "assign", {"addin_id": "a", "target": "group", "target_id": "all", "mode": "fixed"}
        )
    )
    assert t.entitlements_for_all() == {"ann": {}, "bob": {}, "cid": {}}
    t.apply(AdminAction("policy", {"nested_groups": True}))
    # sales -> emea -> all -> sales (cycle): ann reaches all through sales; bob through emea
    assert t.entitlements_for_all() == {
        "ann": {"a": Mode.FIXED},
        "bob": {"a": Mode.FIXED},
        "cid": {},
    }
    reach = t.group_reach()
    assert reach["sales"] == reach["emea"] == reach["all"] == {"sales", "emea", "all"}


def test_oracle_strongest_mode_wins_and_available_is_not_installed() -> None:
    t = _truth(nested=False)
    t.apply(AdminAction("assign", {"addin_id": "b", "target": "everyone", "mode": "available"}))
    t.apply(
        AdminAction(
            "assign", {"addin_id": "b", "target": "group", "target_id": "sales", "mode": "optional"}
        )
    )
    t.apply(
        AdminAction(
            "assign", {"addin_id": "b", "target": "user", "target_id": "ann", "mode": "fixed"}
        )
    )
    ents = t.entitlements_for_all()
    assert ents["ann"] == {"b": Mode.FIXED}
    assert ents["bob"] == {"b": Mode.AVAILABLE}
    assert t.installed_for(ents["bob"])[Host.WORD] == {}
    inst = t.installed_for(ents["ann"])
    assert inst[Host.WORD] == {"b": "1.0"} and inst[Host.EXCEL] == {"b": "1.0"}
    assert inst[Host.OUTLOOK] == {} and inst[Host.POWERPOINT] == {}
    t.apply(AdminAction("unassign", {"addin_id": "b", "target": "user", "target_id": "ann"}))
    assert t.entitlements_for_all()["ann"] == {"b": Mode.OPTIONAL}


def test_oracle_turn_off_on_update_consent_and_remove() -> None:
    t = _truth(nested=False)
    t.apply(AdminAction("assign", {"addin_id": "a", "target": "everyone", "mode": "fixed"}))
    t.apply(AdminAction("disable", {"addin_id": "a"}))
    assert t.entitlements_for_all()["cid"] == {}
    t.apply(AdminAction("enable", {"addin_id": "a"}))
    assert t.entitlements_for_all()["cid"] == {"a": Mode.FIXED}
    up = {"addin_id": "a", "hosts": ["Word"], "permissions": "ReadDocument"}
    assert t.apply(AdminAction("upload", {**up, "version": "1.1"})) == "current"
    assert t.apply(AdminAction("upload", {**up, "version": "1.0.9"})) == "refused"
    esc = {**up, "version": "2.0", "permissions": "ReadWriteDocument"}
    assert t.apply(AdminAction("upload", esc)) == "needs_consent"
    assert t.installed_for(t.entitlements_for_all()["cid"])[Host.WORD] == {"a": "1.1"}
    t.apply(AdminAction("consent", {"addin_id": "a"}))
    assert t.installed_for(t.entitlements_for_all()["cid"])[Host.WORD] == {"a": "2.0"}
    t.apply(AdminAction("remove_addin", {"addin_id": "a"}))
    assert t.entitlements_for_all()["cid"] == {}


def test_oracle_membership_changes() -> None:
    t = _truth(nested=False)
    t.apply(
        AdminAction(
            "assign", {"addin_id": "m", "target": "group", "target_id": "sales", "mode": "optional"}
        )
    )
    assert t.entitlements_for_all()["cid"] == {}
    t.apply(AdminAction("add_member", {"user": "cid", "group": "sales"}))
    assert t.entitlements_for_all()["cid"] == {"m": Mode.OPTIONAL}
    assert t.installed_for(t.entitlements_for_all()["cid"])[Host.OUTLOOK] == {"m": "1.0"}
    t.apply(AdminAction("remove_member", {"user": "cid", "group": "sales"}))
    assert t.entitlements_for_all()["cid"] == {}


def test_diffs() -> None:
    assert diff_entitlements({"a": Mode.FIXED}, {"a": "fixed"}) == []
    assert diff_entitlements({"a": Mode.FIXED}, {"b": "optional"}) == [
        "missing a (fixed)",
        "unexpected b (optional)",
    ]
    assert diff_installed({"Word": {"a": "1.0"}}, {"Word": {"a": "0.9"}}) == [
        "Word: a expected 1.0, got 0.9"
    ]


# -- histograms ------------------------------------------------------------------------------


def test_merge_of_two_workers_histograms_equals_histogram_of_pooled_samples() -> None:
    rng = random.Random(5)
    one = [rng.expovariate(1 / 0.3) for _ in range(5000)]
    two = [rng.lognormvariate(0, 1.5) for _ in range(3000)]
    w1, w2, pooled = StageSet(), StageSet(), StageSet()
    for x in one:
        w1.record("notified", x)
        pooled.record("notified", x)
    for x in two:
        w2.record("notified", x)
        pooled.record("notified", x)
    merged = StageSet()
    for shipped in (w1.encode(), w2.encode()):  # shipped as text, like from workers
        merged.merge(StageSet.decode(shipped))
    m, p = merged.stages["notified"], pooled.stages["notified"]
    assert m.count == p.count == 8000
    for pct in (0, 10, 50, 90, 95, 99, 99.9, 100):
        assert m.hist.get_value_at_percentile(pct) == p.hist.get_value_at_percentile(pct)
    assert m.summary() == p.summary()
    assert list(m.hist.counts) == list(p.hist.counts)


def test_histogram_summary_and_curve() -> None:
    h = LatencyHistogram()
    for ms in range(1, 101):
        h.record(ms / 1000)
    s = h.summary()
    assert s["count"] == 100
    assert 49.5 <= s["p50_ms"] <= 50.5 and 98.5 <= s["p99_ms"] <= 99.5
    curve = convergence_curve([0.1, 0.2, 0.3], total=4)
    assert curve[0] == (0.0, 0.0) and curve[-1] == (0.3, 0.75)


async def test_convergence_times_come_from_the_agents_not_from_when_they_were_checked() -> None:
    """Under load the converge command reaches a worker seconds after the change; each
    client's convergence time must still be when its agent accepted the change."""
    import asyncio
    import time
    from types import SimpleNamespace

    from agent.daemon import AgentEvent
    from simulator.control import BrokerAddress
    from simulator.worker import VirtualClient, Worker

    worker = Worker("run", BrokerAddress("127.0.0.1", 1), "http://127.0.0.1:1")
    ents: dict[str, dict[str, object]] = {}

    def client(cid: str, started: float, changed: float, mode: str | None) -> VirtualClient:
        c = VirtualClient(cid, f"user-{cid}")
        ents[cid] = {"addin": SimpleNamespace(mode=mode)} if mode else {}
        c.agent = SimpleNamespace(entitlements=lambda: ents[cid])
        c.online, c.started_at, c.changed_at = True, started, changed
        worker.clients[cid] = c
        return c

    t0 = time.time() - 2.0  # the change was committed 2 s before the check runs
    client("early", t0 - 60, t0 + 0.7, "fixed")  # accepted the change 0.7 s after t0
    client("before", t0 - 60, t0 - 30, "fixed")  # already matched before the change
    client("restarted", t0 + 1.5, t0 - 30, "fixed")  # came back (from its cache) at t0+1.5
    late = client("late", t0 - 60, t0 - 30, None)  # has not got it yet
    expected = {"values": [{"addin": "fixed"}], "users": {f"user-{c}": 0 for c in ents}}
    task = asyncio.create_task(
        worker.cmd_converge(1, {"expected": expected, "t0": t0, "timeout": 10})
    )
    await asyncio.sleep(0.2)
    ents["late"] = {"addin": SimpleNamespace(mode="fixed")}
    worker._observer(late)(AgentEvent("notified", 5, t0, "addin", None, time.time()))
    result = await asyncio.wait_for(task, 5)
    offsets = sorted(result["offsets"])
    assert result["unconverged"] == 0 and len(offsets) == 4
    assert offsets[0] == 0.0 and abs(offsets[1] - 0.7) < 0.01 and abs(offsets[2] - 1.5) < 0.01
    assert 2.1 < offsets[3] < 3.0  # "late": when its agent accepted the message
