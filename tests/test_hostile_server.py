"""Hostile input against the server: every case checks the visible reaction
(the HTTP status and the error text, or the CLI's exit status and message) and that nothing
changed (revision, catalog, retained state on the broker).

One world per module: Mosquitto with the generated password/ACL files and `addin-server
serve` as a real process on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hostile_helpers import (
    ADMIN_TOKEN,
    AGENT_TOKEN,
    World,
    addin_id,
    manifest,
    server_cli,
    sha256,
    wait_for,
)

BASE = manifest("base")
XINCLUDE_NS = "http://www.w3.org/2001/XInclude"


def _with_prolog(decl: str, body: bytes = BASE, entity_ref: str | None = None) -> bytes:
    """`body` with `decl` inserted after the XML declaration (and an entity used in the text)."""
    head, rest = body.decode().split("\n", 1)
    if entity_ref:
        rest = rest.replace("Contoso</ProviderName>", f"{entity_ref}</ProviderName>")
    return f"{head}\n{decl}\n{rest}".encode()


HOSTILE_MANIFESTS: dict[str, tuple[bytes, int, str]] = {
    # name: (body, HTTP status, text the error must contain)
    "xxe-external-entity": (
        _with_prolog(
            '<!DOCTYPE OfficeApp [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>', entity_ref="&xxe;"
        ),
        422,
        "line 2: <!DOCTYPE>: a DOCTYPE is not allowed",
    ),
    "billion-laughs": (
        _with_prolog(
            "<!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            + "".join(
                f"<!ENTITY lol{i} '{('&lol' + str(i - 1) + ';') * 10 if i > 1 else '&lol;' * 10}'>"
                for i in range(1, 10)
            )
            + "]>",
            entity_ref="&lol9;",
        ),
        422,
        "a DOCTYPE is not allowed",
    ),
    "external-dtd": (
        _with_prolog('<!DOCTYPE OfficeApp SYSTEM "http://127.0.0.1:9/evil.dtd">'),
        422,
        "a DOCTYPE is not allowed",
    ),
    "parameter-entity": (
        _with_prolog(
            '<!DOCTYPE x [<!ENTITY % p SYSTEM "http://127.0.0.1:9/p.dtd"> %p;]>',
        ),
        422,
        "a DOCTYPE is not allowed",
    ),
    "undeclared-entity": (
        BASE.replace(b"Contoso</ProviderName>", b"&xxe;</ProviderName>"),
        422,
        "Entity 'xxe' not defined",
    ),
    "invalid-utf8": (
        BASE.replace(b"Contoso</ProviderName>", b"Cont\xff\xfeoso</ProviderName>"),
        422,
        "line 6: (file): invalid UTF-8 (byte 0xff",
    ),
    "wrong-namespace": (
        BASE.replace(b"appforoffice/1.1", b"appforoffice/6.6"),
        422,
        "<OfficeApp>: namespace 'http://schemas.microsoft.com/office/appforoffice/6.6' is not",
    ),
    "invalid-guid": (
        manifest("g", id="12345678-ZZZZ-1234-1234-123456789abc"),
        422,
        "line 4: <Id>: '12345678-ZZZZ-1234-1234-123456789abc' is not a GUID",
    ),
    "version-part-over-5-digits": (
        manifest("v", version="1.0.123456.0"),
        422,
        "line 5: <Version>: '1.0.123456.0': part 3 ('123456') has 6 digits",
    ),
    "http-source-location": (
        manifest("h", url="http://addins.contoso.com/h/index.html"),
        422,
        "<SourceLocation>: 'http://addins.contoso.com/h/index.html' uses http",
    ),
    "javascript-source-location": (
        manifest("j", url="javascript:alert(1)"),
        422,
        "<SourceLocation>:",
    ),
    "unknown-permission": (
        manifest("p", permissions="Everything"),
        422,
        "<Permissions>: 'Everything' is not a permission level of TaskPaneApp",
    ),
    "not-xml": (b"\x00\x01\x02 MZ\x90 binary junk", 422, "invalid manifest"),
    "truncated": (BASE[: len(BASE) // 2], 422, "not well-formed XML"),
    "not-office-app": (b'<?xml version="1.0"?><svg onload="alert(1)"/>', 422, "<svg>"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("hostile-server"))
    try:
        w.start_broker()
        w.start_server()
        w.call("POST", "/v1/groups", json={"id": "sales", "name": "Sales"})
        w.call("PUT", "/v1/groups/sales/members/ann")
        w.upload(BASE)
        w.call("POST", f"/v1/addins/{addin_id('base')}/assign", json={
            "target": "user", "target_id": "bob", "mode": "fixed"})  # fmt: skip
        w.settle()
        yield w
    finally:
        w.stop()


def state(world: World) -> dict[str, Any]:
    """Everything a refused request must leave untouched. The revision is the proof that
    nothing was committed (the outbox is written only by a commit), so nothing can be
    published later either; the watcher confirms that nothing was published so far."""
    return {
        "revision": world.revision(),
        "addins": world.addins(),
        "published": len(world.watcher.messages),
    }


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    before = state(world)
    yield
    assert world.server.poll() is None, "the server must survive hostile input"
    assert state(world) == before


# -- manifests through the admin API ---------------------------------------------------------


@pytest.mark.parametrize("case", sorted(HOSTILE_MANIFESTS))
def test_hostile_manifest_upload_is_refused_with_the_reason(
    world: World, unchanged: None, case: str
) -> None:
    body, status, text = HOSTILE_MANIFESTS[case]
    r = world.http.post("/v1/addins", content=body, headers={"Content-Type": "application/xml"})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert detail.startswith("invalid manifest: ") and text in detail, detail
    assert r.json()["findings"], "the reader's findings come with the refusal"


def test_xinclude_is_not_processed(world: World) -> None:
    # No DOCTYPE needed for XInclude; lxml only expands it when asked to. Here it must stay an
    # inert element: the upload succeeds and nothing of /etc/passwd reaches the catalog.
    xml = BASE.replace(addin_id("base").encode(), addin_id("xinclude").encode()).replace(
        b"<ProviderName>Contoso</ProviderName>",
        f'<ProviderName>Contoso<xi:include xmlns:xi="{XINCLUDE_NS}" href="/etc/passwd" '
        'parse="text"/></ProviderName>'.encode(),
    )
    out = world.upload(xml)
    got = world.call("GET", f"/v1/addins/{out['addin_id']}")
    assert "root:" not in str(got)
    served = world.http.get(f"/v1/manifests/{sha256(xml)}")
    assert served.content == xml  # served byte for byte, never re-serialised with expansions
    world.call("DELETE", f"/v1/addins/{out['addin_id']}")


def test_ten_megabyte_manifest_is_refused_before_it_is_read(world: World, unchanged: None) -> None:
    big = BASE + b"<!--" + b"x" * (10 * 1024 * 1024) + b"-->"
    r = world.http.post("/v1/addins", content=big, headers={"Content-Type": "application/xml"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "manifest is larger than 524288 bytes (512 KB)"


def test_ten_megabyte_manifest_without_content_length_is_refused(
    world: World, unchanged: None
) -> None:
    # Chunked transfer: no Content-Length to check up front; the bytes are counted as they come.
    def chunks() -> Iterator[bytes]:
        yield BASE
        for _ in range(10):
            yield b"<!--" + b"x" * (1024 * 1024) + b"-->"

    r = world.http.post("/v1/addins", content=chunks(), headers={"Content-Type": "application/xml"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == "manifest is larger than 524288 bytes (512 KB)"


def test_downgrade_is_refused(world: World, unchanged: None) -> None:
    r = world.http.post(
        "/v1/addins",
        content=manifest("base", version="0.9"),
        headers={"Content-Type": "application/xml"},
    )
    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        f"add-in {addin_id('base')}: version 0.9 is not greater than the deployed version "
        "1.0.0.0; an update needs a strictly greater <Version>"
    )


def test_same_version_with_other_content_is_refused(world: World, unchanged: None) -> None:
    # 1.0 == 1.0.0.0: a re-upload under the same version must not swap the bytes silently.
    r = world.http.post(
        "/v1/addins",
        content=manifest("base", version="1.0", display="Base, quietly changed"),
        headers={"Content-Type": "application/xml"},
    )
    assert r.status_code == 409, r.text
    assert "version 1.0 is not greater than the deployed version 1.0.0.0" in r.json()["detail"]


def test_permission_escalation_is_held_as_needs_consent(world: World) -> None:
    esc = addin_id("escalate")
    topic = f"addins/v1/contoso/catalog/{esc}"

    def published() -> list[bytes]:
        return [p for t, p, _ in world.watcher.messages if t == topic]

    world.upload(manifest("escalate"))
    wait_for(published, 10, "version 1 published")
    out = world.upload(manifest("escalate", version="2.0.0.0", permissions="ReadWriteDocument"))
    assert out["state"] == "needs_consent" and out["version"] == "2.0.0.0"
    shown = world.call("GET", f"/v1/addins/{esc}")
    assert shown["state"] == "needs_consent"
    # Agents are told 2.0.0.0 waits (`withheld`), never given it: the entry keeps 1.0.0.0 and
    # carries no hash of 2.0.0.0. The server publishes in revision order, so the disable after
    # it proves nothing else left for it.
    world.call("POST", f"/v1/addins/{esc}/disable")
    wait_for(lambda: len(published()) == 3, 10, "the disable is published")
    entries = [json.loads(p) for p in published()]
    assert [e["version"] for e in entries] == ["1.0.0.0", "1.0.0.0", "1.0.0.0"]
    assert [e.get("withheld", {}).get("version") for e in entries] == [None, "2.0.0.0", "2.0.0.0"]
    assert entries[1]["withheld"]["permissions"] == "ReadWriteDocument"
    assert entries[2]["enabled"] is False
    world.call("DELETE", f"/v1/addins/{esc}")


# -- ids that could reach a topic --------------------------------------------------------------

UNSAFE_IDS = ["a#b", "a+b", "a/b", "a\x00b", "#", "+", "../x", " ann", "a b", ""]


@pytest.mark.parametrize("bad", UNSAFE_IDS, ids=repr)
def test_unsafe_user_and_group_ids_are_refused(world: World, unchanged: None, bad: str) -> None:
    for path in ("/v1/users", "/v1/groups"):
        r = world.http.post(path, json={"id": bad, "name": "x"})
        assert r.status_code == 400, (path, r.text)
        assert "id" in r.json()["detail"] and "use 1-128 characters" in r.json()["detail"]
    r = world.http.post(
        f"/v1/addins/{addin_id('base')}/assign",
        json={"target": "group", "target_id": bad, "mode": "fixed"},
    )
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("bad", ["a#b", "a+b", "a%2Fb", "a%00b"])
def test_unsafe_ids_in_paths_are_refused(world: World, unchanged: None, bad: str) -> None:
    r = world.http.put(f"/v1/groups/sales/members/{bad.replace('#', '%23').replace('+', '%2B')}")
    assert r.status_code in (400, 404), r.text
    assert r.json()["detail"]


def test_a_deeply_nested_org_document_is_a_clear_400(world: World, unchanged: None) -> None:
    for body in (b"[" * 200_000, b'{"users": ' * 100_000):
        r = world.http.post("/v1/org", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == "malformed request: body: nested too deeply"


# -- tokens ------------------------------------------------------------------------------------


def _bearer(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        _bearer("wrong"),
        _bearer(AGENT_TOKEN[:-1]),  # a prefix of the real token
        _bearer(AGENT_TOKEN + "x"),
        {"Authorization": f"Basic {AGENT_TOKEN}"},
        {"Authorization": AGENT_TOKEN},
        {"X-Api-Key": AGENT_TOKEN},
    ],
    ids=["missing", "wrong", "prefix", "longer", "basic-scheme", "no-scheme", "other-header"],
)
def test_manifest_endpoint_refuses_a_missing_or_wrong_token(
    world: World, headers: dict[str, str]
) -> None:
    url = f"{world.url}/v1/manifests/{sha256(BASE)}"
    r = httpx.get(url, headers=headers, timeout=5)
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "missing or wrong bearer token"}
    assert r.headers["www-authenticate"] == "Bearer"
    assert BASE not in r.content
    # With the right tokens the same URL serves the bytes.
    for good in (AGENT_TOKEN, ADMIN_TOKEN):
        ok = httpx.get(url, headers=_bearer(good), timeout=5)
        assert ok.status_code == 200 and ok.content == BASE


@pytest.mark.parametrize("token", [None, "wrong", AGENT_TOKEN], ids=["missing", "wrong", "agent"])
@pytest.mark.parametrize(
    "method,path,body",
    [
        ("GET", "/v1/addins", None),
        ("POST", "/v1/users", {"id": "mallory"}),
        ("POST", "/v1/addins/{base}/assign", {"target": "everyone", "mode": "fixed"}),
        ("DELETE", "/v1/addins/{base}", None),
        ("PUT", "/v1/policy", {"nested_groups": True}),
        ("GET", "/v1/explain?user=ann&addin={base}", None),
    ],
)
def test_admin_api_refuses_a_missing_wrong_or_agent_token(
    world: World, unchanged: None, token: str | None, method: str, path: str, body: Any
) -> None:
    url = world.url + path.format(base=addin_id("base"))
    r = httpx.request(method, url, headers=_bearer(token), json=body, timeout=5)
    assert r.status_code == 401, r.text
    assert r.json() == {"detail": "missing or wrong bearer token"}


def test_manifest_endpoint_is_not_a_file_server(world: World) -> None:
    # The client resolves "../server.db" to /v1/server.db: not an agent route, so the agent
    # token is refused there; the rest reach the manifest route and are unknown.
    probes = {"../server.db": 401, "..%2F..%2Fetc%2Fpasswd": 404, "A" * 64: 404}
    probes[sha256(b"nothing")] = 404
    for probe, status in probes.items():
        r = httpx.get(f"{world.url}/v1/manifests/{probe}", headers=_bearer(AGENT_TOKEN), timeout=5)
        assert r.status_code == status, (probe, r.text)
        assert b"root:" not in r.content and b"SQLite" not in r.content


# -- the CLI on the same database ----------------------------------------------------------------


@pytest.mark.parametrize("case", ["xxe-external-entity", "billion-laughs", "invalid-utf8"])
def test_cli_add_refuses_hostile_manifest_files(
    world: World, unchanged: None, tmp_path: Path, case: str
) -> None:
    body, _, text = HOSTILE_MANIFESTS[case]
    f = tmp_path / f"{case}.xml"
    f.write_bytes(body)
    r = server_cli(world.db, "addin", "add", str(f))
    assert r.returncode != 0
    assert r.stderr.startswith("error: invalid manifest: ") and text in r.stderr, r.stderr
    v = server_cli(None, "manifest", "validate", str(f))
    assert v.returncode == 1 and text in v.stdout + v.stderr
