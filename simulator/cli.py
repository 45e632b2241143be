"""`addin-sim`: fleet simulator."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console

from simulator.orggen import generate_org

console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run thousands of virtual agents against a real broker and server."""


@main.command()
@click.option("--users", type=click.IntRange(1, 1_000_000), default=1000, show_default=True)
@click.option("--groups", type=click.IntRange(1, 100_000), default=50, show_default=True)
@click.option("--nesting-depth", type=click.IntRange(0, 20), default=0, show_default=True)
@click.option("--nested-groups/--no-nested-groups", default=False, help="Policy in the document.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--tenant", default="contoso", show_default=True)
def org(
    users: int, groups: int, nesting_depth: int, nested_groups: bool, seed: int, tenant: str
) -> None:
    """Write a generated organisation (ORG YAML for `addin-server load`) to stdout."""
    o = generate_org(
        users, groups, nesting_depth=nesting_depth, seed=seed, tenant=tenant, nested_groups=nested_groups
    )
    sys.stdout.write(o.to_yaml())


@main.command()
@click.option("--clients", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Default: one per core.")
@click.option("--broker", "broker_url", default=None, help="mqtt://HOST:PORT (default: private).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def baseline(clients: int, workers: int | None, broker_url: str | None, as_json: bool) -> None:
    """Bare MQTT fan-out: one QoS 1 publish to N bare aiomqtt subscribers."""
    import json
    import os

    from rich.table import Table

    from simulator.baseline import run_baseline
    from simulator.mosquitto import MosquittoBroker

    workers = workers or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        if broker_url is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="addin-sim-"))
            broker = stack.enter_context(MosquittoBroker(Path(tmp) / "broker"))
            broker_url = broker.url
        with console.status(f"connecting {clients} bare subscribers over {workers} processes"):
            result = run_baseline(broker_url, clients, workers)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        t = Table(title=f"bare MQTT fan-out, {clients} subscribers, {result['processes']} processes")
        for col in ("received", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
            t.add_column(col, justify="right")
        t.add_row(*(str(result[c]) for c in ("received", "p50_ms", "p95_ms", "p99_ms", "max_ms")))
        Console().print(t)
    if result["received"] < clients:
        raise SystemExit(1)
