"""Names the dead-code check (vulture, run by scripts/test.sh) must not report.

Each one is used where vulture cannot see it. Framework-used names (click commands, FastAPI
routes, pydantic settings and validators, worker commands dispatched by name) are excluded by
decorator or name pattern in pyproject.toml's [tool.vulture] instead.
"""

# ruff: noqa: B018, F821
# mypy: ignore-errors

# -- Part of a data shape: a parsed manifest's fields, enum members, wire fields -------------
_.TASKPANE
_.CONTENT
_.provider_name
_.default_locale
_.source_locations
_.store_asset_id
_.removed_from_catalog

# -- Counters and helpers the test suite reads -------------------------------------------------
_.commits  # UnitOfWork: transactions committed (tests/test_group_commit.py)
_.resent  # simulator: commands the coordinator published again
_.resyncs  # agent anti-entropy
_.taken_over  # agent transport and server publisher: session taken over by a second instance
_.republished_all
_.connections
_.everything  # Filters.everything: the whole tenant, used by tests that watch every topic

# Console scripts (pyproject.toml [project.scripts]).
_.sim  # addin_runtime/entry_points.py: `addin-sim`
_.server  # addin_runtime/entry_points.py: `addin-server`

# -- Set for a library -------------------------------------------------------------------------
_.SessionExpiryInterval  # paho MQTT v5 connect property
_.pending_calls_threshold  # paho's queue warning threshold
_.on_socket_open  # paho callbacks the bare fan-out's PahoShard sets (simulator/baseline.py)
_.on_socket_close
_.on_socket_register_write
_.on_socket_unregister_write
_.on_subscribe
_.obj  # click context object

# -- To be removed by the structure work (dead code in agent/, server_stub/, addin_core/ that
# -- other branches delete; drop these lines when they are gone) -------------------------------
_.is_escalation  # addin_core/permissions.py: only the tests call it

# Read through tests or by readers of the cache, not by the program itself.
_.has_direct_delivery  # addin_runtime/mqtt.py: the adapter's probe, pinned by its tests
_.resolved_at  # agent/readmodel.py: a column of the entitlements record

# -- The NATS cluster harness: used by tests/test_nats_cluster.py and bench/bench_brokers.py --
_.free_nodes
_.node_arg
_.write_open_cluster
_.mqtt_url

# -- `addin-sim compare`'s figures, read by name (`MEDIAN_FIGURES`, the table's cells) --------
_.cpu_us_per_client
_.kb_per_client
_.notified_p99_ms
_.cached_p99_ms
_.floor_p99_ms
_.download_p99_ms
_.cached_ratio
_.download_notify_p99_ms  # RunFigures: read by name (MEDIAN_FIGURES, rows)
_.download_notify_ratio
