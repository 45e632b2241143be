"""`addin-sim`: fleet simulator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from addin_runtime.logs import log_format_option, setup_logging
from simulator.orggen import generate_org

if TYPE_CHECKING:
    from simulator.results import RunOptions, RunResult
    from simulator.scenario import Scenario

console = Console(stderr=True)


def _broker_url(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse a malformed --broker at once, not after starting a server that cannot use it."""
    if value is not None:
        from server_stub.publisher import parse_broker_url

        try:
            parse_broker_url(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


def _broker_urls(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    for url in value:
        _broker_url(ctx, param, url)
    return value


def _public_key(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from addin_core.signing import load_public_key

        try:
            load_public_key(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@log_format_option
def main(log_format: str) -> None:
    """Run thousands of virtual agents against a real broker and server."""
    # Warnings and errors only: a run's progress is the console's. The format reaches the
    # run's server and workers through the environment (ADDIN_LOG_FORMAT).
    setup_logging("addin-sim", log_format, logging.WARNING)


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
        users,
        groups,
        nesting_depth=nesting_depth,
        seed=seed,
        tenant=tenant,
        nested_groups=nested_groups,
    )
    sys.stdout.write(o.to_yaml())


@main.command()
@click.option("--clients", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None, help="Default: one per core.")
@click.option(
    "--broker",
    "broker_url",
    default=None,
    callback=_broker_url,
    help="mqtt://HOST:PORT (default: private).",
)
@click.option(
    "--subscriber",
    type=click.Choice(["paho", "aiomqtt"]),
    default="paho",
    show_default=True,
    help="paho: plain callbacks, the cheapest subscriber (the floor `run` compares with); "
    "aiomqtt: its message iterator.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def baseline(
    clients: int, workers: int | None, broker_url: str | None, subscriber: str, as_json: bool
) -> None:
    """Bare MQTT fan-out: one QoS 1 publish to N bare subscribers (paho callbacks, or aiomqtt)."""
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
        with console.status(
            f"connecting {clients} bare {subscriber} subscribers over {workers} processes"
        ):
            result = run_baseline(broker_url, clients, workers, kind=subscriber)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        t = Table(
            title=f"bare MQTT fan-out, {clients} {subscriber} subscribers, "
            f"{result['processes']} processes"
        )
        for col in ("received", "p50_ms", "p95_ms", "p99_ms", "max_ms"):
            t.add_column(col, justify="right")
        t.add_row(*(str(result[c]) for c in ("received", "p50_ms", "p95_ms", "p99_ms", "max_ms")))
        Console().print(t)
    if result["received"] < clients:
        raise SystemExit(1)


@main.command()
@click.argument("reports", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the table and the figures plotted against the client count (inline SVG).",
)
@click.option(
    "--median",
    "take_median",
    is_flag=True,
    help="Repeated runs (same client count, cache mode and main step) become one row: each "
    "figure the median of theirs, with its range.",
)
def compare(reports: tuple[Path, ...], html_file: Path | None, take_median: bool) -> None:
    """Compare runs: REPORTS are report.json files (or the --report directories) of
    `addin-sim run`; one row per run, by client count: workers' CPU and peak RSS per client,
    notify and cached p99 of the main step (the scenario step that notified most clients), the bare
    fan-out floor and notify p99 ÷ floor, the download floor (the fan-out plus one manifest
    GET) and cached p99 ÷ that floor."""
    from rich.table import Table

    from simulator.report.compare import (
        COLUMNS,
        CompareError,
        load_all,
        median,
        render_html,
        rows,
    )

    try:
        runs = load_all(reports)
    except CompareError as e:
        raise click.UsageError(str(e)) from None
    title = f"{len(runs)} runs"
    if take_median:
        runs = median(runs)
        title += f", {len(runs)} rows (medians)"
    t = Table(title=title)
    for i, col in enumerate(COLUMNS):
        # Folded, never cut: the run's name is a path the reader needs whole.
        t.add_column(col, justify="left" if i in (0, 2, 5) else "right", overflow="fold")
    for row in rows(runs):
        t.add_row(*row)
    Console().print(t)
    if html_file is not None:
        try:
            html_file.write_text(render_html(runs))
        except OSError as e:
            raise click.UsageError(f"--html {html_file}: {e.strerror or e}") from None
        console.print(f"plots: {html_file}")


def _event_loop_run(coro: Any) -> Any:
    """asyncio.run, on uvloop when it is installed (it handles thousands of sockets better)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Signalled(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


async def _until_signalled(coordinator: Any) -> Any:
    """Run the coordinator; SIGTERM or SIGHUP (`timeout`, a closed terminal, a CI job being
    cancelled) ends it the way an error does: workers, server and broker are stopped, so no
    child process outlives the run. (SIGINT already does so through KeyboardInterrupt.)"""
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    received: list[int] = []

    def cancel_until_tearing_down() -> None:
        # Cancelled again until the teardown has begun: on Python 3.11 a cancellation can be
        # lost inside asyncio.wait_for (aiomqtt awaits every acknowledgement with it).
        if not main_task.done() and not coordinator.tearing_down:
            main_task.cancel()
            loop.call_later(1.0, cancel_until_tearing_down)

    def on_signal(signum: int) -> None:
        first = not received
        received.append(signum)
        if first:
            cancel_until_tearing_down()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await coordinator.execute()
    except asyncio.CancelledError:
        if received:
            raise _Signalled(received[0]) from None
        raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(signum)


@main.command()
@click.option("--clients", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option(
    "--tenant",
    default="contoso",
    show_default=True,
    help="The run's tenant: with --server, the server's (`serve --tenant`).",
)
@click.option(
    "--netns",
    type=click.IntRange(0, 64),
    default=0,
    show_default=True,
    help="Run the local workers in N network namespaces (root), reaching the broker and "
    "server over veth pairs; made and removed by the run.",
)
@click.option(
    "--scenario", default="phased-rollout", show_default=True, help="Shipped NAME or a YAML FILE."
)
@click.option(
    "--workers",
    type=click.IntRange(0, 64),
    default=None,
    help="Worker processes (default: one per core); 0 runs the agents inside this process.",
)
@click.option(
    "--remote-workers",
    type=click.IntRange(0, 64),
    default=0,
    help="Also wait for N `addin-sim worker` processes to join.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=Path("sim-report"),
    show_default=True,
)
@click.option(
    "--broker",
    "broker_url",
    default=None,
    callback=_broker_url,
    help="mqtt://HOST:PORT (default: a private Mosquitto).",
)
@click.option(
    "--agent-broker",
    "agent_brokers",
    multiple=True,
    callback=_broker_urls,
    help="Repeatable: the agents connect to these, spread by client id (e.g. every node of "
    "a cluster); default: --broker.",
)
@click.option(
    "--agent-anti-entropy",
    "agent_anti_entropy",
    type=click.FloatRange(min=0),
    default=None,
    help="The agents' anti_entropy_interval in seconds (default: the agent's, 600; 0: off), "
    "e.g. short on a broker that can lose a delivery (NATS 2.9 under load).",
)
@click.option(
    "--agent-mqtt-version",
    type=click.Choice(["auto", "5", "3.1.1"]),
    default="auto",
    show_default=True,
    help="The agents' mqtt_version: pin 3.1.1 for a broker that speaks only 3.1.1 (NATS), so "
    "no agent first tries MQTT 5 and is refused.",
)
@click.option(
    "--server",
    "server_url",
    default=None,
    help="http://HOST:PORT (default: a private server stub).",
)
@click.option("--admin-token", envvar="ADDIN_SIM_ADMIN_TOKEN", default=None, help="With --server.")
@click.option("--agent-token", envvar="ADDIN_SIM_AGENT_TOKEN", default=None, help="With --server.")
@click.option(
    "--signing-key",
    envvar="ADDIN_SIM_SIGNING_KEY",
    default=None,
    callback=_public_key,
    help="With --server: its signing public key (signing.pub); without it the agents accept "
    "unsigned state. A private server signs with a fresh key per run.",
)
@click.option(
    "--tls",
    is_flag=True,
    help="Secure mode: a PKI for the run, the broker and server over TLS, and every client "
    "enrolled as a device with its own certificate and token.",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--run-id", default=None, help="Run id remote workers join (default: random).")
@click.option("--no-baseline", is_flag=True, help="Skip the bare MQTT fan-out measurement.")
@click.option(
    "--cache",
    type=click.Choice(["memory", "file", "none"]),
    default=None,
    help="Agent cache of every client (default: the scenario's, `memory` in all shipped "
    "scenarios but offline-clients, which uses `file`). memory: the agent's real SQLite cache "
    "code on an in-memory database: measures the SQL of every transition, not the disk; the "
    "everyday choice. file: one real SQLite file per client (WAL, as on a workstation): "
    "measures the disk and the cache's thread too, and clients keep their cache while "
    "offline; choose it to see what a real cache costs, within the machine's open files. "
    "none: no SQL (the agent's volatile cache): measures propagation alone with the least "
    "memory; choose it for the largest fleets.",
)
@click.option(
    "--console",
    "with_console",
    is_flag=True,
    help="Watch the run in the server's console: print its URL and sign-in token, wait "
    "--console-delay seconds before the first step, and keep broker, server and fleet up "
    "after the last step until Ctrl-C.",
)
@click.option(
    "--console-delay",
    type=click.FloatRange(0, 3600),
    default=20.0,
    show_default=True,
    help="With --console: seconds to sign in before the scenario starts.",
)
def run(
    clients: int,
    scenario: str,
    workers: int | None,
    remote_workers: int,
    report_dir: Path,
    broker_url: str | None,
    server_url: str | None,
    admin_token: str | None,
    agent_token: str | None,
    signing_key: str | None,
    tls: bool,
    seed: int,
    run_id: str | None,
    no_baseline: bool,
    cache: str | None,
    with_console: bool,
    console_delay: float,
    tenant: str,
    netns: int,
    agent_brokers: tuple[str, ...],
    agent_mqtt_version: str,
    agent_anti_entropy: float | None,
) -> None:
    """Run a scenario with N virtual clients and check every one against the oracle.

    With --broker and --server it runs against that deployment (a lab one: agents log in
    with the broker URL's user:password, the server's --agent-token) and starts neither."""
    from simulator.coordinator import RunOptions, default_workers
    from simulator.report import print_summary, write_reports
    from simulator.scenario import ScenarioError, load_scenario

    try:
        sc = load_scenario(scenario)
    except ScenarioError as e:
        raise click.UsageError(str(e)) from None
    if server_url and not admin_token:
        raise click.UsageError("--server needs --admin-token (or ADDIN_SIM_ADMIN_TOKEN)")
    if signing_key and not server_url:
        raise click.UsageError("--signing-key is for --server: a private server gets its own key")
    if tls and (broker_url or server_url):
        raise click.UsageError(
            "--tls makes the run's own PKI, broker and server: it cannot use --broker or --server"
        )
    if tls and remote_workers:
        raise click.UsageError(
            "--tls with --remote-workers is not supported: the device certificates are written "
            "on this machine only; run --tls with local workers"
        )
    _check_netns(netns, tls, workers, broker_url, server_url)
    try:
        from addin_core.protocol import check_id

        check_id(tenant, "tenant id")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tenant") from None
    if agent_brokers and (tls or not broker_url):
        raise click.UsageError("--agent-broker needs --broker (and no --tls)")
    options = RunOptions(
        agent_brokers=agent_brokers,
        agent_mqtt_version=agent_mqtt_version,
        agent_anti_entropy=agent_anti_entropy,
        tenant=tenant,
        netns=netns,
        clients=clients,
        workers=default_workers() if workers is None else workers,
        seed=seed,
        broker_url=broker_url,
        server_url=server_url,
        admin_token=admin_token,
        agent_token=agent_token,
        signing_key=signing_key,
        tls=tls,
        remote_workers=remote_workers,
        baseline=not no_baseline,
        cache=cache,
    )
    if run_id:
        options.run_id = run_id
    if remote_workers:
        options.on_environment = _announce_join(remote_workers, options.run_id)
    if with_console:
        if server_url:
            raise click.UsageError("--console shows the run's private server: leave out --server")
        _watch_in_console(options, console_delay)
    result = _run_with_progress(sc, options)
    report = write_reports(result, report_dir)
    print_summary(report, Console())
    console.print(f"report: {report_dir}/report.json, {report_dir}/report.html")
    if report["mismatches"] or report["server_disagreements"]:
        raise SystemExit(1)


def _watch_in_console(options: RunOptions, delay: float) -> None:
    """--console: say where the console is and how to sign in; pause before the first step;
    hold the fleet up after the last one until Ctrl-C (then the run ends as usual, with its
    report)."""

    def announce(_broker: str, server: str) -> None:
        click.echo(
            f"\nconsole: {server}/console\n"
            f"sign in with the admin token: {options.admin_token}\n",
            err=True,
        )

    async def before() -> None:
        click.echo(f"the scenario starts in {delay:g} s: sign in now", err=True)
        await asyncio.sleep(delay)

    async def after() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        click.echo(
            "\nthe scenario is over; the fleet stays up for the console: Ctrl-C stops it",
            err=True,
        )
        try:
            await stop.wait()
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    # The console's token is the run's admin token: made here so it can be printed.
    import secrets

    options.admin_token = options.admin_token or secrets.token_urlsafe(16)
    options.on_environment = announce
    options.before_steps = before
    options.after_steps = after


def _check_netns(
    netns: int, tls: bool, workers: int | None, broker_url: str | None, server_url: str | None
) -> None:
    if not netns:
        return
    from simulator.netns import on_loopback, unavailable

    for url in (broker_url, server_url):
        if url and on_loopback(url):
            raise click.UsageError(
                f"--netns: {url} is on loopback, which the namespaces cannot reach; give an "
                "address of this machine's network, or no --broker/--server"
            )

    why = unavailable()
    if why is not None:
        raise click.UsageError(f"--netns: {why}")
    if tls:
        raise click.UsageError(
            "--netns with --tls is not supported: the run's certificates name 127.0.0.1"
        )
    if workers == 0:
        raise click.UsageError("--netns needs worker processes (--workers 1 or more)")


def _announce_join(remote_workers: int, run_id: str) -> Callable[[str, str], None]:
    """Tells the operator, once broker and server are up, how to start each remote worker."""

    def announce(broker: str, server: str) -> None:
        # Plain echo, never wrapped: the line is meant to be copied as it is.
        click.echo(
            f"waiting for {remote_workers} more worker(s); on each, run:\n"
            f"  addin-sim worker --run {run_id} --broker {broker} "
            f"--server {server}",
            err=True,
        )

    return announce


def _run_with_progress(sc: Scenario, options: RunOptions) -> RunResult:
    """Run the coordinator with live progress bars; a failed or stopped run exits here."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulator.coordinator import Coordinator, RunError

    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:

        def on_progress(name: str, done: int, total: int) -> None:
            if name == "connect":
                if name not in tasks:
                    tasks[name] = progress.add_task("connecting clients", total=options.clients)
                progress.update(tasks[name], completed=done)
            else:
                for t in tasks.values():
                    progress.update(t, completed=progress.tasks[t].total)
                tasks[name] = progress.add_task(name, total=1)

        options.progress = on_progress
        try:
            result: RunResult = _event_loop_run(_until_signalled(Coordinator(sc, options)))
        except RunError as e:
            console.print(f"[bold red]run failed:[/] {e}")
            raise SystemExit(2) from None
        except _Signalled as e:
            console.print(
                f"[bold red]run stopped[/] by {e.name}; broker, server and workers stopped"
            )
            raise SystemExit(128 + e.signum) from None
        for t in tasks.values():
            progress.update(t, completed=progress.tasks[t].total)
    return result


@main.command()
@click.option("--run", "run_id", required=True, help="The run id the coordinator printed.")
@click.option(
    "--broker", "broker_url", required=True, callback=_broker_url, help="mqtt://HOST:PORT"
)
@click.option("--server", "server_url", required=True, help="http://HOST:PORT of the server stub.")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="For per-client SQLite files.",
)
def worker(run_id: str, broker_url: str, server_url: str, cache_dir: Path | None) -> None:
    """Join a run as a worker: host virtual clients as the coordinator commands."""
    from simulator.worker import run_worker

    if cache_dir is None:
        cache_dir = Path(tempfile.mkdtemp(prefix="addin-sim-worker-"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    _event_loop_run(run_worker(run_id, broker_url, server_url, cache_dir))


if __name__ == "__main__":
    main()
