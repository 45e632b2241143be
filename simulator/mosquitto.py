"""A private Mosquitto broker process: started on a free loopback port with its own config.

Used by the test suite (through the `broker` fixture) and by `addin-sim run` when no
`--broker` is given. It can be stopped, killed with SIGKILL and restarted on the same port,
with or without persistence, so fault tests can do to the broker what production does.
The machine's own broker on port 1883 is never touched.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from simulator.processes import die_with_parent


class BrokerError(RuntimeError):
    """The broker binary is missing or the process did not come up."""


def find_mosquitto() -> str:
    """Return the path of the mosquitto binary, or raise with how to install it."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None,
    )
    if not found:
        raise BrokerError(
            "mosquitto is not installed: run `sudo apt-get install -y mosquitto` "
            "(scripts/bootstrap.sh does this when run as root)"
        )
    return found


LISTEN_PORTS = range(20_000, 32_000)
"""Where `free_port` picks: below Linux's ephemeral range (32768-60999), which the kernel
hands to outgoing connections — thousands at once in a fleet run — so a port picked there
could be taken by some client's socket before the broker or server binds it."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a broker or server about to start. Callers that
    start a process on it still retry another port if it was taken meanwhile."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.choice(LISTEN_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any port
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MosquittoBroker:
    """One Mosquitto process bound to 127.0.0.1 on a port chosen once and kept across restarts."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        password_file: Path | None = None,
        acl_file: Path | None = None,
        persistence: bool = False,
        max_queued_messages: int = 1000,
        extra_config: str = "",
        tls_listener: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        """127.0.0.1, or the namespaces' hub address with `addin-sim run --netns`."""
        self.port = port or free_port(self.host)
        self._port_chosen_here = port is None
        """Another process may take a port `free_port` gave before Mosquitto binds it; then
        the first start tries another one (later starts keep the port: clients know it)."""
        self.password_file = password_file
        self.acl_file = acl_file
        self.persistence = persistence
        self.max_queued_messages = max_queued_messages
        self.extra_config = extra_config
        self.tls_listener = tls_listener
        """The options of a second, TLS listener (`server_stub.broker_cli.tls_listener_lines`)
        with `acl_file` its ACL; the first listener stays plain, anonymous and without ACL:
        the simulator's control channel and the bare fan-out use it."""
        self.tls_port = free_port(self.host) if tls_listener is not None else None
        self.process: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.persistence_dir = self.workdir / "persistence"

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str | None:
        return None if self.tls_port is None else f"mqtts://{self.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def write_config(self) -> Path:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            f"max_queued_messages {self.max_queued_messages}",
            "max_inflight_messages 0",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages false",
        ]
        if os.geteuid() == 0:
            # Mosquitto drops root to the `mosquitto` user, which could not read our files.
            lines.append("user root")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        if self.persistence:
            self.persistence_dir.mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/"]
        else:
            lines.append("persistence false")
        if self.extra_config:
            lines.append(self.extra_config)
        if self.tls_listener is not None:
            # Each listener then has its own allow_anonymous and acl_file, given after it.
            lines = ["per_listener_settings true", *lines[2:], lines[0], lines[1]]
            # Each connect logged with its username, which on the TLS listener is the CN
            # of the client's certificate: the record of who connected as whom.
            lines[lines.index("connection_messages false")] = "connection_messages true"
            lines += [f"listener {self.tls_port} {self.host}", "allow_anonymous false"]
            lines += self.tls_listener
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        for attempt in range(5):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                self._start_once(timeout)
                return
            except BrokerError:
                with open(self.log_path, "rb") as f:
                    f.seek(logged)
                    conflict = b"address already in use" in f.read().lower()
                if not (conflict and self._port_chosen_here) or attempt == 4:
                    raise
                self.port = free_port(self.host)

    def _start_once(self, timeout: float) -> None:
        self.write_config()
        log = open(self.log_path, "ab")  # handed to the child process
        try:
            self.process = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.config_path)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent(),  # see simulator.processes
            )
        finally:
            log.close()
        self._wait_until_accepting(timeout)
        self._port_chosen_here = False

    def _wait_until_accepting(self, timeout: float) -> None:
        """Until this Mosquitto accepts connections. A connection alone is not proof: another
        process holding the port would accept it while ours fails to bind and exits, so the
        listening socket must also be ours."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited at start (port {self.port}); log:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
                if self._listens():
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        raise BrokerError(f"mosquitto did not accept connections within {timeout}s")

    def _listens(self) -> bool:
        assert self.process is not None
        try:
            sockets = psutil.Process(self.process.pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in sockets)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): with persistence, Mosquitto saves its database first."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: no chance to save anything."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self, *, hard: bool = False, timeout: float = 10.0) -> None:
        """Stop (or kill, when `hard`) and start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        deadline = time.monotonic() + timeout
        # The kernel may keep the port briefly; retry until it is free again.
        while True:
            try:
                self.start(timeout=timeout)
                return
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
