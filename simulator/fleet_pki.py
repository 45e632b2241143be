"""The PKI of a `addin-sim run --tls`: the run's own tenant CA (`server_stub.pki`), the
broker's TLS files and ACL (`server_stub.broker_config`), and one enrolled device per
virtual client — its certificate and key in the run's folder, its HTTP token, its row in the
server's `devices` table — so each agent connects as a workstation enrolled with
`addin-server enroll` does.

What `enroll` does per device is done here for the whole fleet at once: certificates are
issued in this process (about 0.2 ms each, not a CLI process each), the ACL is written once,
and the devices are recorded in one transaction (`Devices.enroll_many`).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

from server_stub import pki
from server_stub.broker_config import write_tls_broker_config
from server_stub.service.devices import token_hash


class FleetPki:
    """The run's CA and its devices: `make` before the broker starts, `enroll` once the
    server holds the organisation's users."""

    def __init__(self, workdir: Path, tenant: str) -> None:
        self.directory = workdir / "pki"
        self.devices_dir = workdir / "devices"
        self.tenant = tenant
        self.tokens: dict[str, str] = {}
        """Device id -> its HTTP token (only the hash goes to the server)."""
        self._rows: list[tuple[str, str, str, str]] = []
        self.signing_public = ""

    @property
    def ca_file(self) -> Path:
        return self.directory / pki.CA_CERT

    def cert_file(self, device_id: str) -> Path:
        return self.devices_dir / f"{device_id}.crt"

    def key_file(self, device_id: str) -> Path:
        return self.devices_dir / f"{device_id}.key"

    def make(self, clients: Sequence[tuple[str, str]]) -> None:
        """The CA, and a certificate and token for every (client id, user id): the client
        id is the device id (the certificate's CN, hence its MQTT username and client id)."""
        pki.init_pki(self.directory, self.tenant)
        p = pki.open_pki(self.directory)
        self.signing_public = p.signing_public()
        self.devices_dir.mkdir(mode=0o700)
        for client_id, user_id in clients:
            cert = p.issue_device(client_id)
            self.cert_file(client_id).write_text(cert.cert_pem)
            fd = os.open(self.key_file(client_id), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(cert.key_pem)
            token = secrets.token_urlsafe(32)
            self.tokens[client_id] = token
            self._rows.append((user_id, client_id, cert.serial, token_hash(token)))

    def write_broker(self, broker_dir: Path) -> None:
        """The broker's certificate, key, CA, CRL and the ACL with every device's block."""
        devices = [(device, user) for user, device, _, _ in self._rows]
        write_tls_broker_config(broker_dir, self.directory, self.tenant, devices)

    async def enroll(self, db_path: Path) -> int:
        """Record every device in the server's database, in one transaction (the running
        server reads devices per request, so they count at once)."""
        from server_stub.cli.runner import open_service

        service = await open_service(db_path, self.tenant)
        try:
            return await service.devices.enroll_many(self._rows, time.time())
        finally:
            await service.close()
