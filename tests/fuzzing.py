"""Budgets for the fuzz tests (tests/test_fuzz_*.py).

In CI each fuzz target runs one hypothesis round of `FUZZ_CI_EXAMPLES` examples (a few
seconds). `scripts/fuzz.sh` sets ``FUZZ_SECONDS``: each target then runs rounds of
`FUZZ_LONG_EXAMPLES` fresh random examples until that many seconds have passed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from hypothesis import HealthCheck, settings

FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "0") or 0)
FUZZ_CI_EXAMPLES = int(os.environ.get("FUZZ_CI_EXAMPLES", "150"))
FUZZ_LONG_EXAMPLES = 2000

settings.register_profile(
    "fuzz-ci",
    max_examples=FUZZ_CI_EXAMPLES,
    deadline=None,
    database=None,  # no example database in the tree; a failure prints its reproducer
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "fuzz-long", settings.get_profile("fuzz-ci"), max_examples=FUZZ_LONG_EXAMPLES
)


def fuzz_settings() -> settings:
    """The hypothesis settings of a fuzz target (apply with ``@fuzz_settings()``)."""
    return settings.get_profile("fuzz-long" if FUZZ_SECONDS > 0 else "fuzz-ci")


def run(target: Callable[[], None]) -> int:
    """Run the @given `target` once, or again and again until FUZZ_SECONDS are spent.
    Returns the number of rounds (each round draws new random examples)."""
    start = time.monotonic()
    rounds = 0
    while True:
        target()
        rounds += 1
        if time.monotonic() >= start + FUZZ_SECONDS:
            break
    if FUZZ_SECONDS > 0:  # scripts/fuzz.sh shows this (pytest -s)
        name = sys._getframe(1).f_code.co_name  # the test that called run()
        print(
            f"\n{name}: {rounds} rounds x up to {FUZZ_LONG_EXAMPLES} examples "
            f"in {time.monotonic() - start:.0f}s"
        )
    return rounds
