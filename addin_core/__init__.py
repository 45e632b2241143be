"""The pure core shared by agent, server and simulator: the wire protocol, manifest rules,
versions, permissions and the entitlement digest. No I/O: no sockets, files, clock or tasks
(those live in `addin_runtime`)."""
