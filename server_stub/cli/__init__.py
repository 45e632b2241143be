"""`addin-server`: the deployment service's command line.

`serve` runs the HTTP API and the publisher. Every other subcommand works on the SQLite
file directly (``--db`` or ``ADDIN_SERVER_DB``), so it works with or without a running
server; a running server's publisher picks the change up within ~150 ms.

One module per command group: `serve`, `directory` (load, user, group, policy), `catalog`
(addin, store), `troubleshooting` (explain, status, broker-config), `bundle` (show), `manifests`
(export), `devices` (pki init, enroll, revoke, device list), `audit`, `rollouts` (rollout,
rollback), `config`/`apply`/`export`; `runner` is what they
share (which database, common options, one operation with one ``error:`` line on failure).
"""

from __future__ import annotations

import click

from addin_runtime.cli_support import Group
from server_stub.broker_cli import broker
from server_stub.cli.audit import audit
from server_stub.cli.bundle import bundle
from server_stub.cli.catalog import addin, store
from server_stub.cli.config_cmd import config_group
from server_stub.cli.declarative import apply_cmd, export_cmd
from server_stub.cli.devices import device, enroll, pki, revoke
from server_stub.cli.directory import group, load, policy, user
from server_stub.cli.directory_sync import directory_group
from server_stub.cli.manifests import manifests
from server_stub.cli.rollouts import rollback, rollout
from server_stub.cli.runner import db_option
from server_stub.cli.serve import serve
from server_stub.cli.troubleshooting import broker_config, explain, status
from server_stub.manifest_cli import manifest


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@db_option
def main() -> None:
    """Deployment service stub: directory, catalog, assignments, publication."""


for _command in (manifest, manifests, broker, serve, load, user, group, policy, addin, store,
                 explain, status, broker_config, pki, enroll, revoke, device, bundle, rollout,
                 rollback, config_group, apply_cmd, export_cmd, audit, directory_group):  # fmt: skip
    main.add_command(_command)
