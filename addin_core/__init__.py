"""The pure core shared by agent, server and simulator: the wire protocol, manifest rules,
versions, permissions, the entitlement digest, the topics that belong to a user and the
one-line form of a validation error. No I/O: no sockets, files, clock or tasks
(those live in `addin_runtime`)."""
