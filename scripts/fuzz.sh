#!/usr/bin/env bash
# Fuzz the manifest reader and the wire protocol for longer than CI does.
#
#   scripts/fuzz.sh                 # 60 seconds per fuzz target (14 targets)
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#
# Each target (tests/test_fuzz_*.py) runs rounds of 2000 fresh random hypothesis examples
# until FUZZ_SECONDS have passed. A failure prints the falsifying example and the
# `@reproduce_failure` blob to paste into the test. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || scripts/bootstrap.sh
export FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
echo "fuzzing: ${FUZZ_SECONDS}s per target"
exec .venv/bin/pytest -q -s -p no:cacheprovider tests/test_fuzz_manifest.py tests/test_fuzz_protocol.py "$@"
