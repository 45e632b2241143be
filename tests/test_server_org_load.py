"""The ORG document of `load` / ``POST /v1/org``: a bad document is refused with one clear
error and changes nothing; a good one loads in one revision, and loading it again adds nothing."""

from __future__ import annotations

from typing import Any

import pytest
from server_helpers import GIFME_ID, TASKPANE_ID, TASKPANE_V1

from server_stub.service import BadRequest, Conflict, NotFound, OperationError, Service

GOOD: dict[str, Any] = {
    "tenant": "contoso",
    "policy": {"nested_groups": True},
    "users": [{"id": "ann"}, {"id": "bob", "name": "Bob"}],
    "groups": [
        {"id": "sales", "members": ["ann"]},
        {"id": "emea", "members": ["bob"], "parents": ["sales"]},
    ],
    "addins": [{"manifest": "taskpane.xml"}, {"store": "WA104379501"}],
    "assignments": [
        {"addin": TASKPANE_ID, "target": "group:sales"},
        {"addin": GIFME_ID, "target": "everyone", "mode": "available"},
    ],
}


async def test_a_document_loads_in_one_revision_and_again_adds_nothing(service: Service) -> None:
    def read(path: str) -> bytes:
        assert path == "taskpane.xml"
        return TASKPANE_V1.read_bytes()

    first = await service.load_org(GOOD, read)
    assert first["revision"] == 1
    assert (first["users"], first["groups"], first["memberships"], first["nestings"]) == (
        2,
        2,
        2,
        1,
    )
    assert {a["addin_id"] for a in first["addins_added_or_updated"]} == {TASKPANE_ID, GIFME_ID}
    assert first["assignments"] == 2
    assert (await service.get_group("emea"))["parents"] == ["sales"]
    assert await service.nested_groups() is True
    again = await service.load_org(GOOD, read)
    assert again["addins_added_or_updated"] == []
    assert len(await service.list_addins()) == 2


@pytest.mark.parametrize(
    ("doc", "error", "says"),
    [
        ([1, 2], BadRequest, "the org document must be a mapping"),
        ({"users": "ann"}, BadRequest, "invalid org document: users: "),
        ({"users": [{"name": "no id"}]}, BadRequest, "invalid org document: users.0.id"),
        ({"users": [{"id": "ann", "email": "x"}]}, BadRequest, "users.0.email"),
        ({"policy": {"nested_groups": 1}}, BadRequest, "policy.nested_groups"),
        ({"policy": {"nested_groups": "yes"}}, BadRequest, "policy.nested_groups"),
        ({"tenant": "fabrikam"}, BadRequest, "org document is for tenant 'fabrikam'"),
        ({"users": [{"id": "a b"}]}, BadRequest, "user id"),
        ({"groups": [{"id": "g", "members": ["nobody"]}]}, NotFound, "unknown member 'nobody'"),
        ({"groups": [{"id": "g", "parents": ["g"]}]}, Conflict, "would make a cycle: g -> g"),
        ({"addins": [{}]}, BadRequest, "addins[0] needs manifest, manifest_xml or store"),
        ({"addins": [{"store": "WA1"}]}, NotFound, "invalid store asset id"),
        ({"addins": [{"manifest_xml": "<nope/>"}]}, OperationError, "addins[0]: invalid manifest"),
        ({"assignments": [{"addin": "x", "target": "everyone"}]}, NotFound, "unknown add-in 'x'"),
    ],
)
async def test_a_bad_document_is_refused_whole(
    service: Service, doc: Any, error: type[OperationError], says: str
) -> None:
    await service.create_user("keep")
    with pytest.raises(error) as refused:
        await service.load_org(doc)
    assert says in refused.value.message
    assert "\n" not in refused.value.message
    assert await service.revision() == 1  # nothing of the document was committed
