"""A throwaway PKI for tests: a CA, a broker/server certificate for the loopback names and
device certificates, made with `cryptography` in a temporary folder, and a Mosquitto TLS
listener configured from them. Test-only: production certificates come from
`addin-server pki init` / `enroll`."""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import ipaddress
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> str:
        return key_pem(self.key)

    def write(self, folder: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.crt`` and ``stem.key`` (0600) into `folder`."""
        crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
        crt.write_text(self.cert_pem)
        key.touch(mode=0o600)
        key.write_text(self.key_pem)
        return crt, key


class TestCA:
    """A CA that issues server and client certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "addin-deploy test CA") -> None:
        self.key = _key()
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    def _issue(
        self,
        cn: str,
        usage: x509.ObjectIdentifier,
        sans: tuple[str, ...] = (),
        days: float = 365,
    ) -> Issued:
        key = _key()
        now = dt.datetime.now(dt.UTC)
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            names: list[x509.GeneralName] = []
            for s in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(s)))
                except ValueError:
                    names.append(x509.DNSName(s))
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(b.sign(self.key, hashes.SHA256()), key)

    def server(self, cn: str = "broker", sans: tuple[str, ...] = LOOPBACK_NAMES) -> Issued:
        return self._issue(cn, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def device(self, device_id: str, days: float = 365) -> Issued:
        return self._issue(device_id, ExtendedKeyUsageOID.CLIENT_AUTH, days=days)


def signing_pub() -> str:
    """base64 of a fresh raw Ed25519 public key (what `signing_key` holds)."""
    raw = (
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode()


def mosquitto_tls_config(ca: TestCA, folder: Path) -> str:
    """Lines for `MosquittoBroker(extra_config=...)`: its listener speaks TLS only, with a
    certificate from `ca` for the loopback names, and wants a client certificate from `ca`
    whose CN becomes the username."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_text(ca.cert_pem)
    crt, key = ca.server().write(folder, "broker")
    return "\n".join(
        [
            f"cafile {folder / 'ca.crt'}",
            f"certfile {crt}",
            f"keyfile {key}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",  # the client id is bound to the certificate
            "connection_messages true",
        ]
    )


def client_context(ca: TestCA, me: Issued, folder: Path) -> ssl.SSLContext:
    """A client context trusting `ca` and presenting `me` (e.g. the test's publisher)."""
    folder.mkdir(parents=True, exist_ok=True)
    ctx = ssl.create_default_context(cadata=ca.cert_pem)
    crt, key = me.write(folder, "client")
    ctx.load_cert_chain(crt, key)
    return ctx


class HttpsServer:
    """A minimal HTTPS server on a free loopback port, in a thread: GET answers from
    `routes` (path -> (status, body)), every request path and Authorization header is
    recorded, and refused handshakes are counted instead of printed."""

    def __init__(self, cert: Issued, folder: Path, routes: dict[str, tuple[int, bytes]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        crt, key = cert.write(folder, "server")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(crt, key)
        self.routes = routes
        self.requests: list[tuple[str, str | None]] = []
        self.refused = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                status, body = outer.routes.get(self.path, (404, b'{"detail": "not found"}'))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                # The handshake runs in accept(): a client refusing our certificate ends here.
                try:
                    return super().get_request()
                except OSError:
                    outer.refused += 1
                    raise

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = int(self.httpd.server_address[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)
