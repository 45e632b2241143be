"""`addin-server manifest validate`: verdicts, --json, exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from server_stub.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "manifests"
VALID = [FIXTURES / "taskpane.xml", FIXTURES / "content.xml", FIXTURES / "mail.xml"]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["manifest", "validate", *args])
    return result.exit_code, result.output


def test_all_valid_exits_zero_with_one_verdict_per_file() -> None:
    code, out = run(*map(str, VALID))
    assert code == 0, out
    assert out.count("valid  ") == 3
    assert "TaskPaneApp id=0e3b2c1a-5d4f-4a6b-8c7d-9e0f1a2b3c4d version=1.10.0.0" in out
    assert "warning [localhost-source] line 13: <SourceLocation>:" in out
    assert out.rstrip().endswith("3 of 3 valid")


def test_one_invalid_file_fails_the_run_and_errors_are_listed() -> None:
    code, out = run(str(VALID[0]), str(FIXTURES / "invalid_fields.xml"))
    assert code == 1
    assert "INVALID  " in out
    assert "error [bad-version] line 4: <Version>: '1.0.0.0.0' has 5 parts" in out
    assert "error [bad-id] line 3: <Id>:" in out
    assert "1 of 2 valid" in out


def test_json_output() -> None:
    code, out = run("--json", str(FIXTURES / "mail.xml"), str(FIXTURES / "xxe.xml"))
    assert code == 1
    mail, xxe = json.loads(out)
    assert mail == {
        "file": str(FIXTURES / "mail.xml"),
        "valid": True,
        "id": "a1b2c3d4-e5f6-4789-abcd-ef0123456789",
        "version": "1.0.0.3",
        "type": "MailApp",
        "hosts": ["Outlook"],
        "permissions": "ReadWriteItem",
        "errors": [],
        "warnings": [],
    }
    assert xxe["valid"] is False and xxe["id"] is None and xxe["hosts"] == []
    assert xxe["errors"] == [
        {
            "code": "dtd-forbidden",
            "element": "<!DOCTYPE>",
            "line": 2,
            "reason": "a DOCTYPE is not allowed in a manifest (it can declare entities: XXE, entity expansion)",
        }
    ]


def test_missing_file_is_a_finding(tmp_path: Path) -> None:
    code, out = run("--json", str(tmp_path / "nope.xml"), str(VALID[1]))
    assert code == 1
    nope, content = json.loads(out)
    assert nope["valid"] is False and nope["errors"][0]["code"] == "unreadable"
    assert content["valid"] is True


def test_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    big = tmp_path / "big.xml"
    big.write_bytes(b"<OfficeApp>" + b" " * (2 * 1024 * 1024) + b"</OfficeApp>")
    code, out = run("--json", str(big))
    assert code == 1
    assert json.loads(out)[0]["errors"][0]["code"] == "too-large"


def test_no_files_is_a_usage_error() -> None:
    code, out = run()
    assert code == 2 and "Missing argument" in out


def _command() -> list[str]:
    """The installed console script when there is one (as a user runs it), else the module."""
    script = Path(sys.executable).parent / "addin-server"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from server_stub.cli import main; main()"]


def test_real_subprocess() -> None:
    proc = subprocess.run(
        [
            *_command(),
            "manifest",
            "validate",
            "--json",
            *map(str, VALID),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert [r["type"] for r in json.loads(proc.stdout)] == ["TaskPaneApp", "ContentApp", "MailApp"]
    bad = subprocess.run(
        [
            *_command(),
            "manifest",
            "validate",
            str(FIXTURES / "billion_laughs.xml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "INVALID" in bad.stdout and "dtd-forbidden" in bad.stdout
