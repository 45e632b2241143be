"""Pure core shared by agent, server and simulator: wire protocol, manifest rules. No I/O."""
