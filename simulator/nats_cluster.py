"""A private NATS cluster: N `nats-server` nodes on free loopback ports, each with its MQTT
gateway and JetStream, its own config and store folders; nodes can be SIGKILLed and
restarted on the same ports and store.

Used by the test suite (with the configuration `addin-server broker-config --target nats`
writes) and by `bench/bench_brokers.py` (an open cluster, like the simulator's private
Mosquitto: one account, no passwords). nats-server 2.9's MQTT speaks 3.1.1, QoS 0 and 1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as paho

from server_stub.broker_targets import Listen, NatsNode, nats_node_text
from simulator.mosquitto import free_port
from simulator.processes import die_with_parent

READY_TIMEOUT = 60.0
"""Seconds a cluster gets to elect its JetStream leaders and accept MQTT logins."""


class NatsError(RuntimeError):
    """nats-server is missing or a node did not come up."""


def find_nats_server() -> str:
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/local/bin/nats-server") if os.path.exists(p)),
        None,
    )
    if not found:
        raise NatsError(
            "nats-server is not installed: run `sudo apt-get install -y nats-server` "
            "(scripts/bootstrap.sh does this when run as root)"
        )
    return found


def free_nodes(count: int) -> list[NatsNode]:
    """`count` loopback nodes, each on three distinct free ports."""
    taken: set[int] = set()

    def port() -> int:
        for _ in range(100):
            p = free_port()
            if p not in taken:
                taken.add(p)
                return p
        raise NatsError("no free port")

    loop = "127.0.0.1"
    return [
        NatsNode(Listen(loop, port()), Listen(loop, port()), Listen(loop, port()))
        for _ in range(count)
    ]


def node_arg(node: NatsNode) -> str:
    """The node as `broker-config --target nats --node` takes it."""
    return f"mqtt={node.mqtt},client={node.client},cluster={node.cluster}"


def write_open_cluster(
    directory: Path, nodes: Sequence[NatsNode], *, light_consumers: bool = False
) -> None:
    """Config files of a cluster without passwords or permissions (a benchmark's, as the
    simulator's private Mosquitto allows anonymous logins): one account, ``sim``, which
    every login without credentials becomes. `light_consumers`: see `nats_node_text`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "accounts.conf").write_text(
        "accounts { sim: { jetstream: enabled, users: [{user: sim, password: sim}] } }\n"
        "no_auth_user: sim\n"
    )
    for i in range(len(nodes)):
        store = (directory / "jetstream" / f"node-{i}").absolute()
        text = nats_node_text("sim", i, nodes, store, light_consumers=light_consumers)
        (directory / f"nats-{i}.conf").write_text(text)


class NatsCluster:
    """The nodes whose configs (``nats-N.conf``) are in `directory`; `login` is the
    (username, password) the readiness check logs in with (None: no credentials)."""

    def __init__(
        self, directory: Path, nodes: Sequence[NatsNode], login: tuple[str, str] | None = None
    ) -> None:
        self.directory = directory
        self.nodes = list(nodes)
        self.login = login
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * len(nodes)

    def mqtt_url(self, i: int) -> str:
        return f"mqtt://{self.nodes[i].mqtt}"

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        binary = find_nats_server()
        for i in range(len(self.nodes)):
            self._spawn(binary, i)
        try:
            for i in range(len(self.nodes)):
                self.wait_ready(i, timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, binary: str, i: int) -> None:
        log = open(self.directory / f"nats-{i}.log", "ab")  # handed to the child
        try:
            self.procs[i] = subprocess.Popen(
                [binary, "-c", str((self.directory / f"nats-{i}.conf").absolute())],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()

    def wait_ready(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        """Until node `i` accepts an MQTT 3.1.1 login (its JetStream streams exist)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                raise NatsError(f"nats node {i} exited; see {self.directory}/nats-{i}.log")
            rc = self._probe(i)
            if rc == 0:
                return
            last = f"CONNACK {rc}"
            time.sleep(0.3)
        raise NatsError(f"nats node {i} not ready within {timeout}s ({last})")

    def _probe(self, i: int) -> int | None:
        result: list[int] = []
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"addin-probe-{i}-{os.getpid()}",
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if self.login is not None:
            client.username_pw_set(*self.login)
        client.on_connect = lambda _c, _u, _f, rc, _p=None: result.append(int(rc.value))
        try:
            client.connect(self.nodes[i].mqtt.host, self.nodes[i].mqtt.port, keepalive=10)
            end = time.monotonic() + 5
            while not result and time.monotonic() < end:
                client.loop(0.1)
            client.disconnect()
        except OSError:
            return None
        return result[0] if result else None

    def kill(self, i: int) -> None:
        """SIGKILL node `i`: no goodbye to its peers or its clients."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def restart(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        self.kill(i)
        self._spawn(find_nats_server(), i)
        self.wait_ready(i, timeout)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log_tail(self, i: int, lines: int = 20) -> str:
        path = self.directory / f"nats-{i}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
