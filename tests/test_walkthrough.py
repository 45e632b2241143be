"""The README's walk-through runs as written: `scripts/walkthrough.py` extracts its commands
and files and runs them against the real broker, server and agent on loopback; and the
runner itself fails where it must (a failing command, a background process that died)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "walkthrough.py"
WALK_PORTS = (18883, 18080)
"""The broker and server ports the README names (outside Linux's ephemeral range, so no
other test's free port is ever one of them)."""


def runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walkthrough", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["walkthrough"] = module
    spec.loader.exec_module(module)
    return module


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_walkthrough_runs_as_written() -> None:
    busy = [p for p in WALK_PORTS if listening(p)]
    assert not busy, f"127.0.0.1 ports {busy} are taken: the walk-through needs them free"
    r = run_script()
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr
    assert r.stderr.strip().endswith("walkthrough: ok")
    # Things the README says happen, checked on what the commands printed.
    assert "in sync at revision 1" in r.stdout
    assert "in sync at revision 2" in r.stdout
    # Outlook add-ins come from the mailbox: the agent says so rather than "installed".
    assert "Contoso Mail Helper 1.0.0.3 is assigned to you for Outlook" in r.stdout
    assert "0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d.xml" in r.stdout
    # The watcher wrote Excel's ready change while Excel was not running: doctor says so
    # instead of calling it a drift from the installed set.
    assert "holds the ready changes, written for its next start" in r.stdout
    assert "differs from the installed set" not in r.stdout
    # The broker, the server and the agent are gone with it.
    assert [p for p in WALK_PORTS if listening(p)] == []


README = """# x

## Walk-through: test

```console
$ echo one \\
    two
one two
$ cd "$(mktemp -d)" && mkdir sub && cd sub
```

```toml file=conf.toml
key = "value"
```

```sql
this is not run
```

```console
$ cat conf.toml
old output
$ sleep 60 &
$ kill %1
```

## Next section

```console
$ false
```
"""


def test_parse_reads_commands_files_and_outputs() -> None:
    w = runner()
    steps = w.parse(README.splitlines())
    kinds = [type(s).__name__ for s in steps]
    assert kinds == ["Command", "Command", "FileBlock", "Command", "Command", "Command"]
    assert steps[0].text == "echo one \\\n    two" and steps[0].shown == ["one two"]
    assert steps[2].name == "conf.toml" and steps[2].body == 'key = "value"\n'
    assert [s.background for s in steps if isinstance(s, w.Command)] == [
        False,
        False,
        False,
        True,
        False,
    ]
    assert all("false" not in s.text for s in steps if isinstance(s, w.Command))


def test_run_and_update_write_what_the_commands_printed(tmp_path: Path) -> None:
    w = runner()
    readme = tmp_path / "README.md"
    readme.write_text(README)
    r = run_script("--readme", str(readme), "--update", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = readme.read_text()
    assert '$ cat conf.toml\nkey = "value"\n$ sleep 60 &' in text
    assert "old output" not in text
    assert "$ false" in text  # outside the section: untouched
    assert w.parse(text.splitlines())[0].shown == ["one two"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("$ true\n$ ls no-such-file\n$ echo never\n", "line 7: $ ls no-such-file"),
        ("$ sh -c 'exit 3' &\n$ sleep 1\n", "exited with status 3"),
    ],
)
def test_a_failing_command_fails_the_walkthrough(tmp_path: Path, body: str, expected: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Walk-through\n\n```console\n{body}```\n")
    r = run_script("--readme", str(readme), timeout=60)
    assert r.returncode == 1
    assert expected in r.stdout + r.stderr
    assert "never" not in r.stdout
