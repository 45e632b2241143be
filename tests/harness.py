"""The test harness every suite shares to run the programs as real processes on loopback.

- `ServerProcess`: `addin-server serve` on a free loopback port, with its log; start, wait
  until /healthz answers, stop (SIGTERM, then SIGKILL), kill, restart on the same port and
  database.
- `AgentProcess`: `addin-agent run --config FILE`, with its log; stop and kill alike.
- `stop_process`: the orderly stop both use.

Brokers come from the `broker` / `broker_factory` fixtures of conftest.py (a private Mosquitto
on a free loopback port, `simulator.mosquitto`). Every wait here is bounded in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from simulator.mosquitto import free_port

REPO = Path(__file__).resolve().parents[1]

TENANT = "contoso"
ADMIN_TOKEN = "admin-secret"
AGENT_TOKEN = "agent-secret"

READY_TIMEOUT = 20.0
"""Seconds a server gets to answer /healthz after it started."""

CRASH_HOOK = "ADDIN_SERVER_CRASH_AFTER_COMMIT"
"""Makes the server exit between a commit and its publication (the fault tests set it)."""

STOP_TIMEOUT = 10.0
"""Seconds a process gets to end after SIGTERM before it is killed."""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL if it has not ended within `timeout`; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def server_command(
    db: Path | str,
    broker_url: str,
    port: int,
    *,
    tenant: str = TENANT,
    admin_token: str = ADMIN_TOKEN,
    agent_token: str = AGENT_TOKEN,
    admin_user: str | None = None,
    broker_account: tuple[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
) -> list[str]:
    """The command line of `addin-server serve` (run with this interpreter)."""
    cmd = [
        sys.executable, "-m", "server_stub", "serve",
        "--db", str(db), "--tenant", tenant, "--broker", broker_url,
        "--listen", f"127.0.0.1:{port}", "--insecure",
        "--admin-token", admin_token, "--agent-token", agent_token,
    ]  # fmt: skip
    if broker_account is not None:
        cmd += ["--broker-username", broker_account[0], "--broker-password", broker_account[1]]
    if admin_user is not None:
        cmd += ["--admin-user", admin_user]
    return cmd + list(extra_args)


class ServerProcess:
    """`addin-server serve` as a real process; restartable on the same port and database."""

    def __init__(
        self,
        db: Path | str,
        broker_url: str,
        *,
        log: Path | None = None,
        tenant: str = TENANT,
        admin_token: str = ADMIN_TOKEN,
        agent_token: str = AGENT_TOKEN,
        admin_user: str | None = None,
        broker_account: tuple[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.db = db
        """An SQLite file, or a postgresql:// URL (then `log` must be given)."""
        self.extra_args = extra_args
        """Options added to every start's command line (--log-format json...)."""
        self.broker_url = broker_url
        if log is None:
            assert isinstance(db, Path), "a server on PostgreSQL needs its log file named"
            log = db.parent / "server.log"
        self.log = log
        self.tenant = tenant
        self.admin_token = admin_token
        self.agent_token = agent_token
        self.admin_user = admin_user
        self.broker_account = broker_account
        self.env = dict(env or {})
        """Environment variables of every start, on top of this process's own."""
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, wait: bool = True, env: Mapping[str, str] | None = None) -> None:
        """Start the server (with `env` on top for this start only); unless `wait` is false,
        wait until it answers. On its first start, another process that took the free port
        meanwhile only makes it try another port."""
        for attempt in range(5):
            logged = self.log.stat().st_size if self.log.exists() else 0
            self._spawn(env or {})
            if not wait:
                return
            try:
                self.wait_ready()
                return
            except AssertionError:
                conflict = "address already in use" in self._log_since(logged).lower()
                if self.starts > 1 or attempt == 4 or not conflict:
                    raise
                self.starts -= 1
                self.port = free_port()

    def _spawn(self, env: Mapping[str, str]) -> None:
        self.starts += 1
        cmd = server_command(
            self.db,
            self.broker_url,
            self.port,
            tenant=self.tenant,
            admin_token=self.admin_token,
            agent_token=self.agent_token,
            admin_user=self.admin_user,
            broker_account=self.broker_account,
            extra_args=self.extra_args,
        )
        # The crash hook of the fault tests is set only where a test asks for it.
        inherited = {k: v for k, v in os.environ.items() if k != CRASH_HOOK}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, env={**inherited, **self.env, **env}, cwd=REPO
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.03)
        raise AssertionError(f"server not ready:\n{self.log_tail()}")

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def agent_env() -> dict[str, str]:
    """This process's environment without the agent's own variables: a test's agent reads
    only the configuration it is given."""
    return {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}


class AgentProcess:
    """`addin-agent run --config FILE` as a real process."""

    def __init__(self, config: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
                stdout=out,
                stderr=out,
                env=dict(env) if env is not None else agent_env(),
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        return stop_process(self.proc, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
