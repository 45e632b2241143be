"""Stopping an agent ends its MQTT task and closes its cache, whatever it was doing.

On Python 3.11 `asyncio.wait_for` returns the awaited result and drops a cancellation that
arrives in the same turn of the loop; aiomqtt awaits every SUBACK, PUBACK and CONNACK with
it. A stop landing then was lost: the connection task went on to wait for messages forever
and `Agent.stop` never returned (the simulator's `offline` command hung on it).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from addin_runtime.mqtt import paho_client
from agent.config import AgentConfig
from agent.daemon import Agent
from agent.transport import Transport
from simulator.mosquitto import MosquittoBroker


class StopOnSuback(Transport):
    """Calls `stop()` from another task the moment the broker's SUBACK is read, before the
    subscribing task resumes: the timing under which the cancellation went missing."""

    stopper: asyncio.Task[None] | None = None

    def _make_client(self) -> aiomqtt.Client:
        client = super()._make_client()
        paho = paho_client(client)
        assert paho is not None
        inner = paho.on_subscribe

        def on_subscribe(*args: Any) -> None:
            if self.stopper is None:
                self.stopper = asyncio.get_running_loop().create_task(self.stop())
            inner(*args)

        paho.on_subscribe = on_subscribe
        return client


async def _noop(*_: Any) -> None:
    return None


async def test_stop_during_a_subscribe_ends_the_connection_task(broker: MosquittoBroker) -> None:
    t = StopOnSuback(
        host="127.0.0.1",
        port=broker.port,
        client_id="stop-race",
        username=None,
        password=None,
        session_expiry=60,
        keepalive=30,
        on_message=_noop,
        on_connect=_noop,
        on_disconnect=_noop,
        desired=lambda: {"contoso/everyone"},
        clean_start_first=True,
    )
    t.start()
    task = t._task
    assert task is not None
    # Bounded so that the old behaviour (a task that never ends) fails instead of hanging.
    done, _ = await asyncio.wait({task}, timeout=30)
    assert t.stopper is not None, "the broker never answered the subscription"
    assert done, "the connection task outlived stop()"
    await t.stopper
    assert not t.connected.is_set()


class BrokenTransport:
    async def stop(self) -> None:
        raise RuntimeError("transport failed to stop")


def _cache_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "_connection_worker_thread" in t.name]


async def test_agent_stop_closes_the_cache_even_when_a_step_fails(tmp_path: Path) -> None:
    before = set(_cache_threads())
    agent = Agent(
        AgentConfig(
            tenant="contoso",
            user_id="ann",
            client_id="ann-pc",
            insecure=True,
            broker_url="mqtt://127.0.0.1:1",
            server_url="http://127.0.0.1:1",
            cache_path=str(tmp_path / "ann-pc.sqlite"),
            applier="memory",
        )
    )
    await agent.open()
    assert set(_cache_threads()) - before, "a file cache runs a thread"
    agent.transport = BrokenTransport()  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="failed to stop"):
        await agent.stop()
    assert agent.cache is None
    for t in set(_cache_threads()) - before:
        t.join(timeout=10)  # the thread ends once its connection is closed
        assert not t.is_alive()
