"""The tenant's PKI directory: its CA, the TLS certificates of the broker and of the HTTPS
server, the server's MQTT client certificate, the Ed25519 key that signs state payloads,
the CRL; and the device certificates issued from it at enrollment.

Certificates are ECDSA P-256 (`cryptography`), private keys unencrypted PKCS8 PEM in mode
0600: Mosquitto and uvicorn read them at start, unattended. Whoever can read the directory
can issue certificates for the tenant, so it stays 0700 on the admin's host.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from addin_core.protocol import check_id, server_identity

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CA_DAYS = 3650
"""The CA lives ten years; so does the CRL's next-update (see `write_crl`)."""
LEAF_DAYS = 1825
"""Broker, server and device certificates: five years (re-enroll with --replace to renew)."""

CA_CERT, CA_KEY = "ca.crt", "ca.key"
BROKER_CERT, BROKER_KEY = "broker.crt", "broker.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "server-client.crt", "server-client.key"
SIGNING_KEY, SIGNING_PUB = "signing.key", "signing.pub"
CRL, INFO = "crl.pem", "pki.json"
FILES = (CA_CERT, CA_KEY, BROKER_CERT, BROKER_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT,
         CLIENT_KEY, SIGNING_KEY, SIGNING_PUB, CRL, INFO)  # fmt: skip


class PkiError(RuntimeError):
    """The PKI directory cannot be made or used; the message says why and what to do."""


@dataclass(frozen=True)
class DeviceCert:
    cert_pem: str
    key_pem: str
    serial: str
    """Lowercase hex, as stored in the `devices` table and shown by `device list`."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def _sans(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def check_host(host: str) -> str:
    """A --host value: an IP address or a DNS name (ValueError saying why not)."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(
        label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
        and not label.startswith("-") and not label.endswith("-")
        for label in labels
    ):  # fmt: skip
        raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")
    return host


def _usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs only; a leaf signs its TLS handshakes only."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class _Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def issue(
        self,
        cn: str,
        usage: x509.ObjectIdentifier,
        public_key: ec.EllipticCurvePublicKey,
        hosts: Sequence[str] = (),
    ) -> x509.Certificate:
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little behind
            .not_valid_after(
                min(now + datetime.timedelta(days=LEAF_DAYS), self.cert.not_valid_after_utc)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(ca=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if hosts:
            builder = builder.add_extension(_sans(hosts), critical=False)
        return builder.sign(self.key, hashes.SHA256())


def _new_ca(tenant: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = _now()
    name = _name(f"addin-deploy {tenant} CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _write(path: Path, data: bytes, mode: int) -> None:
    """Written whole under a temporary name and renamed: a reader never sees half a file,
    and a private key is never readable by others, not even for a moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def init_pki(directory: Path, tenant: str, hosts: Sequence[str] = ()) -> list[Path]:
    """Make the tenant's PKI in `directory` (created 0700); the files written, in order.

    Refuses a directory that already holds a CA: a second CA would orphan every device
    certificate issued from the first."""
    check_id(tenant, "tenant id")
    hosts = list(dict.fromkeys(check_host(h) for h in hosts)) or list(DEFAULT_HOSTS)
    if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
        raise PkiError(
            f"{directory} already holds a CA ({CA_CERT}); refusing to overwrite it: every "
            "device enrolled with it would be cut off. Use another folder"
        )
    if directory.exists() and not directory.is_dir():
        raise PkiError(f"{directory} exists and is not a folder")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    ca_cert, ca_key = _new_ca(tenant)
    ca = _Issuer(ca_cert, ca_key)
    written: list[Path] = []

    def put(name: str, data: bytes, mode: int = 0o644) -> None:
        _write(directory / name, data, mode)
        written.append(directory / name)

    put(CA_KEY, _key_pem(ca_key), 0o600)
    put(CA_CERT, _cert_pem(ca_cert))
    server_auth, client_auth = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH
    for cert_name, key_name, cn, usage, sans in (
        (BROKER_CERT, BROKER_KEY, f"addin-deploy {tenant} broker", server_auth, hosts),
        (SERVER_CERT, SERVER_KEY, f"addin-deploy {tenant} server", server_auth, hosts),
        (CLIENT_CERT, CLIENT_KEY, server_identity(tenant), client_auth, []),
    ):
        key = _key()
        put(key_name, _key_pem(key), 0o600)
        put(cert_name, _cert_pem(ca.issue(cn, usage, key.public_key(), sans)))
    signing = ed25519.Ed25519PrivateKey.generate()
    raw = signing.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    put(SIGNING_KEY, _key_pem(signing), 0o600)
    put(SIGNING_PUB, base64.b64encode(raw) + b"\n")
    put(CRL, write_crl_bytes(ca, []))
    put(INFO, (json.dumps({"tenant": tenant, "hosts": hosts}, indent=2) + "\n").encode())
    return written


@dataclass(frozen=True)
class Pki:
    """A PKI directory made by `init_pki`, opened for use."""

    directory: Path
    tenant: str
    hosts: list[str]

    def path(self, name: str) -> Path:
        return self.directory / name

    def _issuer(self) -> _Issuer:
        try:
            cert = x509.load_pem_x509_certificate(self.path(CA_CERT).read_bytes())
            key = serialization.load_pem_private_key(self.path(CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as e:
            raise PkiError(f"cannot read the CA of {self.directory}: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.path(CA_KEY)} is not an ECDSA key")
        return _Issuer(cert, key)

    def signing_public(self) -> str:
        """The base64 raw Ed25519 public key agents verify state with."""
        try:
            return self.path(SIGNING_PUB).read_text().strip()
        except OSError as e:
            raise PkiError(f"cannot read {self.path(SIGNING_PUB)}: {e.strerror or e}") from None

    def issue_device(self, device_id: str) -> DeviceCert:
        """A client certificate for `device_id` (its CN: the broker's username for it)."""
        key = _key()
        cert = self._issuer().issue(device_id, ExtendedKeyUsageOID.CLIENT_AUTH, key.public_key())
        return DeviceCert(
            _cert_pem(cert).decode(), _key_pem(key).decode(), serial_hex(cert.serial_number)
        )

    def write_crl(self, serials: Iterable[tuple[str, float]]) -> Path:
        """Rewrite crl.pem listing every (hex serial, revoked at) given."""
        _write(self.path(CRL), write_crl_bytes(self._issuer(), serials), 0o644)
        return self.path(CRL)


def write_crl_bytes(ca: _Issuer, serials: Iterable[tuple[str, float]]) -> bytes:
    """A CRL of `serials`, signed by the CA. Its next-update is the CA's own expiry: an
    expired CRL makes OpenSSL refuse every client certificate ("CRL has expired"), and
    nothing here republishes it on a schedule; a revocation rewrites it."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(ca.cert.not_valid_after_utc)
    )
    for serial, at in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(serial, 16))
            .revocation_date(datetime.datetime.fromtimestamp(at, datetime.UTC))
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def open_pki(directory: Path) -> Pki:
    """The PKI directory made by `addin-server pki init`; PkiError saying what is missing."""
    info_path = directory / INFO
    if not directory.is_dir():
        raise PkiError(
            f"no PKI folder {directory}: run `addin-server pki init {directory} --tenant T`"
        )
    try:
        info = json.loads(info_path.read_text())
        tenant, hosts = str(info["tenant"]), [str(h) for h in info["hosts"]]
    except FileNotFoundError:
        raise PkiError(
            f"{directory} is not a PKI folder (no {INFO}): run "
            f"`addin-server pki init {directory} --tenant T`"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PkiError(f"{info_path} cannot be read: {e}") from None
    missing = [n for n in FILES if not (directory / n).is_file()]
    if missing:
        raise PkiError(f"{directory} lacks {', '.join(missing)}; it is not a whole PKI folder")
    return Pki(directory, tenant, hosts)
