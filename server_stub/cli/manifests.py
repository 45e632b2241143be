"""`addin-server manifests export DIR`: the stored manifests as a folder for mirrors."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from server_stub.cli.runner import common, run
from server_stub.manifest_export import ExportError, ExportResult, stored_manifests, write_folder
from server_stub.service import OperationError, Service


@click.group()
def manifests() -> None:
    """The manifests this server stores (for `manifest check` of files, see `manifest`)."""


@manifests.command("export")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@common
def export(folder: Path, **kw: Any) -> None:
    """Write every stored manifest to FOLDER/<sha256> for a web server or CDN to serve;
    agents list its URL in `manifest_mirrors`. Incremental and atomic; deletes nothing."""

    async def op(s: Service) -> dict[str, Any]:
        try:
            return asdict(write_folder(folder, await stored_manifests(s.database)))
        except ExportError as e:
            raise OperationError(str(e)) from None

    run(kw, op, _render, writes=False)


def _render(r: dict[str, Any]) -> str:
    res = ExportResult(**r)
    lines = [
        f"{res.manifests} manifest(s) in {res.folder}: {res.written} written "
        f"({res.bytes_written:,} bytes), {res.unchanged} already there"
    ]
    if res.repaired:
        lines.append(
            f"rewrote {len(res.repaired)} file(s) whose bytes did not match their name: "
            + ", ".join(sha[:12] + "…" for sha in res.repaired)
        )
    lines.append("serve the folder over https and list its URL in the agents' manifest_mirrors")
    return "\n".join(lines)
