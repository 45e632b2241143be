"""The agent's metrics for node_exporter's textfile collector (`metrics_file` in agent.toml):
a small Prometheus text file rewritten every `metrics_interval` seconds and at stop.

A file, not an endpoint: a workstation should not open a listening port for monitoring, and
node_exporter (or windows_exporter's textfile collector) already runs where fleets are
scraped. The file is written to a temporary name and renamed, so a scrape never reads half
of it. The text format is written here by hand (a dozen lines), so the agent's base install
needs no Prometheus library; the tests read it back with prometheus_client's parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.daemon import Agent

log = logging.getLogger("addin_agent.metrics")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(agent: Agent, now: float) -> str:
    """The exposition text of one agent's state."""
    cfg = agent.config
    lines: list[str] = []

    def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    info = f'{{tenant="{_label(cfg.tenant)}",user="{_label(cfg.user_id)}",device="{_label(cfg.client_id)}"}}'
    metric("addin_agent_info", "gauge", "This agent's tenant, user and device.", [(info, 1)])
    metric("addin_agent_connected", "gauge", "1 while connected to the broker.",
           [("", 1 if agent.connected else 0)])  # fmt: skip
    metric("addin_agent_revision", "gauge", "Highest tenant revision received.",
           [("", agent.state.revision)])  # fmt: skip
    metric("addin_agent_entitlements", "gauge", "Add-ins the user is entitled to.",
           [("", len(agent.entitlements()))])  # fmt: skip
    installed = agent.installed()
    metric("addin_agent_installed", "gauge", "Add-ins installed, per host app.",
           [(f'{{host="{h.value}"}}', len(installed.get(h, {}))) for h in cfg.hosts])  # fmt: skip
    pending = Counter(h.value for h, _ in agent.pending)
    metric("addin_agent_pending", "gauge", "Changes waiting for the host app's next launch.",
           [(f'{{host="{h.value}"}}', pending.get(h.value, 0)) for h in cfg.hosts])  # fmt: skip
    metric("addin_agent_messages", "counter", "State messages by outcome since start.",
           [(f'{{result="{k}"}}', v) for k, v in sorted(agent.stats.items())])  # fmt: skip
    refused = agent.transport.refused_subscriptions if agent.transport else 0
    metric("addin_agent_subscriptions_refused", "counter",
           "Subscriptions the broker refused (each retried) since start.", [("", refused)])  # fmt: skip
    metric("addin_agent_metrics_written_timestamp_seconds", "gauge",
           "When this file was written.", [("", round(now, 3))])  # fmt: skip
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def write_forever(agent: Agent, path: Path, interval: float) -> None:
    """Until cancelled; a failed write is logged once per kind and tried again."""
    last_error = ""
    try:
        while True:
            try:
                write_atomically(path, render(agent, time.time()))
                last_error = ""
            except OSError as e:
                if str(e) != last_error:
                    log.warning("cannot write the metrics file %s: %s", path, e)
                last_error = str(e)
            await asyncio.sleep(interval)
    finally:
        # The state at stop (disconnected), so a scrape does not show a stopped agent up.
        with contextlib.suppress(OSError):
            write_atomically(path, render(agent, time.time()))
