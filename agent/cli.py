"""`addin-agent`: the endpoint daemon and its troubleshooting commands."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Office add-in deployment agent."""
