"""Run the README's walk-through exactly as written, and fail on any command that fails.

The section "## Walk-through" of README.md is read as a reader would follow it:

* a fenced block whose info string names a file (```` ```toml file=agent.toml ````) is saved
  under that name in the shell's current directory at that point;
* in a ```` ```console ```` block, every ``$ `` line is a command (continued on the next
  lines while it ends in a backslash) and the lines after it are what it prints;
* any other block is not run.

The commands run in order in ONE bash (so ``cd``, ``export`` and ``&`` behave as they do for
a reader), started in the repository root with a private TMPDIR and without the caller's
``ADDIN_*`` variables. It stops at the first command whose status is not 0. A command ending
in ``&`` is a background process, which the walk-through stops itself: it must be gone within
STOP_WITHIN seconds of the end, with status 0 or killed by SIGTERM (anything else, such as a
crash half-way, fails the run), and whatever is left of it is killed.

    scripts/walkthrough.sh              # run it; exit status 1 on the first failure
    scripts/walkthrough.sh --update     # run it and write what each command printed into
                                        # README.md, in place of the outputs shown
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Walk-through"
MARK = "\x1e"
"""Starts the line the runner prints before each command, to cut the transcript apart."""
STOP_WITHIN = 30
RUN_WITHIN = 600
WIDTH = 100
"""Terminal width the commands' tables are drawn for (rich reads COLUMNS)."""


@dataclass
class Command:
    text: str
    """The command as bash runs it (continuation lines included)."""
    line: int
    """Index in README lines of its last line; its shown output follows."""
    output_end: int
    """Index of the first README line after its shown output."""
    shown: list[str] = field(default_factory=list)

    @property
    def background(self) -> bool:
        return self.text.rstrip().endswith("&") and not self.text.rstrip().endswith("&&")


@dataclass
class FileBlock:
    name: str
    body: str


Step = Command | FileBlock


def parse(readme: list[str]) -> list[Step]:
    """The walk-through's steps in reading order."""
    try:
        start = next(i for i, ln in enumerate(readme) if ln.startswith(SECTION))
    except StopIteration:
        raise SystemExit(f"README.md has no section starting with {SECTION!r}") from None
    end = next(
        (i for i in range(start + 1, len(readme)) if readme[i].startswith("## ")), len(readme)
    )
    steps: list[Step] = []
    i = start
    while i < end:
        opening = re.match(r"^```(\S*)(.*)$", readme[i])
        if not opening:
            i += 1
            continue
        close = next(j for j in range(i + 1, end) if readme[j].startswith("```"))
        body = readme[i + 1 : close]
        named = re.search(r"\bfile=(\S+)", opening.group(2))
        if named:
            steps.append(FileBlock(named.group(1), "".join(ln + "\n" for ln in body)))
        elif opening.group(1) == "console":
            steps.extend(_commands(body, i + 1))
        i = close + 1
    return steps


def _commands(body: list[str], first: int) -> list[Command]:
    out: list[Command] = []
    k = 0
    while k < len(body):
        if not body[k].startswith("$ "):
            if not out:
                raise SystemExit(f"README.md line {first + k + 1}: output before any command")
            out[-1].shown.append(body[k])
            out[-1].output_end = first + k + 1
            k += 1
            continue
        lines = [body[k][2:]]
        while lines[-1].endswith("\\") and k + 1 < len(body):
            k += 1
            lines.append(body[k])
        out.append(Command("\n".join(lines), first + k, first + k + 1))
        k += 1
    return out


def script(steps: list[Step]) -> str:
    """One bash script: each file written, each command preceded by its marker line."""
    out = [
        "set -eo pipefail",
        "exec 2>&1",
        "__walk_bg=()",
    ]
    for n, step in enumerate(steps):
        if isinstance(step, FileBlock):
            delimiter = "WALKTHROUGH_FILE_END"
            assert delimiter not in step.body
            out.append(f"cat > {shlex.quote(step.name)} <<'{delimiter}'\n{step.body}{delimiter}")
            continue
        out.append(f"printf '{MARK}%s\\n' {n}")
        out.append(step.text)
        if step.background:
            out.append("__walk_bg+=($!)")
            out.append(f"__walk_cmd[$!]={shlex.quote(step.text.splitlines()[0])}")
    # Every background process must have been running until the end and stop cleanly.
    out.append(f"printf '{MARK}end\\n'")
    out.append(
        f"""
__walk_failed=0
for pid in "${{__walk_bg[@]}}"; do
  for _ in $(seq {STOP_WITHIN * 10}); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "walkthrough: '${{__walk_cmd[$pid]}}' still runs {STOP_WITHIN} s after the end" >&2
    kill -9 "$pid"; __walk_failed=1
  fi
  status=0; wait "$pid" || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 143 ]; then
    echo "walkthrough: '${{__walk_cmd[$pid]}}' exited with status $status" >&2
    __walk_failed=1
  fi
done
exit $__walk_failed"""
    )
    return "\n".join(out) + "\n"


def run(steps: list[Step]) -> tuple[int, dict[str, str], str]:
    """Run the walk-through; (status, output per step index, full transcript)."""
    scratch = Path(tempfile.mkdtemp(prefix="walkthrough-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_")}
    env.update(TMPDIR=str(scratch), COLUMNS=str(WIDTH), LINES="50", TERM="dumb")
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.Popen(
        ["bash", "-c", script(steps)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        transcript, _ = proc.communicate(timeout=RUN_WITHIN)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        transcript, status = f"walkthrough: still running after {RUN_WITHIN} s\n", 1
    finally:
        # Whatever the walk-through left behind (it stops its own background processes;
        # this is for a failure half-way) goes with it.
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        shutil.rmtree(scratch, ignore_errors=True)
    # The walk-through works in a fresh `mktemp -d` folder; shown as "." so the README never
    # names a path of the machine it was run on.
    transcript = re.sub(re.escape(str(scratch)) + r"/tmp\.[A-Za-z0-9]+", ".", transcript)
    outputs: dict[str, str] = {}
    for piece in transcript.split(MARK)[1:]:
        key, _, text = piece.partition("\n")
        outputs[key] = text
    return status, outputs, transcript


def update(readme: list[str], steps: list[Step], outputs: dict[str, str]) -> list[str]:
    """README lines with each command's shown output replaced by what it printed."""
    new = list(readme)
    commands = [(n, s) for n, s in enumerate(steps) if isinstance(s, Command)]
    for n, cmd in reversed(commands):  # bottom up, so earlier line numbers stay valid
        printed = [ln.rstrip() for ln in outputs.get(str(n), "").splitlines()]
        new[cmd.line + 1 : cmd.output_end] = printed
    return new


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--update", action="store_true", help="write the outputs into README.md")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--print-script", action="store_true", help="print the bash script only")
    args = ap.parse_args()
    readme = args.readme.read_text().splitlines()
    steps = parse(readme)
    if args.print_script:
        sys.stdout.write(script(steps))
        return 0
    status, outputs, transcript = run(steps)
    sys.stdout.write(transcript.replace(MARK, "--- step "))
    if status != 0:
        failed = max((k for k in outputs if k.isdigit()), key=int, default=None)
        where = ""
        if failed is not None and "end" not in outputs:
            step = steps[int(failed)]
            assert isinstance(step, Command)
            where = f" at README.md line {step.line + 1}: $ {step.text}"
        print(f"walkthrough: FAILED (status {status}){where}", file=sys.stderr)
        return 1
    if args.update:
        args.readme.write_text("\n".join(update(readme, steps, outputs)) + "\n")
        print(f"walkthrough: ok; outputs written into {args.readme}", file=sys.stderr)
    else:
        print("walkthrough: ok", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
