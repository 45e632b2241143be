"""Core shared by agent, server and simulator: wire protocol, manifest rules (pure, no I/O),
the reconnect policy, and the two small OS-facing helpers both tools use: the one-daemon
lock (`instance_lock`) and the command-line conventions (`cli_support`)."""
