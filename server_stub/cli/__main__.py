"""`python -m server_stub.cli` runs the `addin-server` command."""

from server_stub.cli import main

main()
