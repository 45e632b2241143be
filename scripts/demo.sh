#!/usr/bin/env bash
# The main job: a 1,000-client simulated phased rollout against a private Mosquitto and the
# server stub, every client checked against the independent oracle. Report in sim-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/addin-sim run "$@"
