"""`addin-sim`: fleet simulator."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run thousands of virtual agents against a real broker and server."""
