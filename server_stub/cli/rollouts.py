"""`addin-server rollout` and `rollback`: a version reaching rings of users one after the
other, and the admin's decisions on it. Every write is one revision, published like any
other change; a running `serve` advances a rollout by itself when its gate holds."""

from __future__ import annotations

import time
from typing import Any

import click

from server_stub.cli.runner import common, db_option, run
from server_stub.service import Service
from server_stub.service.errors import NotFound

_ring_option = click.option(
    "--ring",
    "rings",
    multiple=True,
    metavar="NAME=TARGET",
    help="A ring, in order: NAME=everyone, NAME=group:G, NAME=user:U (join targets with +). "
    "The last must reach everyone. None: everyone at once.",
)
_gate_option = click.option(
    "--gate",
    default=None,
    metavar="CONDITIONS",
    help="When the next ring follows by itself, e.g. 'applied>=95%,failed=0,wait=10m' "
    "(computed from agents' reports by `serve`). None: `rollout advance` only.",
)


@click.group()
@db_option
def rollout() -> None:
    """Rollouts in rings: start, status, advance, pause, resume, abort."""


@rollout.command("start")
@click.argument("addin")
@click.option("--version", "version", required=True, help="The version to roll out.")
@_ring_option
@_gate_option
@common
def rollout_start(
    addin: str, version: str, rings: tuple[str, ...], gate: str | None, **kw: Any
) -> None:
    """Roll VERSION of ADDIN out ring by ring; the first ring gets it now."""
    run(kw, lambda s: s.rollouts.start(addin, version, rings, gate), render_rollout)


@click.command()
@click.argument("addin")
@click.option("--to", "version", required=True, help="The lower version to go back to.")
@_ring_option
@_gate_option
@common
def rollback(addin: str, version: str, rings: tuple[str, ...], gate: str | None, **kw: Any) -> None:
    """Roll ADDIN back to an older VERSION: the one change agents apply as a downgrade.
    Rolled out like any version (--ring, --gate); everywhere at once without rings."""
    run(kw, lambda s: s.rollouts.start(addin, version, rings, gate, rollback=True),
        render_rollout)  # fmt: skip


async def _rollout_id(s: Service, which: str) -> int:
    """A rollout id, or the running/paused rollout of the add-in named."""
    if which.isdigit():
        return int(which)
    ids = await s.rollouts.rollout_ids(which, active_only=True)
    if not ids:
        raise NotFound(f"add-in {which} has no running or paused rollout")
    return ids[-1]


@rollout.command("status")
@click.argument("which", required=False)
@click.option("--all", "all_", is_flag=True, help="Finished and aborted rollouts too.")
@common
def rollout_status(which: str | None, all_: bool, **kw: Any) -> None:
    """Rollouts (running and paused; --all: every one), or one by id or add-in."""

    async def op(s: Service) -> list[dict[str, Any]]:
        if which is not None and which.isdigit():
            return [await s.rollouts.get(int(which))]
        return await s.rollouts.list_rollouts(which, all_)

    run(kw, op, render_rollouts, writes=False)


def _decision(name: str, doc: str) -> None:
    @rollout.command(name, help=doc)
    @click.argument("which")
    @common
    def command(which: str, **kw: Any) -> None:
        async def op(s: Service) -> dict[str, Any]:
            rid = await _rollout_id(s, which)
            if name == "advance":
                return await s.rollouts.advance(rid)
            return await s.rollouts.set_state(rid, name)

        run(kw, op, render_rollout)


_decision("advance", "Reach the next ring of rollout WHICH (an id, or an add-in) now.")
_decision("pause", "Stop the gate from advancing rollout WHICH (an id, or an add-in).")
_decision("resume", "Let the gate advance rollout WHICH again.")
_decision("abort", "Stop rollout WHICH where it is: reached rings keep its version "
          "(`rollback` takes them back).")  # fmt: skip


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def render_rollout(r: dict[str, Any]) -> str:
    kind = "Rollback" if r["rollback"] else "Rollout"
    lines = [
        f"{kind} {r['rollout_id']}: {r['name']} ({r['addin_id']}) {r['from_version']} → "
        f"{r['version']}, "
        f"{r['state']}" + (f" (revision {r['revision']})" if "revision" in r else ""),
        f"  gate: {r['gate'] or 'none (advanced by an admin)'}",
    ]
    for ring in r["rings"]:
        mark = "✓" if ring["reached"] else "·"
        here = (
            " ← current" if ring["name"] == r["current_ring"] and r["state"] != "completed" else ""
        )
        lines.append(
            f"  {mark} {ring['name']:<10} {'+'.join(ring['targets']):<28} "
            f"applied {ring['applied']}/{ring['devices']} devices, failed {ring['failed']}{here}"
        )
    g = r.get("gate_now")
    if g is not None:
        verdict = "holds" if g["holds"] else "waits: " + "; ".join(g["unmet"])
        lines.append(
            f"  gate for {r['current_ring']} (reached {_ago(r['ring_since'])} ago): {verdict}"
            + (f"; next: {r['next_ring']}" if r["next_ring"] else "")
        )
    return "\n".join(lines)


def render_rollouts(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "No rollout running or paused (--all lists finished ones too)."
    return "\n".join(render_rollout(r) for r in rows)
