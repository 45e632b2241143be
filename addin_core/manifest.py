"""Office add-in XML manifest reader and validator. Pure: it parses the bytes it is given.

Safety first: the input is untrusted (an admin upload, a download, a file on a workstation).
The size is checked before parsing; lxml runs with entity resolution, DTD loading, DTD validation,
network access and huge trees off; and any DOCTYPE is refused outright, which defeats XXE and
entity-expansion ("billion laughs") attacks without relying on parser limits.

`read_manifest` never raises on bad input: it returns a `ManifestReport` whose `errors` and
`warnings` each name the element, its line and the reason. `parse_manifest` is the strict twin
for callers that only accept a valid manifest.

What is an error and what is a warning (see docs/conformance.md for how real files fare):

* errors: not well-formed / not UTF-8 / too large / DOCTYPE; root not `OfficeApp` in the
  appforoffice 1.0 or 1.1 namespace; unknown `xsi:type`; a required element missing (Id,
  Version, ProviderName, DefaultLocale, DisplayName, Description, Permissions for TaskPane and
  Content add-ins, a base SourceLocation); Id not a GUID; Version not 1-4 numeric parts of at
  most 5 digits; Permissions not a level of the manifest's type; a SourceLocation that is not an
  absolute https URL (http, even to localhost, is an error; so is Visual Studio's unpublished
  `~remoteAppUrl` placeholder).
* warnings: a SourceLocation on https://localhost (a developer manifest: fine for a sideload,
  useless for a fleet); a MailApp without `<Permissions>` (Office treats it as Restricted); a
  MailApp without `<Requirements>`; a SourceLocation `resid` that names no `<bt:Url>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from lxml import etree

from addin_core.permissions import levels_for
from addin_core.protocol import Host
from addin_core.version import InvalidVersion, parse_version

MAX_MANIFEST_BYTES = 512 * 1024
"""The largest manifest anyone accepts: the server on upload, the agent on download, the
`manifest check` command on reading a file."""

NS_APPFOROFFICE_10 = "http://schemas.microsoft.com/office/appforoffice/1.0"
NS_APPFOROFFICE_11 = "http://schemas.microsoft.com/office/appforoffice/1.1"
BASE_NAMESPACES = (NS_APPFOROFFICE_11, NS_APPFOROFFICE_10)
NS_XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSI_TYPE = f"{{{NS_XSI}}}type"


class ManifestType(StrEnum):
    TASKPANE = "TaskPaneApp"
    CONTENT = "ContentApp"
    MAIL = "MailApp"


# Manifest host names (base <Host Name=...>, <Capability Name=...>, VersionOverrides
# <Host xsi:type=...>) that map to a host application we deploy to. Others (Notebook, Project,
# Database, Sway...) are kept verbatim in Manifest.other_hosts.
HOST_NAMES: dict[str, Host] = {
    "Document": Host.WORD,
    "Workbook": Host.EXCEL,
    "Presentation": Host.POWERPOINT,
    "Mailbox": Host.OUTLOOK,
    "MailHost": Host.OUTLOOK,  # the VersionOverrides spelling of Mailbox
}

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# The element of findings about the file as a whole (size, encoding, XML syntax).
FILE = "(file)"
_LOCALHOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# Children of <OfficeApp> that the appforoffice schemas (1.0 and 1.1, all three types) allow at
# most once. A second copy is refused: otherwise the first one silently wins, and a reviewer
# reading the last <Permissions> sees a different add-in from the one deployed.
SINGLE_VALUED = frozenset(
    {
        "Id",
        "AlternateId",
        "Version",
        "ProviderName",
        "DefaultLocale",
        "DisplayName",
        "Description",
        "IconUrl",
        "HighResolutionIconUrl",
        "SupportUrl",
        "AppDomains",
        "Hosts",
        "Capabilities",
        "Requirements",
        "DefaultSettings",
        "FormSettings",
        "DesktopSettings",
        "Permissions",
        "AllowSnapshot",
        "Dictionary",
        "Rule",
        "DisableEntityHighlighting",
    }
)


@dataclass(frozen=True)
class Finding:
    """One problem in a manifest. `code` is a short kebab-case kind (stable, for counting and for
    programs); `element` names the element as written, e.g. "<Version>"; `reason` is for people."""

    code: str
    element: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.element}: {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "element": self.element,
            "line": self.line,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Manifest:
    id: str  # GUID normalised: lowercase, no braces
    version: str  # as written (validated)
    provider_name: str
    default_locale: str
    display_name: str
    description: str
    type: ManifestType
    hosts: tuple[Host, ...]  # sorted, deduplicated; base and VersionOverrides hosts
    other_hosts: tuple[str, ...]  # host names that map to no Host (sorted, deduplicated)
    permissions: str
    source_locations: tuple[str, ...]  # in document order, deduplicated
    requirement_sets: tuple[tuple[str, str | None], ...]  # (Name, MinVersion), deduplicated


@dataclass(frozen=True)
class ManifestReport:
    manifest: Manifest | None  # None when the file could not be read far enough
    errors: tuple[Finding, ...]
    warnings: tuple[Finding, ...]

    @property
    def valid(self) -> bool:
        return self.manifest is not None and not self.errors


class ManifestError(ValueError):
    """Raised by `parse_manifest` for a manifest with errors; `report` holds all findings."""

    def __init__(self, report: ManifestReport) -> None:
        self.report = report
        lines = [str(f) for f in report.errors] or ["the manifest could not be read"]
        super().__init__("invalid manifest:\n" + "\n".join(f"  {line}" for line in lines))


# --------------------------------------------------------------------------------------------
# public functions


def read_manifest(data: bytes) -> ManifestReport:
    """Read and validate a manifest. Never raises on bad input: problems are findings."""
    try:
        return _Reader().read(data)
    except Exception as exc:  # a bug here must not turn a bad upload into a crash
        finding = Finding("internal-error", FILE, None, f"the reader failed unexpectedly: {exc!r}")
        return ManifestReport(None, (finding,), ())


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in `data`, or ManifestError listing every error."""
    report = read_manifest(data)
    if not report.valid or report.manifest is None:
        raise ManifestError(report)
    return report.manifest


def hosts_or_permissions_changed(old: Manifest, new: Manifest) -> bool:
    """True when an update changes what the add-in may do or where it runs: the agent must not
    apply such an update without the admin's re-consent. A change of type counts:
    permission levels of different types are not comparable."""
    return (
        old.type != new.type
        or old.permissions != new.permissions
        or set(old.hosts) != set(new.hosts)
        or set(old.other_hosts) != set(new.other_hosts)
    )


# --------------------------------------------------------------------------------------------
# implementation


def _local(el: Any) -> str:
    """Local name of an element; '' for comments and processing instructions."""
    tag = el.tag
    if not isinstance(tag, str):
        return ""
    return tag.rsplit("}", 1)[-1]


def _ns(el: Any) -> str:
    tag = el.tag
    if isinstance(tag, str) and tag.startswith("{"):
        return tag[1:].split("}", 1)[0]
    return ""


def _children(el: Any, name: str) -> Iterator[Any]:
    for child in el:
        if _local(child) == name:
            yield child


def _text(el: Any) -> str:
    # itertext skips comments and PIs, so <Id><!-- x -->abc</Id> reads as "abc".
    return "".join(el.itertext()).strip()


def _line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _xsi_type(el: Any) -> str:
    value = (el.get(XSI_TYPE) or "").strip()
    # xsi:type is a QName; a prefixed value ("ns:TaskPaneApp") names the same type.
    return value.rsplit(":", 1)[-1]


def _prolog_doctype_line(text: str) -> int | None:
    """Line of a DOCTYPE declaration in the prolog, if any. The prolog may hold only the XML
    declaration, comments, processing instructions, whitespace and the DOCTYPE; anything else
    ends the scan (the parser reports what is wrong with it)."""
    pos, n = 0, len(text)
    while pos < n:
        if text[pos] in " \t\r\n":
            pos += 1
        elif text.startswith("<?", pos):
            end = text.find("?>", pos + 2)
            if end < 0:
                return None
            pos = end + 2
        elif text.startswith("<!--", pos):
            end = text.find("-->", pos + 4)
            if end < 0:
                return None
            pos = end + 3
        elif text.startswith("<!DOCTYPE", pos) or text.startswith("<!doctype", pos):
            return text.count("\n", 0, pos) + 1
        else:
            return None
    return None


def _parser() -> etree.XMLParser:
    # A fresh parser per call: lxml parsers are not thread-safe and keep an error log.
    return etree.XMLParser(
        encoding="utf-8",  # we hand lxml UTF-8 that we decoded and checked ourselves
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


class _Reader:
    """One read of one manifest: collects findings while extracting fields."""

    def __init__(self) -> None:
        self.errors: list[Finding] = []
        self.warnings: list[Finding] = []

    def error(self, code: str, element: str, line: int | None, reason: str) -> None:
        self.errors.append(Finding(code, element, line, reason))

    def warn(self, code: str, element: str, line: int | None, reason: str) -> None:
        self.warnings.append(Finding(code, element, line, reason))

    def report(self, manifest: Manifest | None) -> ManifestReport:
        # In line order, as a person fixes a file; findings without a line (whole file) first.
        def order(f: Finding) -> int:
            return f.line or 0

        # Identical findings collapse: one <bt:Url> referenced from three hosts is one problem.
        errors = sorted(dict.fromkeys(self.errors), key=order)
        warnings = sorted(dict.fromkeys(self.warnings), key=order)
        return ManifestReport(manifest, tuple(errors), tuple(warnings))

    # -- bytes to tree ---------------------------------------------------------------------

    def read(self, data: bytes) -> ManifestReport:
        if isinstance(data, str):
            data = data.encode("utf-8")
        elif not isinstance(data, bytes):
            data = bytes(data)
        if len(data) > MAX_MANIFEST_BYTES:
            self.error(
                "too-large",
                FILE,
                None,
                f"the manifest is {len(data)} bytes; the limit is {MAX_MANIFEST_BYTES} bytes (512 KB)",
            )
            return self.report(None)
        if not data.strip():
            self.error("not-well-formed", FILE, None, "the file is empty")
            return self.report(None)
        utf8 = self.decode(data)
        if utf8 is None:
            return self.report(None)
        doctype_line = _prolog_doctype_line(utf8.decode("utf-8"))
        if doctype_line is not None:
            self.error(
                "dtd-forbidden",
                "<!DOCTYPE>",
                doctype_line,
                "a DOCTYPE is not allowed in a manifest (it can declare entities: XXE, entity expansion)",
            )
            return self.report(None)
        try:
            root = etree.fromstring(utf8, _parser())
        except etree.XMLSyntaxError as exc:
            line = exc.lineno if isinstance(exc.lineno, int) and exc.lineno > 0 else None
            self.error("not-well-formed", FILE, line, f"not well-formed XML: {exc.msg}")
            return self.report(None)
        docinfo: Any = root.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None:
            # The prolog scan should have caught this; belt and braces.
            self.error("dtd-forbidden", "<!DOCTYPE>", 1, "a DOCTYPE is not allowed in a manifest")
            return self.report(None)
        return self.report(self.extract(root))

    def decode(self, data: bytes) -> bytes | None:
        """UTF-8 bytes without a BOM, or None after recording an error. UTF-16 with a BOM is
        accepted (Visual Studio writes it sometimes); anything else must be valid UTF-8."""
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            try:
                text = data.decode("utf-16")
            except UnicodeDecodeError as exc:
                self.error("bad-encoding", FILE, None, f"invalid UTF-16 at byte {exc.start}")
                return None
            return text.encode("utf-8")
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            # Offsets are into the BOM-less bytes; a BOM has no newline so lines are unchanged.
            self.error(
                "bad-encoding",
                FILE,
                _line_of_offset(data, exc.start),
                f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                "save the manifest as UTF-8",
            )
            return None
        return data

    # -- tree to manifest ------------------------------------------------------------------

    def extract(self, root: Any) -> Manifest | None:
        if _local(root) != "OfficeApp":
            self.error(
                "wrong-namespace" if _local(root) else "not-well-formed",
                f"<{_local(root)}>",
                root.sourceline,
                "the root element must be <OfficeApp>",
            )
            return None
        ns = _ns(root)
        if ns not in BASE_NAMESPACES:
            self.error(
                "wrong-namespace",
                "<OfficeApp>",
                root.sourceline,
                f"namespace {ns or '(none)'!r} is not appforoffice 1.0 or 1.1 "
                f"({NS_APPFOROFFICE_11})",
            )
            return None
        raw_type = _xsi_type(root)
        try:
            mtype = ManifestType(raw_type)
        except ValueError:
            reason = (
                f"xsi:type {raw_type!r} is not TaskPaneApp, ContentApp or MailApp"
                if raw_type
                else "the xsi:type attribute (TaskPaneApp, ContentApp or MailApp) is missing"
            )
            self.error("unknown-type", "<OfficeApp>", root.sourceline, reason)
            return None

        self.check_duplicates(root, ns)

        def base(name: str) -> Any | None:
            return root.find(f"{{{ns}}}{name}")

        ident = self.read_id(root, base("Id"))
        version = self.read_version(root, base("Version"))
        provider = self.required_text(root, base("ProviderName"), "ProviderName")
        locale = self.required_text(root, base("DefaultLocale"), "DefaultLocale")
        display = self.required_default_value(root, base("DisplayName"), "DisplayName")
        description = self.required_default_value(root, base("Description"), "Description")
        permissions = self.read_permissions(root, base("Permissions"), mtype)
        hosts, other_hosts = self.read_hosts(root, ns, mtype)
        sources = self.read_source_locations(root, ns, mtype)
        requirement_sets = self.read_requirements(root, ns, mtype)
        return Manifest(
            id=ident,
            version=version,
            provider_name=provider,
            default_locale=locale,
            display_name=display,
            description=description,
            type=mtype,
            hosts=hosts,
            other_hosts=other_hosts,
            permissions=permissions,
            source_locations=sources,
            requirement_sets=requirement_sets,
        )

    def check_duplicates(self, root: Any, ns: str) -> None:
        first_line: dict[str, int | None] = {}
        for child in root:
            name = _local(child)
            if name not in SINGLE_VALUED or _ns(child) != ns:
                continue
            if name not in first_line:
                first_line[name] = child.sourceline
                continue
            self.error(
                "duplicate-element",
                f"<{name}>",
                child.sourceline,
                f"<{name}> appears again (first on line {first_line[name]}); "
                "the schema allows it once in <OfficeApp>",
            )

    def missing(self, root: Any, name: str, where: str = "<OfficeApp>") -> None:
        self.error(
            "missing-element", f"<{name}>", root.sourceline, f"required element missing in {where}"
        )

    def required_text(self, root: Any, el: Any | None, name: str) -> str:
        if el is None:
            self.missing(root, name)
            return ""
        value = _text(el)
        if not value:
            self.error("missing-element", f"<{name}>", el.sourceline, "the element is empty")
        return value

    def required_default_value(self, root: Any, el: Any | None, name: str) -> str:
        if el is None:
            self.missing(root, name)
            return ""
        value = (el.get("DefaultValue") or "").strip()
        if not value:
            self.error(
                "missing-element",
                f"<{name}>",
                el.sourceline,
                "the DefaultValue attribute is missing or empty",
            )
        return value

    def read_id(self, root: Any, el: Any | None) -> str:
        value = self.required_text(root, el, "Id")
        if not value or el is None:
            return ""
        inner = value[1:-1] if value.startswith("{") and value.endswith("}") else value
        if not _GUID.fullmatch(inner):
            self.error(
                "bad-id",
                "<Id>",
                el.sourceline,
                f"{value!r} is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
            )
            return value
        return inner.lower()

    def read_version(self, root: Any, el: Any | None) -> str:
        value = self.required_text(root, el, "Version")
        if not value or el is None:
            return ""
        try:
            parse_version(value)
        except InvalidVersion as exc:
            self.error("bad-version", "<Version>", el.sourceline, str(exc))
        return value

    def read_permissions(self, root: Any, el: Any | None, mtype: ManifestType) -> str:
        levels = levels_for(mtype)
        if el is None:
            if mtype is ManifestType.MAIL:
                # The schema makes it optional for mail add-ins, and Office then grants the least.
                self.warn(
                    "missing-element",
                    "<Permissions>",
                    root.sourceline,
                    "no <Permissions>; a MailApp without it gets Restricted",
                )
                return "Restricted"
            self.missing(root, "Permissions")
            return ""
        value = _text(el)
        if value not in levels:
            self.error(
                "bad-permission",
                "<Permissions>",
                el.sourceline,
                f"{value!r} is not a permission level of {mtype.value}; "
                f"expected one of {', '.join(levels)}",
            )
        return value

    def read_hosts(
        self, root: Any, ns: str, mtype: ManifestType
    ) -> tuple[tuple[Host, ...], tuple[str, ...]]:
        names: list[str] = []
        # Base manifest: <Hosts><Host Name=.../></Hosts> (1.1) or <Capabilities><Capability
        # Name=.../></Capabilities> (1.0).
        for container, item in (("Hosts", "Host"), ("Capabilities", "Capability")):
            for parent in root.findall(f"{{{ns}}}{container}"):
                for host in _children(parent, item):
                    name = (host.get("Name") or "").strip()
                    if name:
                        names.append(name)
        # VersionOverrides, possibly nested (mail V1_0 holding V1_1): <Hosts><Host xsi:type=.../>.
        for overrides in self.version_overrides(root):
            for parent in _children(overrides, "Hosts"):
                for host in _children(parent, "Host"):
                    name = _xsi_type(host)
                    if name:
                        names.append(name)
        if mtype is ManifestType.MAIL and not names:
            names.append("Mailbox")  # a mail add-in without <Hosts> runs in Outlook
        hosts = sorted({HOST_NAMES[n] for n in names if n in HOST_NAMES})
        others = sorted({n for n in names if n not in HOST_NAMES})
        return tuple(hosts), tuple(others)

    @staticmethod
    def version_overrides(root: Any) -> Iterator[Any]:
        for el in root.iter():
            if _local(el) == "VersionOverrides":
                yield el

    def read_source_locations(self, root: Any, ns: str, mtype: ManifestType) -> tuple[str, ...]:
        found: list[str] = []
        # Base SourceLocations: <DefaultSettings> (TaskPane, Content), <FormSettings><Form>
        # <DesktopSettings> (mail 1.1) or <DesktopSettings> directly under the root (mail 1.0).
        base = [el for el in root.iter(f"{{{ns}}}SourceLocation") if not self.in_overrides(el)]
        if not base:
            where = "<DefaultSettings>" if mtype is not ManifestType.MAIL else "<FormSettings>"
            self.missing(root, "SourceLocation", where)
        for el in base:
            value = (el.get("DefaultValue") or "").strip()
            if not value:
                self.error(
                    "missing-element",
                    "<SourceLocation>",
                    el.sourceline,
                    "the DefaultValue attribute is missing or empty",
                )
            else:
                self.check_url(value, "<SourceLocation>", el.sourceline)
                found.append(value)
            for override in _children(el, "Override"):
                value = (override.get("Value") or "").strip()
                if value:
                    self.check_url(value, "<SourceLocation><Override>", override.sourceline)
                    found.append(value)
        # VersionOverrides SourceLocations point at <bt:Url id=...> resources by resid.
        for overrides in self.version_overrides(root):
            urls = self.url_resources(overrides)
            for el in overrides.iter():
                if _local(el) != "SourceLocation" or self.owner(el) is not overrides:
                    continue
                resid = (el.get("resid") or "").strip()
                if not resid:
                    continue
                resource = urls.get(resid)
                if resource is None:
                    resource = self.any_url_resource(root, resid)
                if resource is None:
                    self.warn(
                        "missing-resource",
                        "<SourceLocation>",
                        el.sourceline,
                        f"resid {resid!r} names no <bt:Url> in <Resources>",
                    )
                    continue
                for value, line in self.url_values(resource):
                    self.check_url(value, f'<bt:Url id="{resid}">', line)
                    found.append(value)
        return tuple(dict.fromkeys(found))

    @staticmethod
    def in_overrides(el: Any) -> bool:
        return any(_local(a) == "VersionOverrides" for a in el.iterancestors())

    @staticmethod
    def owner(el: Any) -> Any | None:
        """The nearest enclosing VersionOverrides."""
        for a in el.iterancestors():
            if _local(a) == "VersionOverrides":
                return a
        return None

    def url_resources(self, overrides: Any) -> dict[str, Any]:
        urls: dict[str, Any] = {}
        for resources in _children(overrides, "Resources"):
            for group in _children(resources, "Urls"):
                for url in _children(group, "Url"):
                    rid = url.get("id")
                    if rid:
                        urls.setdefault(rid, url)
        return urls

    def any_url_resource(self, root: Any, resid: str) -> Any | None:
        # A nested VersionOverrides V1_1 may (in practice) rely on its parent's resources.
        for overrides in self.version_overrides(root):
            found = self.url_resources(overrides).get(resid)
            if found is not None:
                return found
        return None

    @staticmethod
    def url_values(resource: Any) -> Iterable[tuple[str, int | None]]:
        value = (resource.get("DefaultValue") or "").strip()
        if value:
            yield value, resource.sourceline
        for override in _children(resource, "Override"):
            value = (override.get("Value") or "").strip()
            if value:
                yield value, override.sourceline

    def check_url(self, value: str, element: str, line: int | None) -> None:
        try:
            parts = urlsplit(value)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 - raises ValueError for a port like "{PORT}" or 99999
        except ValueError as exc:
            self.error("bad-source", element, line, f"{value!r} is not a URL: {exc}")
            return
        scheme = parts.scheme.lower()
        if value.startswith("~remoteAppUrl"):
            # Visual Studio replaces this token with the web project's URL when it publishes; a
            # manifest that still holds it has not been published and cannot be deployed.
            self.error(
                "placeholder-source",
                element,
                line,
                f"{value!r} still holds the Visual Studio placeholder ~remoteAppUrl; "
                "publish the project (or replace it with the https URL of the web app)",
            )
        elif scheme == "http":
            local = " (even for localhost)" if host in _LOCALHOSTS else ""
            self.error(
                "http-source",
                element,
                line,
                f"{value!r} uses http; a SourceLocation must use https{local}",
            )
        elif scheme != "https" or not host:
            self.error(
                "bad-source",
                element,
                line,
                f"{value!r} is not an absolute https URL",
            )
        elif host in _LOCALHOSTS:
            self.warn(
                "localhost-source",
                element,
                line,
                f"{value!r} points at localhost: it works only on a developer's machine",
            )

    def read_requirements(
        self, root: Any, ns: str, mtype: ManifestType
    ) -> tuple[tuple[str, str | None], ...]:
        found: list[tuple[str, str | None]] = []
        base = root.find(f"{{{ns}}}Requirements")
        if base is None and mtype is ManifestType.MAIL:
            self.warn(
                "missing-element",
                "<Requirements>",
                root.sourceline,
                "a MailApp should declare <Requirements> (the Mailbox requirement set)",
            )
        containers = [base] if base is not None else []
        for overrides in self.version_overrides(root):
            containers.extend(_children(overrides, "Requirements"))
        for requirements in containers:
            for sets in _children(requirements, "Sets"):
                default = (sets.get("DefaultMinVersion") or "").strip() or None
                for item in _children(sets, "Set"):
                    name = (item.get("Name") or "").strip()
                    if name:
                        found.append((name, (item.get("MinVersion") or "").strip() or default))
        return tuple(dict.fromkeys(found))
