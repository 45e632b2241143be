"""Pure core shared by agent, server and simulator: wire protocol, manifest rules. No I/O,
except `sqlite_tx` (the cancellation-safe transaction both sides open on their SQLite files)
and `tasks` (stopping and waiting without losing a cancellation)."""
