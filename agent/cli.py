"""`addin-agent`: the endpoint daemon and its troubleshooting commands.

`run` is the daemon. `launch`, `install` and `remove` go through the running daemon's
control endpoint, or straight to the cache when no daemon answers. Everything else reads
the cache read-only (agent/cli_read.py): it works with the daemon stopped and never blocks
it. Every command takes `--json`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from addin_core.topics import Host
from addin_runtime.cli_support import Group
from addin_runtime.logs import log_format_option
from agent import cli_read
from agent.cli_common import (
    HOST_CHOICE,
    Ctx,
    config_options,
    console,
    emit_json,
    fail,
    parse_host,
    pass_ctx,
    shown,
    text_table,
)

if TYPE_CHECKING:
    from agent.config import AgentConfig

# Imports the daemon alone needs (asyncio's loop, the cache writer, pydantic's config, the
# MQTT client) are made inside the commands: `why`, `status`, `list` and `launch` answer in
# a fraction of what importing them costs (docs/benchmarks.md "Helpdesk commands").


@click.group(
    cls=Group,
    context_settings={"help_option_names": ["-h", "--help"]},
    lazy={
        "report-bundle": "agent.cli_bundle:report_bundle",
        "service": "agent.cli_service:service",
    },
)
@click.version_option(package_name="addin-deploy", prog_name="addin-agent")
@config_options
@click.pass_context
def main(ctx: click.Context) -> None:
    """Office add-in deployment agent."""
    ctx.obj = Ctx()


# -- the daemon ------------------------------------------------------------------------------


@main.command()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@log_format_option
@pass_ctx
def run(c: Ctx, verbose: int, log_format: str) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    import asyncio
    import logging

    from addin_runtime.logs import setup_logging

    cfg = c.config()
    setup_logging("addin-agent", log_format, logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        logging.getLogger("httpx").setLevel(logging.WARNING)
    problem = asyncio.run(_run(cfg))
    if problem is not None:
        fail(problem)


def _startup_problem(e: BaseException, cfg: AgentConfig) -> str:
    """One line saying what stopped the start, naming the file or endpoint involved."""
    import sqlite3

    from agent.cache import CacheError
    from agent.control import ControlEndpointError
    from agent.tls import TlsSetupError

    if isinstance(e, CacheError | ControlEndpointError):
        return str(e)
    if isinstance(e, TlsSetupError):
        return f"agent {cfg.client_id} not started: {e}"
    if isinstance(e, sqlite3.Error):
        return f"cache {cfg.cache_path} is not usable: {e}"
    if isinstance(e, OSError):
        what = e.strerror or str(e)
        what = f"{e.filename}: {what}" if e.filename else what
    else:
        what = f"{type(e).__name__}: {e}"
    return f"agent {cfg.client_id} not started: {what}"


async def _run(cfg: AgentConfig) -> str | None:
    """The daemon's life; returns why it could not start (None after a normal stop)."""
    import asyncio
    import logging

    from addin_runtime.stop_signals import on_stop_signals
    from agent.daemon import Agent
    from agent.memory import MemoryReleaser, freeze_started

    log = logging.getLogger("addin_agent")
    agent = Agent(cfg)
    releaser = MemoryReleaser()
    agent.settled = releaser.request  # one agent in this process: give back what a burst freed
    stop = asyncio.Event()
    on_stop_signals(asyncio.get_running_loop(), stop.set)
    try:
        await agent.start()
    except Exception as e:
        # Whatever was opened (cache, socket, broker task) is closed before saying why, so
        # the process ends instead of living on with a half-started daemon.
        log.debug("start failed", exc_info=True)
        try:
            await agent.stop()
        except Exception:  # the first failure is the one to report
            log.debug("stop after a failed start failed too", exc_info=True)
        return _startup_problem(e, cfg)
    freeze_started()
    if cfg.insecure:  # after the start: a refused start stays one error line
        gaps = cfg.lab_gaps()
        log.warning(
            "insecure = true (lab mode)%s; outside a lab use the agent.toml from "
            "`addin-server enroll`",
            ": " + "; ".join(gaps) if gaps else "",
        )
    log.info(
        "agent %s for %s/%s running; cache %s",
        cfg.client_id,
        cfg.tenant,
        cfg.user_id,
        cfg.cache_path,
        extra={"user": cfg.user_id, "device": cfg.client_id},
    )
    await stop.wait()
    log.info("shutting down")
    releaser.cancel()
    await agent.stop()
    return None


# -- talking to the daemon (or the cache directly) ---------------------------------------------


def _control_call(control: str | None, method: str, path: str) -> tuple[int, Any] | None:
    """Call the running daemon; None when it does not answer (then act on the cache)."""
    if not control:
        return None
    from agent.control_client import UntrustedSocket, call

    try:
        return call(control, method, path)
    except UntrustedSocket as e:
        fail(str(e))
    except ValueError:  # not a socket path: the config's own check says so, below
        return None


async def _direct(cfg: AgentConfig, what: str, arg: str) -> Any:
    from agent.daemon import Agent

    agent = Agent(cfg)
    await agent.open()
    try:
        if what == "launch":
            host = Host(arg)
            n = len([k for k in agent.pending if k[0] == host and agent.pending[k].ready])
            return {"host": host.value, "installed": await agent.launch(host), "applied": n}
        if what == "install":
            return {"message": await agent.install(arg)}
        return {"message": await agent.remove(arg)}
    finally:
        await agent.stop()


def _act(c: Ctx, what: str, arg: str, path: str) -> dict[str, Any]:
    # The daemon first, found from the one field it needs (no config validation, no daemon
    # import: a launch hook pays only for the call); on the cache only when it does not answer.
    control = c.control_endpoint()
    answer = _control_call(control, "POST", path)
    cfg = None
    if answer is None:
        cfg = c.config()
        if cfg.control != control:
            answer = _control_call(cfg.control, "POST", path)
    if answer is not None:
        status, body = answer
        if status != 200:
            fail(body.get("detail", f"daemon answered {status}"))
        body["via"] = "daemon"
        return body
    import asyncio

    from agent.cache import CacheError, CacheInUse
    from agent.daemon import AgentRefusal

    assert cfg is not None
    try:
        body = asyncio.run(_direct(cfg, what, arg))
    except AgentRefusal as e:
        fail(str(e))
    except CacheInUse as e:
        # The daemon runs but its endpoint did not answer: writing the cache behind its
        # back would be overwritten by its next transition.
        via = (
            f"its control endpoint {cfg.control} did not answer"
            if cfg.control
            else ("no control endpoint is configured (`control` in the config)")
        )
        fail(
            f"the agent daemon ({'pid ' + str(e.pid) if e.pid else 'another process'}) holds "
            f"{e.path} and {via}; {what} goes through the running daemon"
        )
    except CacheError as e:
        fail(str(e))
    body["via"] = "cache"
    return body


@main.command()
@click.argument("host", type=HOST_CHOICE)
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def launch(c: Ctx, host: str, as_json: bool) -> None:
    """HOST starts: apply its pending changes and print the installed set."""
    h = parse_host(host)
    assert h is not None
    body = _act(c, "launch", h.value, f"/v1/launch/{h.value}")
    if as_json:
        emit_json(body)
        return
    title = f"{h.value}: installed add-ins ({body['applied']} change(s) applied)"
    rows = sorted(body["installed"].items())
    click.echo(text_table(title, ("add-in", "version"), rows))


@main.command()
@click.argument("addin")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def install(c: Ctx, addin: str, as_json: bool) -> None:
    """Install an available add-in (by name or id); applies at the next launch."""
    body = _act(c, "install", addin, f"/v1/install/{addin}")
    emit_json(body) if as_json else console.print(shown(body["message"]))


@main.command()
@click.argument("addin")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def remove(c: Ctx, addin: str, as_json: bool) -> None:
    """Remove an optional add-in (a fixed one is refused); applies at the next launch."""
    body = _act(c, "remove", addin, f"/v1/remove/{addin}")
    emit_json(body) if as_json else console.print(shown(body["message"]))


for command in cli_read.COMMANDS:
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()

__all__ = ["main"]
