"""`addin-server manifest ...`: check manifests with the same reader the server and agent use."""

from __future__ import annotations

import click


@click.group()
def manifest() -> None:
    """Office add-in manifest tools."""
