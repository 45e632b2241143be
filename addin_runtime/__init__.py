"""The OS-facing helpers the agent, the server and the simulator share — kept out of
`addin_core`, which stays pure (no sockets, files, clock or tasks):

- `sqlite_tx`: the cancellation-safe SQLite transaction both sides write through;
- `instance_lock`: one daemon per state file (agent cache, server database);
- `tasks`: stopping a task and waiting for it without losing a cancellation;
- `reconnect`: the broker reconnect backoff and why a connection was lost;
- `mqtt`: the only reads of aiomqtt's and paho's private attributes, guarded;
- `stop_signals`: SIGTERM/SIGINT stop a daemon, with a fallback where the loop has no
  signal handlers (Windows);
- `entry_points`: `addin-server` and `addin-sim`, which name their extra when it is missing;
- `cli_support`: the command-line conventions of both tools (error lines, option positions).
"""
