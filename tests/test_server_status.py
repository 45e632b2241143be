"""`status` keeps its summary of the agents' reports up to date as they are stored
(server_stub/service/report_summary.py): after every kind of report (a new device, a newer
revision replacing, an older one refused, a user with two devices, a report another writer
stored), the service's `status` equals the one a fresh service computes from every report,
and it read only the reports stored since its last call. On both backends."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from agent_helpers import addin_id, manifest

from addin_core.protocol import AgentReport, AppliedAddin, Host
from server_stub.db import Database
from server_stub.service import Service
from server_stub.service.report_summary import applied_keys

ONE, TWO = addin_id("one"), addin_id("two")


def report(client: str, user: str, revision: int, *addins: str) -> AgentReport:
    # Each add-in applied in two hosts: one (add-in, version) all the same.
    return AgentReport(
        client_id=client,
        user_id=user,
        revision=revision,
        reported_at=0.0,
        applied=[
            AppliedAddin(addin_id=a, version="1.0", host=h)
            for a in addins
            for h in (Host.WORD, Host.EXCEL)
        ],
    )


class Reads:
    """What the service's summary read from the database at each catch-up."""

    def __init__(self, database: Database) -> None:
        self.calls: list[tuple[int, int]] = []  # (from generation, rows read)
        real = database.reports_since

        async def spy(generation: int) -> tuple[int, list[tuple[str, str, str]]]:
            got = await real(generation)
            self.calls.append((generation, len(got[1])))
            return got

        database.reports_since = spy  # type: ignore[method-assign]

    def take(self) -> list[tuple[int, int]]:
        calls, self.calls = self.calls, []
        return calls


async def from_scratch(target: str) -> dict[str, Any]:
    """`status` of a new service on the same database: every report read and summed up."""
    database = await Database.open(target)
    try:
        return await Service(database, "contoso").status()
    finally:
        await database.close()


def counts(status: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Per add-in: (users reporting it applied, users reporting)."""
    return {a["addin_id"]: (a["reported_current"], a["reporting"]) for a in status["addins"]}


async def test_status_follows_every_kind_of_report(service: Service, db_target: str) -> None:
    for u in ("ann", "bob", "cat"):
        await service.create_user(u, u)
    for name in ("one", "two"):
        await service.add_lob(manifest(name, "1.0"))
        await service.assign(addin_id(name), "everyone", None, "fixed")
    reads = Reads(service.database)

    async def same_as_from_scratch() -> dict[str, tuple[int, int]]:
        mine = await service.status()
        assert mine == await from_scratch(db_target)
        return counts(mine)

    assert await same_as_from_scratch() == {ONE: (0, 0), TWO: (0, 0)}
    assert reads.take() == [(-1, 0)], "built once, from every report (none)"

    # A new device: folded in as it is stored, so `status` reads nothing.
    await service.record_reports([report("ann-pc", "ann", 1, ONE, TWO)])
    assert reads.take() == [(0, 1)]
    assert await same_as_from_scratch() == {ONE: (1, 1), TWO: (1, 1)}
    assert reads.take() == [(1, 0)]

    # A newer revision replaces the device's report; an older one is refused.
    await service.record_reports([report("ann-pc", "ann", 2, ONE)])
    assert await same_as_from_scratch() == {ONE: (1, 1), TWO: (0, 1)}
    reads.take()
    await service.record_reports([report("ann-pc", "ann", 1, TWO)])
    assert reads.take() == [(2, 0)], "the refused report stored no row"
    assert await same_as_from_scratch() == {ONE: (1, 1), TWO: (0, 1)}

    # A user with two devices has an add-in applied while either of them reports it.
    await service.record_reports(
        [report("bob-pc", "bob", 2, ONE, TWO), report("bob-mac", "bob", 2, ONE, TWO)]
    )
    assert reads.take() == [(3, 0), (3, 2)]
    assert await same_as_from_scratch() == {ONE: (2, 2), TWO: (1, 2)}
    await service.record_reports([report("bob-mac", "bob", 3, ONE)])
    assert await same_as_from_scratch() == {ONE: (2, 2), TWO: (1, 2)}
    await service.record_reports([report("bob-pc", "bob", 3, ONE)])
    assert await same_as_from_scratch() == {ONE: (2, 2), TWO: (0, 2)}

    # Two reports of one device in one batch: the higher revision wins, whatever the order.
    await service.record_reports([report("bob-pc", "bob", 5, TWO), report("bob-pc", "bob", 4)])
    assert await same_as_from_scratch() == {ONE: (2, 2), TWO: (1, 2)}

    # Another writer (a replica, a CLI) stores reports this service never sees: its next
    # `status` reads just those.
    reads.take()
    other = Service(await Database.open(db_target), "contoso")
    try:
        await other.record_reports([report("cat-pc", "cat", 5, TWO)])
        await other.record_reports([report("ann-pc", "ann", 5)])
    finally:
        await other.close()
    assert await same_as_from_scratch() == {ONE: (1, 3), TWO: (2, 3)}
    assert [n for _, n in reads.take()] == [2], "only the other writer's two reports"


async def test_an_admin_write_keeps_the_reports_summary(service: Service, db_target: str) -> None:
    """A new revision changes who is entitled, not what devices reported: `status` recomputes
    the entitlements and reads no report again."""
    for u in ("ann", "bob"):
        await service.create_user(u, u)
    await service.add_lob(manifest("one", "1.0"))
    await service.assign(ONE, "user", "ann", "fixed")
    await service.record_reports([report("ann-pc", "ann", 1, ONE), report("bob-pc", "bob", 1, ONE)])
    assert counts(await service.status()) == {ONE: (1, 1)}
    reads = Reads(service.database)
    await service.assign(ONE, "user", "bob", "fixed")
    mine = await service.status()
    assert counts(mine) == {ONE: (2, 2)}
    assert mine == await from_scratch(db_target)
    assert [n for _, n in reads.take()] == [0]


def test_an_unreadable_applied_list_counts_as_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "addin_server.status"):
        assert applied_keys("pc", "not json") == ()
        assert applied_keys("pc", '[{"version": "1.0"}]') == ()
    assert caplog.text.count("unreadable applied list") == 2
    assert applied_keys(
        "pc",
        '[{"addin_id": "a", "version": "1", "host": "Word"},'
        ' {"addin_id": "a", "version": "1", "host": "Excel"}]',
    ) == (("a", "1"),)


async def test_status_counts_whom_explain_says_is_entitled(service: Service) -> None:
    """An exclusion (a group, a user) takes users out of `status`'s counts as out of
    `explain`'s answer."""
    users = ("ann", "bob", "cat", "dan")
    for u in users:
        await service.create_user(u, u)
    await service.create_group("contractors", "contractors")
    await service.add_member("contractors", "cat")
    for name in ("one", "two"):
        await service.add_lob(manifest(name, "1.0"))
    await service.assign(ONE, "everyone", None, "fixed", ["group:contractors", "user:dan"])
    await service.assign(TWO, "everyone", None, "available", ["user:ann"])
    await service.assign(TWO, "user", "bob", "fixed")
    got = {
        a["addin_id"]: (a["entitled_users"], a["to_install"])
        for a in (await service.status())["addins"]
    }
    for addin in (ONE, TWO):
        modes = [(await service.explain(u, addin))["mode"] for u in users]
        assert got[addin] == (
            sum(m is not None for m in modes),
            sum(m is not None and m != "available" for m in modes),
        )
    assert got == {ONE: (2, 2), TWO: (3, 1)}


async def test_one_addins_status_is_its_line_of_the_whole(service: Service) -> None:
    """`status ADDIN` (by id or name) says what `status` says of it, whether taken from the
    whole one's entitlements or, after a write, computed alone."""
    for u in ("ann", "bob"):
        await service.create_user(u, u)
    for name in ("one", "two"):
        await service.add_lob(manifest(name, "1.0"))
    await service.assign(ONE, "everyone", None, "fixed")
    await service.record_reports([report("ann-pc", "ann", 1, ONE)])
    whole = await service.status()
    for a in whole["addins"]:
        assert (await service.status(a["addin_id"]))["addins"] == [a]
        assert (await service.status(a["name"]))["addins"] == [a]
    await service.assign(TWO, "user", "ann", "fixed")
    alone = (await service.status(TWO))["addins"]
    assert alone == [a for a in (await service.status())["addins"] if a["addin_id"] == TWO]
    assert alone[0]["to_install"] == 1
