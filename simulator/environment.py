"""The run's environment: a private Mosquitto and server stub process, unless the run was given
a broker and a server, torn down at the end; with `--netns`, the network namespaces the
workers run in (made first, removed last, also when the run fails)."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from server_stub.broker_cli import tls_listener_lines
from simulator.fleet_pki import FleetPki
from simulator.mosquitto import MosquittoBroker, free_port
from simulator.netns import Namespaces, NetnsError, on_loopback
from simulator.processes import die_with_parent
from simulator.results import RunError, RunOptions

TENANT = "contoso"


def console_script(name: str) -> str:
    """The console script next to this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise RunError(f"{name} is not installed: run scripts/bootstrap.sh")
    return found


class Environment:
    """The private broker and server stub (when not given), torn down at the end."""

    def __init__(
        self, options: RunOptions, workdir: Path, clients: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.options = options
        self.clients = clients
        """(client id, user id) of every virtual client: with --tls, each is an enrolled
        device."""
        self.pki: FleetPki | None = None
        """With --tls: the run's CA and device certificates."""
        self.agent_broker_url = ""
        """Where the agents connect: the broker's TLS listener with --tls, else broker_url
        (which the simulator's own control channel uses in either case)."""
        self.workdir = workdir
        self.broker: MosquittoBroker | None = None
        self.server: subprocess.Popen[bytes] | None = None
        self.server_args: list[str] = []
        self.broker_url = options.broker_url or ""
        self.server_url = options.server_url or ""
        self.admin_token = options.admin_token or secrets.token_urlsafe(16)
        self.agent_token = options.agent_token or secrets.token_urlsafe(16)
        self.signing_key: str | None = options.signing_key
        """Public key the agents verify state with (None: they accept it unsigned)."""
        self.netns: Namespaces | None = None
        self.host = "127.0.0.1"
        """Where the private broker and server listen: loopback, or with --netns the
        namespaces' hub address (loopback is not reachable from a namespace)."""

    @property
    def db_path(self) -> Path:
        return self.workdir / "server.sqlite"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """How this process verifies the server (admin API, health check): the run's CA."""
        if self.pki is None:
            return True
        return ssl.create_default_context(cafile=str(self.pki.ca_file))

    def start(self) -> None:
        # A given workdir may not exist yet; with --broker nothing else would create it.
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.options.netns:
            self._make_namespaces()
        if self.options.tls:
            self._start_tls()
            return
        if not self.broker_url:
            self.broker = MosquittoBroker(
                self.workdir / "broker",
                max_queued_messages=10_000,
                host=self.host,
                # With --netns the log shows each client's address: the namespace it is in.
                extra_config="connection_messages true" if self.netns is not None else "",
            )
            self.broker.start()
            self.broker_url = self.broker.url
        self.agent_broker_url = self.broker_url
        if not self.server_url:
            port = free_port(self.host)
            self.server_url = f"http://{self.host}:{port}"
            self.server_args = [
                *self._serve_args(self.broker_url, port),
                "--agent-token",
                self.agent_token,
                # The simulator's private broker has no TLS and agents share one token.
                "--insecure",
                "--signing-key",
                str(self._new_signing_key()),
            ]
            self.start_server()

    def _serve_args(self, broker_url: str, port: int) -> list[str]:
        return [
            console_script("addin-server"),
            "serve",
            "--db",
            str(self.db_path),
            "--broker",
            broker_url,
            "--listen",
            f"{self.host}:{port}",
            "--tenant",
            self.options.tenant,
            "--admin-token",
            self.admin_token,
            # Rollout gates checked every second: a scenario's automatic advance is measured
            # in seconds, not in the default interval.
            "--gate-interval",
            "1",
        ]

    def _start_tls(self) -> None:
        """--tls: a fresh PKI with every client enrolled as a device, the broker with a TLS
        listener for the agents and the server (certificate required, identity = CN, the
        per-device ACL), and `serve --pki` (HTTPS, mqtts, state signed with its key)."""
        self.pki = FleetPki(self.workdir, self.options.tenant)
        self.pki.make(self.clients)
        self.signing_key = self.pki.signing_public
        broker_dir = self.workdir / "broker"
        self.pki.write_broker(broker_dir)
        self.broker = MosquittoBroker(
            broker_dir,
            max_queued_messages=10_000,
            tls_listener=[*tls_listener_lines(broker_dir), f"acl_file {broker_dir / 'acl'}"],
        )
        self.broker.start()
        self.broker_url = self.broker.url
        assert self.broker.tls_url is not None
        self.agent_broker_url = self.broker.tls_url
        port = free_port()
        self.server_url = f"https://127.0.0.1:{port}"
        self.server_args = [
            *self._serve_args(self.agent_broker_url, port),
            "--pki",
            str(self.pki.directory),
        ]
        self.start_server()

    async def enroll_devices(self) -> int:
        """With --tls, once the organisation is loaded: record every device (0 without)."""
        if self.pki is None:
            return 0
        return await self.pki.enroll(self.db_path)

    def _new_signing_key(self) -> Path:
        """A fresh Ed25519 key for this run's server: every run signs, so a fleet run
        measures what verifying every state message costs the agents."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from addin_core.signing import public_key_text

        key = Ed25519PrivateKey.generate()
        path = self.workdir / "signing.key"
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        self.signing_key = public_key_text(key)
        return path

    def start_server(self, timeout: float = 30.0) -> None:
        log = open(self.workdir / "server.log", "ab")  # handed to the child
        try:
            self.server = subprocess.Popen(
                self.server_args,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                raise RunError(f"the server stub exited at start; see {self.workdir}/server.log")
            try:
                answer = httpx.get(f"{self.server_url}/healthz", timeout=1, verify=self.verify)
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RunError(f"the server stub did not answer /healthz within {timeout}s")

    def restart_server(self) -> None:
        if self.server is None:
            raise RunError("server_restart needs the private server (run without --server)")
        self._stop_server()
        self.start_server()

    def stop(self) -> None:
        try:
            if self.server is not None and self.server.poll() is None:
                self._stop_server()
            if self.broker is not None:
                self.broker.kill()
        finally:
            if self.netns is not None:
                self.netns.remove()

    def _make_namespaces(self) -> None:
        """--netns: the namespaces and their veth pairs; a given broker or server must be
        reachable from them, which loopback is not."""
        for url in (self.broker_url, self.server_url):
            if url and on_loopback(url):
                raise RunError(
                    f"--netns: {url} is on loopback, which the namespaces cannot reach; give "
                    "an address of this machine's network, or no --broker/--server"
                )
        self.netns = Namespaces(self.options.netns, self.options.run_id)
        try:
            self.netns.create()
        except NetnsError as e:
            raise RunError(f"--netns: {e}") from None
        self.host = self.netns.hub

    def _stop_server(self) -> None:
        assert self.server is not None
        self.server.terminate()
        try:
            self.server.wait(10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
