"""`addin-server`: the deployment service's command line."""

from __future__ import annotations

import click

from server_stub.manifest_cli import manifest


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deployment service stub: directory, catalog, assignments, publication."""


main.add_command(manifest)
