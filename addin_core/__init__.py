"""Core shared by agent, server and simulator: wire protocol, manifest rules (pure, no I/O),
the reconnect policy, and small OS-facing helpers both tools use: the one-daemon lock
(`instance_lock`), the command-line conventions (`cli_support`), the cancellation-safe SQLite
transaction (`sqlite_tx`) and stopping tasks without losing a cancellation (`tasks`)."""
