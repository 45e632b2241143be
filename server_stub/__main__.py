"""`python -m server_stub` runs the `addin-server` command."""

from server_stub.cli import main

main()
