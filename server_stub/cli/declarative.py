"""`addin-server apply ORG.yaml [--prune] [--dry-run]` and `addin-server export`: the tenant
as code. `apply` prints its plan (``+`` add, ``~`` change, ``-`` remove) and then makes it in
one revision; `export` writes the state in the same format, so `export | apply -` is a no-op.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from addin_core.display import printable
from server_stub.cli.runner import common, read_manifest_file, run
from server_stub.service import Service
from server_stub.service.declarative import Plan, plan_lines, plan_summary

_COLOUR = {"+": "green", "~": "yellow", "-": "red"}


def read_org(org_file: str) -> tuple[Any, Path]:
    """The ORG document of a YAML file (``-``: stdin) and the folder its manifests are
    relative to."""
    try:
        text = sys.stdin.read() if org_file == "-" else Path(org_file).read_text()
    except OSError as e:
        raise click.ClickException(f"cannot read {org_file}: {e.strerror or e}") from None
    try:
        # The C loader when PyYAML has it: a 10,000-user document parses ~10x faster.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise click.ClickException(f"{org_file} is not valid YAML: {e}") from None
    return doc, Path.cwd() if org_file == "-" else Path(org_file).parent


def _tenant_from(doc: Any, kw: dict[str, Any]) -> None:
    if isinstance(doc, dict) and kw["tenant"] is None and isinstance(doc.get("tenant"), str):
        kw["tenant"] = doc["tenant"]


def echo_plan(plan: Plan) -> None:
    for symbol, text in plan_lines(plan):
        kept = text.endswith("(kept: pass --prune to remove)")
        colour = "bright_black" if kept else _COLOUR[symbol]
        click.echo(click.style(f"  {symbol} {printable(text)}", fg=colour))
    click.echo(plan_summary(plan))


@click.command("apply")
@click.argument("org_file", metavar="ORG.yaml")
@click.option("--prune", is_flag=True, help="Also remove what the file does not name.")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@common
def apply_cmd(org_file: str, prune: bool, dry_run: bool, **kw: Any) -> None:
    """Make add-ins, assignments, users, groups and policy equal to ORG.yaml (`-`: stdin),
    in one revision; removals need --prune."""
    doc, base = read_org(org_file)
    _tenant_from(doc, kw)

    def read_file(p: str) -> bytes:
        return read_manifest_file(base / p)

    async def op(s: Service) -> dict[str, Any]:
        plan = await s.plan_org(doc, read_file, prune=prune)
        if not kw["as_json"]:
            echo_plan(plan)
        if dry_run or not plan.effective:
            return {**plan.as_json(), "dry_run": dry_run, "revision": None}
        return {**await s.apply_org(doc, read_file, prune=prune), "dry_run": False}

    run(kw, op, _applied, dry_run=dry_run)


def _applied(r: dict[str, Any]) -> str:
    if r["dry_run"]:
        return "Dry run: nothing was changed."
    if r["revision"] is None:
        return "No changes: the server already matches the file."
    return f"Applied at revision {r['revision']} ({r['messages']} messages queued)."


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # Manifests inline as literal blocks: the export stays readable and diffable in git.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


@click.command("export")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Write to FILE instead of stdout.",
)  # fmt: skip
@common
def export_cmd(output: Path | None, **kw: Any) -> None:
    """Write the tenant's users, groups, policy, add-ins and assignments as an ORG document
    that `apply` takes (LOB manifests inline)."""

    def render(doc: dict[str, Any]) -> str:
        # allow_unicode off: YAML escapes every non-ASCII and control character itself, so
        # nothing from a manifest reaches the terminal raw, and the text reads back exactly.
        text = yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=100)
        if output is None:
            return text.rstrip("\n")
        output.write_text(text)
        return f"wrote {output}"

    kw["as_json"] = False
    run(kw, lambda s: s.export_org(), render, writes=False, escaped=False)
