#!/usr/bin/env bash
# Runs the README's walk-through as written, against real processes on loopback (a private
# Mosquitto on 127.0.0.1:18883, the server on 127.0.0.1:18080, one agent); exit status 1 on
# the first command that fails. `--update` writes what the commands printed into README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python scripts/walkthrough.py "$@"
