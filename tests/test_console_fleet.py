"""The console's counts (`server_stub/console/fleet.py` `compute`), a pure function: each
state of a device for an add-in, and which devices each count includes."""

from __future__ import annotations

from server_stub.console.fleet import AddinInfo, Device, Directory, compute

NOW = 1_000_000.0
DAY = 86400.0


def device(
    cid: str,
    user: str,
    revision: int = 10,
    *,
    applied: dict[str, dict[str, str]] | None = None,
    cached: set[tuple[str, str]] | None = None,
    errors: tuple[str, ...] = (),
    received_at: float | None = NOW - 60,
) -> Device:
    applied = applied or {}
    keys = frozenset((a, v) for a, hosts in applied.items() for v in hosts.values())
    return Device(cid, user, revision, received_at, applied, frozenset(cached or ()), errors, keys)


def directory(nested: bool = False) -> Directory:
    notes = AddinInfo("notes", "Notes", "2.0", True, 8, (("group", "sales", "fixed"),))
    crm = AddinInfo("crm", "CRM", "1.0", True, 3, (("everyone", "", "available"),))
    return Directory(
        revision=10,
        users=frozenset({"ann", "bob", "cy", "dan", "eve", "fay"}),
        members={"sales": ["ann", "bob", "cy", "dan", "eve"], "emea": ["fay"]},
        children={"sales": ["emea"]},
        nested=nested,
        addins={"notes": notes, "crm": crm},
    )


def fleet() -> dict[str, Device]:
    devices = [
        device("ann-pc", "ann", applied={"notes": {"Word": "2.0", "Excel": "2.0"}}),
        device("bob-pc", "bob", cached={("notes", "2.0")}),
        # bob's second device still has the old version and has not heard of the new one.
        device("bob-mac", "bob", revision=7, applied={"notes": {"Word": "1.0"}}),
        device("cy-pc", "cy", errors=("Word Notes 2.0: the add-in folder is not writable",)),
        device("dan-pc", "dan", revision=9, received_at=NOW - 3 * DAY),
        device("eve-pc", "eve", revision=12),
        device("fay-pc", "fay", applied={"notes": {"Word": "2.0"}}),
        device("enrolled", "eve", revision=0, received_at=None),
    ]
    return {d.client_id: d for d in devices}


def test_each_count_and_each_state() -> None:
    snap = compute(directory(), fleet(), NOW, DAY)
    c = snap.counts["notes"]
    # fay is in sales only through the nested group emea, and nesting is off.
    assert c.entitled == 7
    assert c.applied == 1  # ann-pc (bob-mac has 1.0, not the current 2.0)
    assert c.cached == 2  # + bob-pc, waiting for its host
    # Behind the catalog entry's revision 8: bob-mac (7); the enrolled device never reported.
    assert c.notified == 5
    assert c.failed == 1 and c.stale == 2  # cy-pc; dan-pc (3 days) and the enrolled one
    states = {cid: snap.state("notes", cid) for cid in sorted(snap.entitled["notes"])}
    assert states == {
        "ann-pc": "applied",
        "bob-pc": "cached",
        "bob-mac": "waiting",
        "cy-pc": "failed",
        "dan-pc": "notified",
        "enrolled": "stale",
        "eve-pc": "notified",
    }


def test_nesting_policy_and_everyone() -> None:
    snap = compute(directory(nested=True), fleet(), NOW, DAY)
    assert snap.counts["notes"].entitled == 8
    assert snap.counts["notes"].applied == 2
    assert snap.state("notes", "fay-pc") == "applied"
    # Everyone, mode available: entitled, nothing installed, nobody failed.
    crm = snap.counts["crm"]
    assert (crm.entitled, crm.applied, crm.cached, crm.failed) == (8, 0, 0, 0)


def test_a_device_that_applied_is_not_also_counted_cached() -> None:
    devices = {"a": device("a", "ann", applied={"notes": {"Word": "2.0"}}, cached={("notes", "2.0")})}
    snap = compute(directory(), devices, NOW, DAY)
    assert (snap.counts["notes"].applied, snap.counts["notes"].cached) == (1, 1)
