"""Manifest reader: extraction from hand-written manifests and each validation rule.

Every error must name the element, its line and the reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from addin_core.manifest import (
    MAX_MANIFEST_BYTES,
    Finding,
    Manifest,
    ManifestError,
    ManifestReport,
    ManifestType,
    hosts_or_permissions_changed,
    parse_manifest,
    read_manifest,
)
from addin_core.protocol import Host

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# A minimal valid TaskPaneApp; line numbers matter to the tests below (line 1 is the root).
TEMPLATE = """<OfficeApp xmlns="{ns}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:type="{type}">
  <Id>{id}</Id>
  <Version>{version}</Version>
  <ProviderName>Contoso</ProviderName>
  <DefaultLocale>en-US</DefaultLocale>
  <DisplayName DefaultValue="Name"/>
  <Description DefaultValue="Words"/>
  <DefaultSettings>
    <SourceLocation DefaultValue="{source}"/>
  </DefaultSettings>
  <Permissions>{permissions}</Permissions>
</OfficeApp>
"""
DEFAULTS = {
    "ns": "http://schemas.microsoft.com/office/appforoffice/1.1",
    "type": "TaskPaneApp",
    "id": "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d",
    "version": "1.0.0.0",
    "source": "https://addins.contoso.com/x.html",
    "permissions": "ReadDocument",
}


def make(**fields: str) -> bytes:
    return TEMPLATE.format(**{**DEFAULTS, **fields}).encode()


def only_error(report: ManifestReport) -> Finding:
    assert len(report.errors) == 1, report.errors
    return report.errors[0]


# ---------------------------------------------------------------------------------------------
# extraction


def test_taskpane_fields() -> None:
    report = read_manifest(fixture("taskpane.xml"))
    assert report.valid and report.errors == () and report.warnings == ()
    m = report.manifest
    assert m is not None
    assert m.id == "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d"  # braces and case normalised
    assert m.version == "1.10.0.0"
    assert (m.provider_name, m.default_locale) == ("Contoso", "en-US")
    assert (m.display_name, m.description) == ("Contoso Tables", "Insert Contoso tables.")
    assert m.type is ManifestType.TASKPANE
    # base Workbook, Document; VersionOverrides adds Presentation; sorted and deduplicated
    assert m.hosts == (Host.EXCEL, Host.POWERPOINT, Host.WORD)
    assert m.other_hosts == ("Project",)
    assert m.permissions == "ReadWriteDocument"
    assert m.source_locations == (
        "https://addins.contoso.com/tables/taskpane.html",
        "https://addins.contoso.com/tables/fr/taskpane.html",
        "https://addins.contoso.com/tables/commands.html",
    )
    # a Set without MinVersion takes the Sets' DefaultMinVersion
    assert m.requirement_sets == (("ExcelApi", "1.7"), ("WordApi", "1.1"))


def test_content_fields_and_localhost_warning() -> None:
    report = read_manifest(fixture("content.xml"))
    assert report.valid
    m = report.manifest
    assert m is not None
    assert (m.type, m.version, m.hosts, m.permissions) == (
        ManifestType.CONTENT,
        "2.0",
        (Host.EXCEL,),
        "ReadDocument",
    )
    assert m.requirement_sets == ()
    (warning,) = report.warnings
    assert (warning.code, warning.element, warning.line) == (
        "localhost-source",
        "<SourceLocation>",
        13,
    )


def test_bom_and_crlf_read_like_the_plain_file() -> None:
    assert fixture("content_bom_crlf.xml").startswith(b"\xef\xbb\xbf")
    assert b"\r\n" in fixture("content_bom_crlf.xml")
    plain, bom = (
        read_manifest(fixture("content.xml")),
        read_manifest(fixture("content_bom_crlf.xml")),
    )
    assert bom == plain  # same fields, same findings, same line numbers


def test_utf16_with_bom_is_accepted() -> None:
    data = fixture("content.xml").decode().replace('encoding="UTF-8"', 'encoding="UTF-16"')
    report = read_manifest(data.encode("utf-16"))
    assert report.valid, report.errors
    assert report.manifest == read_manifest(fixture("content.xml")).manifest


def test_mail_nested_version_overrides() -> None:
    report = read_manifest(fixture("mail.xml"))
    assert report.valid and report.warnings == ()
    m = report.manifest
    assert m is not None
    assert m.type is ManifestType.MAIL
    assert m.hosts == (Host.OUTLOOK,) and m.other_hosts == ()
    assert m.permissions == "ReadWriteItem"
    # base SourceLocation and the V1_1 task pane's resid; a FunctionFile is not a SourceLocation
    assert m.source_locations == (
        "https://mail.contoso.com/read.html",
        "https://mail.contoso.com/taskpane.html",
    )
    assert m.requirement_sets == (("Mailbox", "1.1"), ("Mailbox", "1.3"), ("Mailbox", "1.5"))


def test_appforoffice_1_0_capabilities() -> None:
    report = read_manifest(fixture("mail_v1_0.xml"))
    assert report.valid
    m = report.manifest
    assert m is not None
    assert (m.type, m.version, m.hosts, m.permissions) == (
        ManifestType.MAIL,
        "1.0",
        (Host.OUTLOOK,),
        "ReadItem",
    )
    assert m.source_locations == ("https://old.contoso.com/read.html",)
    assert [w.code for w in report.warnings] == ["missing-element"]  # no <Requirements>


def test_mail_without_hosts_runs_in_outlook_and_missing_permissions_is_restricted() -> None:
    data = (
        fixture("mail_v1_0.xml")
        .replace(b'<Capabilities>\n    <Capability Name="Mailbox"/>\n  </Capabilities>\n', b"")
        .replace(b"<Permissions>ReadItem</Permissions>", b"")
    )
    report = read_manifest(data)
    assert report.valid
    assert report.manifest is not None
    assert report.manifest.hosts == (Host.OUTLOOK,)
    assert report.manifest.permissions == "Restricted"
    assert "missing-element" in {w.code for w in report.warnings}


def test_taskpane_without_hosts_has_no_hosts() -> None:
    m = parse_manifest(make())
    assert m.hosts == () and m.other_hosts == ()


def test_text_ignores_comments_and_whitespace() -> None:
    m = parse_manifest(
        make(id="\n  <!-- c --> 0E3B2C1A-5D4F-4A6B-8C7D-9E0F1A2B3C4D  ", version=" 2.0 ")
    )
    assert m.id == "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d" and m.version == "2.0"


def test_prefixed_xsi_type_and_1_0_namespace() -> None:
    m = parse_manifest(
        make(type="x:ContentApp", ns="http://schemas.microsoft.com/office/appforoffice/1.0")
    )
    assert m.type is ManifestType.CONTENT


# ---------------------------------------------------------------------------------------------
# validation rules: code, element, line, reason


@pytest.mark.parametrize(
    ("fields", "code", "element", "line", "reason"),
    [
        ({"id": "not-a-guid"}, "bad-id", "<Id>", 2, "'not-a-guid' is not a GUID"),
        ({"id": "{0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d"}, "bad-id", "<Id>", 2, "is not a GUID"),
        ({"id": "0e3b2c1a5d4f4a6b8c7d9e0f1a2b3c4d"}, "bad-id", "<Id>", 2, "is not a GUID"),
        ({"id": ""}, "missing-element", "<Id>", 2, "empty"),
        (
            {"version": "1.0.0.0.0"},
            "bad-version",
            "<Version>",
            3,
            "'1.0.0.0.0' has 5 parts; at most 4 are allowed",
        ),
        ({"version": "1.123456"}, "bad-version", "<Version>", 3, "has 6 digits"),
        ({"version": "1.x"}, "bad-version", "<Version>", 3, "is not a number"),
        (
            {"permissions": "ReadItem"},
            "bad-permission",
            "<Permissions>",
            11,
            "'ReadItem' is not a permission level of TaskPaneApp",
        ),
        (
            {"type": "MailApp", "permissions": "ReadWriteDocument"},
            "bad-permission",
            "<Permissions>",
            11,
            "not a permission level of MailApp",
        ),
        ({"permissions": "readwritedocument"}, "bad-permission", "<Permissions>", 11, "expected"),
        (
            {"source": "http://addins.contoso.com/x.html"},
            "http-source",
            "<SourceLocation>",
            9,
            "uses http; a SourceLocation must use https",
        ),
        (
            {"source": "http://localhost:3000/x.html"},
            "http-source",
            "<SourceLocation>",
            9,
            "even for localhost",
        ),
        (
            {"source": "ftp://contoso.com/x"},
            "bad-source",
            "<SourceLocation>",
            9,
            "not an absolute https URL",
        ),
        (
            {"source": "/relative/x.html"},
            "bad-source",
            "<SourceLocation>",
            9,
            "not an absolute https URL",
        ),
        ({"source": "https://"}, "bad-source", "<SourceLocation>", 9, "not an absolute https URL"),
        ({"source": "https://[::1"}, "bad-source", "<SourceLocation>", 9, "not a URL"),
        (
            {"source": "~remoteAppUrl/Home.html"},
            "placeholder-source",
            "<SourceLocation>",
            9,
            "Visual Studio placeholder",
        ),
        ({"source": ""}, "missing-element", "<SourceLocation>", 9, "DefaultValue"),
        ({"type": "OutlookApp"}, "unknown-type", "<OfficeApp>", 1, "'OutlookApp' is not"),
        ({"type": ""}, "unknown-type", "<OfficeApp>", 1, "xsi:type attribute"),
        (
            {"ns": "urn:other"},
            "wrong-namespace",
            "<OfficeApp>",
            1,
            "'urn:other' is not appforoffice",
        ),
    ],
)
def test_rule(fields: dict[str, str], code: str, element: str, line: int, reason: str) -> None:
    report = read_manifest(make(**fields))
    error = only_error(report)
    assert (error.code, error.element, error.line) == (code, element, line)
    assert reason in error.reason
    assert not report.valid
    assert str(error).startswith(f"line {line}: {element}: ")


@pytest.mark.parametrize(
    ("element", "text"),
    [
        ("Id", "  <Id>0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d</Id>\n"),
        ("Version", "  <Version>1.0.0.0</Version>\n"),
        ("ProviderName", "  <ProviderName>Contoso</ProviderName>\n"),
        ("DefaultLocale", "  <DefaultLocale>en-US</DefaultLocale>\n"),
        ("DisplayName", '  <DisplayName DefaultValue="Name"/>\n'),
        ("Description", '  <Description DefaultValue="Words"/>\n'),
        ("Permissions", "  <Permissions>ReadDocument</Permissions>\n"),
        (
            "SourceLocation",
            '  <DefaultSettings>\n    <SourceLocation DefaultValue="https://addins.contoso.com/x.html"/>\n  </DefaultSettings>\n',
        ),
    ],
)
def test_missing_required_element(element: str, text: str) -> None:
    data = make().decode()
    assert text in data
    error = only_error(read_manifest(data.replace(text, "").encode()))
    assert (error.code, error.element, error.line) == ("missing-element", f"<{element}>", 1)
    assert "required element missing" in error.reason


@pytest.mark.parametrize(
    ("element", "copy"),
    [
        ("Permissions", "  <Permissions>ReadWriteDocument</Permissions>\n"),
        ("Version", "  <Version>9.0.0.0</Version>\n"),
        ("Id", "  <Id>11111111-2222-3333-4444-555555555555</Id>\n"),
        ("DisplayName", '  <DisplayName DefaultValue="Other"/>\n'),
        ("DefaultSettings", "  <DefaultSettings/>\n"),
    ],
)
def test_duplicate_single_valued_element_is_refused(element: str, copy: str) -> None:
    # The copy goes last (line 12), after the original: the first one must not silently win.
    data = make().decode().replace("</OfficeApp>", copy + "</OfficeApp>").encode()
    report = read_manifest(data)
    assert not report.valid
    error = only_error(report)
    assert (error.code, error.element, error.line) == ("duplicate-element", f"<{element}>", 12)
    assert "first on line" in error.reason and "allows it once" in error.reason


def test_repeated_multi_valued_elements_are_fine() -> None:
    # <VersionOverrides> in another namespace and nested elements may repeat.
    data = make().replace(
        b"</OfficeApp>",
        b'  <VersionOverrides xmlns="http://schemas.microsoft.com/office/taskpaneappversionoverrides"/>\n'
        b'  <VersionOverrides xmlns="http://schemas.microsoft.com/office/taskpaneappversionoverrides"/>\n'
        b"</OfficeApp>",
    )
    assert read_manifest(data).valid


def test_display_name_without_default_value() -> None:
    error = only_error(read_manifest(make().replace(b' DefaultValue="Name"', b"")))
    assert (error.code, error.element, error.line) == ("missing-element", "<DisplayName>", 6)


def test_several_errors_are_all_reported_in_line_order() -> None:
    report = read_manifest(fixture("invalid_fields.xml"))
    assert report.manifest is not None and not report.valid
    assert [(e.code, e.element, e.line) for e in report.errors] == [
        ("missing-element", "<Description>", 2),
        ("bad-id", "<Id>", 3),
        ("bad-version", "<Version>", 4),
        ("http-source", "<SourceLocation>", 12),
        ("bad-permission", "<Permissions>", 14),
    ]
    assert str(report.errors[2]) == (
        "line 4: <Version>: '1.0.0.0.0' has 5 parts; at most 4 are allowed"
    )


def test_version_overrides_url_is_checked_where_it_is_written() -> None:
    data = fixture("taskpane.xml").replace(
        b'DefaultValue="https://addins.contoso.com/tables/commands.html"',
        b'DefaultValue="http://addins.contoso.com/tables/commands.html"',
    )
    error = only_error(read_manifest(data))
    assert (error.code, error.element, error.line) == (
        "http-source",
        '<bt:Url id="Taskpane.Url">',
        52,
    )


def test_unknown_resid_is_a_warning() -> None:
    data = fixture("taskpane.xml").replace(b'resid="Taskpane.Url"', b'resid="Nowhere"')
    report = read_manifest(data)
    assert report.valid
    (warning,) = report.warnings
    assert (warning.code, warning.element, warning.line) == (
        "missing-resource",
        "<SourceLocation>",
        40,
    )


def test_root_must_be_office_app() -> None:
    error = only_error(read_manifest(b"<?xml version='1.0'?>\n<Manifest/>"))
    assert (error.code, error.element, error.line) == ("wrong-namespace", "<Manifest>", 2)
    assert read_manifest(b"<Manifest/>").manifest is None


# ---------------------------------------------------------------------------------------------
# hostile and broken input


@pytest.mark.parametrize("name", ["xxe.xml", "billion_laughs.xml"])
def test_doctype_is_refused(name: str) -> None:
    report = read_manifest(fixture(name))
    error = only_error(report)
    assert (error.code, error.element, error.line) == ("dtd-forbidden", "<!DOCTYPE>", 2)
    assert report.manifest is None


def test_doctype_after_comment_is_refused() -> None:
    data = b"<!-- hi -->\n<?pi x?>\n<!DOCTYPE OfficeApp SYSTEM 'http://evil.example/x.dtd'>\n<OfficeApp/>"
    error = only_error(read_manifest(data))
    assert (error.code, error.line) == ("dtd-forbidden", 3)


def test_too_large_is_refused_before_parsing() -> None:
    data = make() + b"<!--" + b"x" * MAX_MANIFEST_BYTES + b"-->"
    error = only_error(read_manifest(data))
    assert error.code == "too-large" and "512 KB" in error.reason


def test_exactly_the_limit_is_accepted() -> None:
    base = make()
    padding = MAX_MANIFEST_BYTES - len(base) - len(b"<!---->")
    data = base + b"<!--" + b"x" * padding + b"-->"
    assert len(data) == MAX_MANIFEST_BYTES
    assert read_manifest(data).valid


def test_invalid_utf8_names_the_line() -> None:
    error = only_error(read_manifest(fixture("latin1.xml")))
    assert (error.code, error.element, error.line) == ("bad-encoding", "(file)", 7)
    assert "invalid UTF-8 (byte 0xe4" in error.reason


def test_not_well_formed_names_the_line() -> None:
    data = make().replace(b"</ProviderName>", b"</Provider>")
    error = only_error(read_manifest(data))
    assert (error.code, error.line) == ("not-well-formed", 4)
    assert "ProviderName" in error.reason


def test_truncated_names_the_last_line() -> None:
    data = make()[: -len(b"</OfficeApp>\n")]
    error = only_error(read_manifest(data))
    assert error.code == "not-well-formed" and error.line == 12  # end of data
    assert "Premature end of data" in error.reason


@pytest.mark.parametrize("data", [b"", b"   \n", b"\xef\xbb\xbf", b"\x00\x01", b"<", b"not xml"])
def test_junk_is_an_error_not_an_exception(data: bytes) -> None:
    report = read_manifest(data)
    assert not report.valid and report.manifest is None and report.errors


def test_deep_nesting_is_refused_not_a_crash() -> None:
    data = make().replace(b"</OfficeApp>", b"<a>" * 5000 + b"</a>" * 5000 + b"</OfficeApp>")
    report = read_manifest(data)
    assert not report.valid
    assert report.errors[0].code == "not-well-formed"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_any_bytes_never_raise(data: bytes) -> None:
    report = read_manifest(data)
    assert isinstance(report, ManifestReport)
    assert report.valid == (report.manifest is not None and not report.errors)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_manifests_never_raise(data: st.DataObject) -> None:
    original = fixture("mail.xml")
    start = data.draw(st.integers(0, len(original)))
    length = data.draw(st.integers(0, 40))
    insert = data.draw(
        st.binary(max_size=20) | st.sampled_from([b"<", b">", b"&", b'"', b"<!DOCTYPE x>"])
    )
    report = read_manifest(original[:start] + insert + original[start + length :])
    for finding in report.errors + report.warnings:
        assert finding.code and finding.element and finding.reason


# ---------------------------------------------------------------------------------------------
# parse_manifest and update checks


def test_parse_manifest_raises_with_every_error() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(fixture("invalid_fields.xml"))
    text = str(info.value)
    assert (
        "line 3: <Id>" in text and "line 4: <Version>" in text and "line 14: <Permissions>" in text
    )
    assert len(info.value.report.errors) == 5
    assert isinstance(info.value, ValueError)


def test_parse_manifest_returns_valid_manifest_despite_warnings() -> None:
    assert parse_manifest(fixture("content.xml")).id == "6f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f"


def _variant(**changes: object) -> Manifest:
    from dataclasses import replace

    return replace(parse_manifest(fixture("taskpane.xml")), **changes)  # type: ignore[arg-type]


def test_hosts_or_permissions_changed() -> None:
    base = _variant()
    assert not hosts_or_permissions_changed(base, _variant(version="2.0", source_locations=()))
    assert not hosts_or_permissions_changed(base, _variant(hosts=tuple(reversed(base.hosts))))
    assert hosts_or_permissions_changed(base, _variant(permissions="ReadDocument"))
    assert hosts_or_permissions_changed(base, _variant(hosts=(Host.EXCEL,)))
    assert hosts_or_permissions_changed(base, _variant(other_hosts=()))
    assert hosts_or_permissions_changed(base, _variant(type=ManifestType.CONTENT))
