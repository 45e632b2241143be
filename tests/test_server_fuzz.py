"""The admin API fuzzed with schemathesis against its own OpenAPI schema: never a 5xx.

Runs against `addin-server serve` as a real process on 127.0.0.1 with a real broker.
Bounded: a dozen examples per operation (a few hundred requests in all).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from server_helpers import TASKPANE_V1
from test_server_serve import ADMIN, Server, cli

from simulator.mosquitto import MosquittoBroker


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    broker = MosquittoBroker(tmp / "broker")
    broker.start()
    db = tmp / "server.db"
    # Some real state, so generated ids sometimes hit existing rows.
    cli(db, "user", "add", "ann", "--tenant", "contoso")
    cli(db, "group", "add", "sales")
    cli(db, "addin", "add", str(TASKPANE_V1))
    server = Server(str(db), broker, tmp)
    try:
        server.wait_ready()
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    finally:
        server.stop()
        broker.kill()


def test_api_never_answers_5xx(api_schema: Any) -> None:
    # Plain hypothesis over each operation's strategy (schemathesis' pytest plugin does not
    # work with the pytest version here).
    operations = [r.ok() for r in api_schema.get_all_operations()]
    assert len(operations) >= 25
    calls = 0
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            nonlocal calls
            calls += 1
            response = case.call(headers=ADMIN, timeout=10)
            assert response.status_code < 500, (case.method, case.formatted_path, response.text)

        run()
    assert calls >= len(operations)


def test_openapi_lists_every_admin_route(api_schema: Any) -> None:
    paths = set(api_schema.raw_schema["paths"])
    for p in (
        "/v1/users",
        "/v1/groups/{group_id}/members/{user_id}",
        "/v1/groups/{child}/parents/{parent}",
        "/v1/addins",
        "/v1/addins/store",
        "/v1/store/{asset_id}/publish",
        "/v1/addins/{addin_id}/assign",
        "/v1/policy",
        "/v1/org",
        "/v1/explain",
        "/v1/status",
        "/v1/manifests/{sha256}",
    ):
        assert p in paths
