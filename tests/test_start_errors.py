"""Programs refuse what they cannot use at start: one line, non-zero, nothing left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def test_serve_on_a_busy_port_says_so_in_one_line_and_makes_no_database(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "server_stub", "--db", str(tmp_path / "s.db"), "serve",
             "--tenant", "contoso", "--broker", "mqtt://127.0.0.1:1",
             "--listen", f"127.0.0.1:{port}", "--insecure", "--admin-token", "a", "--agent-token", "b"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert not (tmp_path / "s.db").exists()


def test_sim_refuses_a_malformed_broker_url_before_starting_anything() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "simulator.cli", "run", "--clients", "5", "--broker", "notaurl"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2
    assert "'notaurl' must look like mqtt://HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr and "run failed" not in r.stdout
