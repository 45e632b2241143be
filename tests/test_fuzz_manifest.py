"""Fuzzing the manifest reader: `read_manifest` never raises and never hits its
internal-error safety net; `parse_manifest` raises only `ManifestError`; a manifest judged valid
really follows the rules; nothing outside the bytes (files, network) ever gets in.

Inputs: random bytes, real manifests from ../shared/corpus/manifests/real mutated byte-wise and
structure-aware (hostile snippets, replaced field values, truncation, re-encoding), and
generated manifests with random field values. Bounded in CI; `scripts/fuzz.sh` runs longer.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fuzzing import fuzz_settings, run
from hostile_helpers import TASKPANE
from hypothesis import given
from hypothesis import strategies as st

from addin_core.manifest import (
    ManifestError,
    ManifestReport,
    hosts_or_permissions_changed,
    parse_manifest,
    read_manifest,
)
from addin_core.version import InvalidVersion, compare_versions, parse_version

GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

SNIPPETS = [
    b'<!DOCTYPE OfficeApp [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
    b"<!DOCTYPE x [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;'>]>",
    b'<!DOCTYPE x SYSTEM "http://127.0.0.1:9/x.dtd">',
    b"&xxe;",
    b"&b;",
    b"&#0;",
    b"&#x110000;",
    b"&lt;&amp;",
    b"<![CDATA[ <Id>x</Id> ]]>",
    b"<?xml-stylesheet href='http://127.0.0.1:9/x'?>",
    b"<!-- -->",
    b"\x00",
    b"\xff\xfe",
    b"\xef\xbb\xbf",
    b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
    b"</OfficeApp>",
    b"<OfficeApp>",
    b'xmlns="urn:evil"',
    b'xsi:type="MailApp"',
    b"<Version>99999.99999.99999.99999.1</Version>",
    b"<Id>{00000000-0000-0000-0000-000000000000}</Id>",
    b'<SourceLocation DefaultValue="http://evil.example/"/>',
    b'<SourceLocation DefaultValue="https://localhost:3000/"/>',
    b'<xi:include href="/etc/passwd" parse="text" xmlns:xi="http://www.w3.org/2001/XInclude"/>',
    b"<a>" * 300,
    b"\r\n",
    b'"',
    b"<",
    b"&",
    b"]]>",
]
FIELDS = [b"Id", b"Version", b"Permissions", b"ProviderName", b"DefaultLocale", b"Host"]


def check(data: bytes) -> ManifestReport:
    """The reader's contract, for any input."""
    report = read_manifest(data)
    assert isinstance(report, ManifestReport)
    assert not [f for f in report.errors if f.code == "internal-error"], report.errors
    assert report.valid == (report.manifest is not None and not report.errors)
    for f in (*report.errors, *report.warnings):
        assert f.code and f.element and f.reason and (f.line is None or f.line >= 1)
        str(f)
        f.as_dict()
    assert "root:x:0" not in repr(report), "file content leaked into the manifest"
    assert read_manifest(data) == report, "the reader is deterministic"
    try:
        m = parse_manifest(data)
    except ManifestError as e:
        assert not report.valid and e.report == report
    else:
        assert report.valid and m == report.manifest
        assert GUID.match(m.id), m.id
        parse_version(m.version)
        for url in m.source_locations:
            assert url.lower().startswith("https://") or "~remoteAppUrl" in url, url
        assert not hosts_or_permissions_changed(m, m)
    return report


def corpus(corpus_dir: Path) -> list[bytes]:
    files = sorted(corpus_dir.rglob("*.xml"))
    assert len(files) >= 250, f"only {len(files)} manifests in {corpus_dir}"
    return [f.read_bytes() for f in files]


@st.composite
def mutated(draw: st.DrawFn, bases: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 6))):
        n = len(data)
        op = draw(st.sampled_from(["flip", "delete", "duplicate", "insert", "field", "cut"]))
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == "flip" and n:
            data[pos] = draw(st.integers(0, 255))
        elif op == "delete" and n:
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "duplicate" and n:
            chunk = data[pos : pos + draw(st.integers(1, 256))]
            data[pos:pos] = chunk
        elif op == "insert":
            data[pos:pos] = draw(st.sampled_from(SNIPPETS))
        elif op == "field":
            name = draw(st.sampled_from(FIELDS))
            text = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
            m = re.search(rb"<" + name + rb"[^>]*>([^<]*)</", bytes(data))
            if m:
                data[m.start(1) : m.end(1)] = text
        elif op == "cut":
            del data[pos:]
    out = bytes(data)
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        # Re-encode as UTF-16 with a BOM (accepted by the reader) when it is text at all.
        try:
            out = b"\xff\xfe" + out.decode("utf-8").encode("utf-16-le")
        except UnicodeDecodeError:
            pass
    return out


def test_fuzz_any_bytes() -> None:
    @fuzz_settings()
    @given(st.binary(max_size=4096))
    def target(data: bytes) -> None:
        check(data)

    run(target)


def test_fuzz_mutated_real_manifests(corpus_dir: Path) -> None:
    bases = corpus(corpus_dir)

    @fuzz_settings()
    @given(mutated(bases))
    def target(data: bytes) -> None:
        check(data)

    run(target)


def test_every_corpus_manifest_meets_the_contract(corpus_dir: Path) -> None:
    valid = sum(check(data).valid for data in corpus(corpus_dir))
    assert valid > 0


_xml_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=30
)


@st.composite
def generated(draw: st.DrawFn) -> bytes:
    """A task-pane manifest whose field values are random: sometimes valid, often not."""

    def pick(good: st.SearchStrategy[str]) -> str:
        return draw(st.one_of(good, _xml_text))

    version = pick(st.lists(st.integers(0, 10**6).map(str), min_size=1, max_size=5).map(".".join))
    return TASKPANE.format(
        id=pick(
            st.uuids().map(lambda u: draw(st.sampled_from([str(u), f"{{{u}}}", str(u).upper()])))
        ),
        version=version,
        name=pick(st.sampled_from(["Notes", "A & B", "<b>", "[/bold]"])),
        permissions=pick(
            st.sampled_from(
                [
                    "Restricted",
                    "ReadDocument",
                    "ReadAllDocument",
                    "WriteDocument",
                    "ReadWriteDocument",
                    "ReadWriteMailbox",
                    "readdocument",
                ]
            )
        ),
        url=pick(
            st.sampled_from(
                [
                    "https://a.example/",
                    "http://a.example/",
                    "https://localhost/",
                    "javascript:x",
                    "file:///etc/passwd",
                    "//a.example/",
                ]
            )
        ),
    ).encode("utf-8", "surrogatepass")


def test_fuzz_generated_manifests() -> None:
    @fuzz_settings()
    @given(generated(), generated())
    def target(a: bytes, b: bytes) -> None:
        ra, rb = check(a), check(b)
        if ra.manifest is not None and rb.manifest is not None:
            hosts_or_permissions_changed(ra.manifest, rb.manifest)
            try:
                compare_versions(ra.manifest.version, rb.manifest.version)
            except InvalidVersion:
                # Only a manifest with a <Version> error may carry an unparsable version.
                assert not (ra.valid and rb.valid)

    run(target)


@pytest.mark.parametrize("a,b", [("1.10", "1.9"), ("1.0", "1.0.0.0"), ("0.0.0.1", "0")])
def test_version_order_examples_hold(a: str, b: str) -> None:
    assert compare_versions(a, b) >= 0


def test_fuzz_version_strings() -> None:
    @fuzz_settings()
    @given(st.text(alphabet="0123456789.-+ x\x00", max_size=30), st.text(max_size=12))
    def target(a: str, b: str) -> None:
        for text in (a, b):
            try:
                parts = parse_version(text)
            except InvalidVersion:
                continue
            assert 1 <= len(parts) <= 4
        try:
            c = compare_versions(a, b)
        except InvalidVersion:
            return
        assert c in (-1, 0, 1) and compare_versions(b, a) == -c

    run(target)
