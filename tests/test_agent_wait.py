"""`addin-agent wait` gives up after --timeout with one line saying what is missing (its
success path is exercised end to end by the README walk-through, tests/test_walkthrough.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner

from agent.cli import main
from agent.config import load_config
from agent.daemon import Agent


def write_config(tmp: Path) -> Path:
    cfg = tmp / "agent.toml"
    cfg.write_text(
        'tenant = "contoso"\nuser_id = "ann"\nclient_id = "ann-laptop"\ninsecure = true\n'
        'cache_path = "cache.sqlite"\nserver_url = "http://127.0.0.1:1"\n'
    )
    return cfg


def wait(cfg: Path) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["--config", str(cfg), "wait", "--timeout", "0.3"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    return r.exit_code, r.output


def test_wait_without_a_cache_says_so(tmp_path: Path) -> None:
    code, out = wait(write_config(tmp_path))
    assert code == 1
    assert out.splitlines() == [
        f"error: not in sync after 0.3 s: no agent cache at {tmp_path / 'cache.sqlite'} "
        "(has the agent run on this computer?)"
    ]


def test_wait_with_no_connected_daemon_says_so(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)

    async def open_and_close() -> None:
        agent = Agent(load_config(cfg, env={}))
        await agent.open()
        assert agent.cache is not None
        await agent.cache.close()

    asyncio.run(open_and_close())
    code, out = wait(cfg)
    assert code == 1
    # (the cache names this process as its owner, alive but never connected)
    assert out.splitlines() == [
        "error: not in sync after 0.3 s: the daemon is not connected to the broker"
    ]
