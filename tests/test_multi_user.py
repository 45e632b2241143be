"""A shared machine (a terminal server, a VDI host): two users, each with their own agent.

ann and bob are two real uids here (the test runs as root and drops to them with setpriv).
Each installs their own enrollment bundle with `addin-agent service install`, runs their own
daemon from their own agent folder (found without --config), gets their own add-ins from a
real server and broker, and cannot read, launch through, or open the other's agent."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import AGENT_TOKEN, ServerProcess, addin_id, manifest
from harness import agent_env, stop_process
from test_agent_control import CLIENT

from simulator.mosquitto import MosquittoBroker

USERS = {"ann": 65534, "bob": 65533}
"""uid per user: nobody and an unnamed uid (setpriv takes numbers; no account is created)."""
WAIT = 30.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="running agents as two other users needs root and setpriv",
)


def _others_can_run_the_agent() -> str | None:
    """Why the other users cannot run this checkout's agent (None: they can). A checkout
    under a private folder (e.g. `mktemp -d`, mode 0700) is unreachable for them."""
    r = subprocess.run(
        ["setpriv", f"--reuid={USERS['ann']}", f"--regid={USERS['ann']}", "--clear-groups",
         sys.executable, "-c", "import agent.cli"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if r.returncode == 0:
        return None
    return (
        f"uid {USERS['ann']} cannot import this checkout's agent ({r.stderr.strip()[-160:]}): "
        "clone the project into a folder other users can read (not a private mktemp -d "
        "folder) to run the multi-user test"
    )


@pytest.fixture
def machine() -> Iterator[Path]:
    """A folder every user can reach (pytest's tmp_path is private to root), holding the
    users' homes."""
    path = Path(tempfile.mkdtemp(prefix="addin-multi-user-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def home_of(machine: Path, user: str) -> Path:
    return machine / "home" / user


def as_user(machine: Path, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`addin-agent ARGS` run by `user` in their home, with their environment."""
    uid, home = USERS[user], home_of(machine, user)
    env = {k: v for k, v in agent_env().items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), USER=user)
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-m", "agent.cli", *args],
        cwd=home, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def one_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    (line,) = r.stderr.splitlines()
    assert line.startswith("error: ")
    return line


def start_daemon(machine: Path, user: str) -> subprocess.Popen[bytes]:
    """`user`'s `addin-agent run`, with no --config: it finds the user's own agent folder."""
    uid, home = USERS[user], home_of(machine, user)
    env = {k: v for k, v in agent_env().items() if not k.startswith("XDG_")}
    env["HOME"] = str(home)
    with open(machine / f"{user}-daemon.log", "wb") as out:
        return subprocess.Popen(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
             sys.executable, "-m", "agent.cli", "run"],
            cwd=home, env=env, stdout=out, stderr=out,
        )  # fmt: skip


def connect_as(user: str, sock: Path) -> str:
    """What a plain unix-socket client run by `user` gets from `sock` (test_agent_control)."""
    uid = USERS[user]
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-I", "-c", CLIENT, str(sock)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return r.stdout.strip()


def log_of(machine: Path, user: str) -> str:
    return (machine / f"{user}-daemon.log").read_text(errors="replace")


async def wait_ready(machine: Path, user: str, daemon: subprocess.Popen[bytes]) -> None:
    """Until `user`'s daemon is connected with a ready change for Word (bounded)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while asyncio.get_running_loop().time() < deadline:
        assert daemon.poll() is None, log_of(machine, user)
        r = await asyncio.to_thread(as_user, machine, user, "status", "--json")
        if r.returncode == 0:
            st = json.loads(r.stdout)
            if st["connected"] and st["pending_per_host"].get("Word", {}).get("ready") == 1:
                return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{user}'s agent not ready:\n{log_of(machine, user)}")


async def test_two_users_each_have_their_own_agent_and_cannot_touch_the_others(
    machine: Path, broker: MosquittoBroker
) -> None:
    unreachable = _others_can_run_the_agent()
    if unreachable is not None:
        pytest.skip(unreachable)
    server = ServerProcess(machine, broker)
    daemons: dict[str, subprocess.Popen[bytes]] = {}
    try:
        tools = {user: addin_id(f"{user}-tool") for user in USERS}
        for user in USERS:
            await server.user(user)
            await server.upload(manifest(f"{user}-tool"))
            await server.assign(tools[user], "user", user, mode="fixed")

        for user, uid in USERS.items():
            home = home_of(machine, user)
            home.mkdir(parents=True)
            os.chown(home, uid, uid)
            home.chmod(0o700)
            bundle = machine / f"{user}-pc.agent.toml"  # as the admin hands it over
            bundle.write_text(
                f'tenant = "contoso"\nuser_id = "{user}"\nclient_id = "{user}-pc"\n'
                f'insecure = true\nbroker_url = "{broker.url}"\nserver_url = "{server.url}"\n'
                f'server_token = "{AGENT_TOKEN}"\nhosts = ["Word"]\napplier = "folder"\n'
                'applier_dir = "wef"\nanti_entropy_interval = 0\n'
            )
            ok(
                as_user(
                    machine, user, "service", "install", "--config", str(bundle), "--files-only"
                )
            )

        for user in USERS:
            daemons[user] = start_daemon(machine, user)
        for user in USERS:
            await wait_ready(machine, user, daemons[user])

        state = {user: home_of(machine, user) / ".config" / "addin-agent" for user in USERS}
        for user, uid in USERS.items():
            body = json.loads(ok(as_user(machine, user, "launch", "Word", "--json")))
            assert (body["installed"], body["via"]) == ({tools[user]: "1.0.0.0"}, "daemon")
            folder = state[user]
            assert sorted(p.name for p in (folder / "wef" / "Word").iterdir()) == [
                f"{tools[user]}.xml"
            ]
            for path in (folder, folder / "addin-agent.sqlite", folder / "agent.sock"):
                assert path.stat().st_uid == uid, path
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700

        ann = state["ann"]
        # bob cannot read ann's config, nor her cache, nor launch through her daemon ...
        assert "Permission denied" in one_error(
            as_user(machine, "bob", "--config", str(ann / "agent.toml"), "launch", "Word")
        )
        line = one_error(
            as_user(machine, "bob", "--cache", str(ann / "addin-agent.sqlite"), "list")
        )
        assert str(ann / "addin-agent.sqlite") in line
        # ... nor even connect to her control socket.
        assert connect_as("bob", ann / "agent.sock") == "OSError 13"  # EACCES
        # ann's agent still has exactly her add-in, and bob's his.
        for user in USERS:
            listed = json.loads(ok(as_user(machine, user, "list", "--host", "Word", "--json")))
            assert [row["addin_id"] for row in listed] == [tools[user]]
    finally:
        for proc in daemons.values():
            assert stop_process(proc) == 0
        await server.aclose()
