"""`addin-server manifest ...`: check manifests with the same reader the server and agent use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from addin_core.display import printable
from addin_core.manifest import FILE, MAX_MANIFEST_BYTES, Finding, ManifestReport, read_manifest


@click.group()
def manifest() -> None:
    """Office add-in manifest tools."""


def _read_file(path: Path) -> ManifestReport:
    """Read at most one byte past the limit, so a huge file is refused without loading it."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        finding = Finding("unreadable", FILE, None, f"cannot read the file: {exc.strerror}")
        return ManifestReport(None, (finding,), ())
    return read_manifest(data)


def report_as_dict(file: str, report: ManifestReport) -> dict[str, Any]:
    m = report.manifest
    return {
        "file": file,
        "valid": report.valid,
        "id": m.id if m else None,
        "version": m.version if m else None,
        "type": m.type.value if m else None,
        "hosts": [h.value for h in m.hosts] if m else [],
        "permissions": m.permissions if m else None,
        "errors": [f.as_dict() for f in report.errors],
        "warnings": [f.as_dict() for f in report.warnings],
    }


def _shown(text: str) -> str:
    return escape(printable(text))


def _print_report(console: Console, file: str, report: ManifestReport) -> None:
    m = report.manifest
    verdict = "[bold green]valid[/]" if report.valid else "[bold red]INVALID[/]"
    console.print(f"{verdict}  {_shown(file)}")
    if m is not None:
        hosts = ",".join(h.value for h in m.hosts) or "-"
        others = f" other-hosts={','.join(m.other_hosts)}" if m.other_hosts else ""
        console.print(
            f"  {m.type.value} id={_shown(m.id or '-')} version={_shown(m.version or '-')} "
            f"hosts={_shown(hosts)}{_shown(others)} permissions={_shown(m.permissions or '-')}",
            highlight=False,
        )
    for f in report.errors:
        console.print(f"  [red]error[/] {_shown(f'[{f.code}]')} {_shown(str(f))}", highlight=False)
    for f in report.warnings:
        console.print(
            f"  [yellow]warning[/] {_shown(f'[{f.code}]')} {_shown(str(f))}", highlight=False
        )


@manifest.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of text.")
def validate(files: tuple[Path, ...], as_json: bool) -> None:
    """Validate manifest FILES; exit status 0 only when every file is valid.

    Each verdict lists the errors and warnings with the element, its line and the reason.
    """
    results = [(str(path), _read_file(path)) for path in files]
    if as_json:
        click.echo(json.dumps([report_as_dict(f, r) for f, r in results], indent=2))
    else:
        console = Console(soft_wrap=True)
        for file, report in results:
            _print_report(console, file, report)
        bad = sum(not r.valid for _, r in results)
        console.print(f"{len(results) - bad} of {len(results)} valid", highlight=False)
    if any(not r.valid for _, r in results):
        raise SystemExit(1)
