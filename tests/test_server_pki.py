"""`addin-server pki init`, `enroll`, `revoke`, `device list`, `broker-config --pki` and the
start checks of `serve`, run as real commands on real files: what they write parses,
chains to the tenant's CA and is private; what they refuse is one line."""

from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulator.mosquitto import free_port

TIMEOUT = 60


def addin_server(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_SERVER_")}
    env["ADDIN_SERVER_DB"] = "server.db"
    return subprocess.run(
        [sys.executable, "-m", "server_stub", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def one_error_line(r: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    assert r.returncode != 0, r.stdout + r.stderr
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(c: x509.Certificate) -> str:
    return str(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def eku(c: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def same_key(c: x509.Certificate, key_pem: bytes) -> bool:
    key = serialization.load_pem_private_key(key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return bool(key.public_key().public_numbers() == c.public_key().public_numbers())  # type: ignore[union-attr]


@pytest.fixture
def enrolled(tmp_path: Path) -> Path:
    """A PKI in tmp/pki, users ann and bob, ann-laptop enrolled; the folder."""
    ok(addin_server("pki", "init", "pki", "--tenant", "contoso", cwd=tmp_path))
    ok(addin_server("user", "add", "ann", "--tenant", "contoso", cwd=tmp_path))
    ok(addin_server("user", "add", "bob", cwd=tmp_path))
    ok(addin_server("enroll", "--user", "ann", "--device", "ann-laptop", "--pki", "pki",
                    "-o", "ann.toml", cwd=tmp_path))  # fmt: skip
    return tmp_path


def test_pki_init_writes_a_ca_and_certificates_that_chain_to_it(tmp_path: Path) -> None:
    out = ok(
        addin_server("pki", "init", "pki", "--tenant", "contoso", "--host", "broker.contoso.test",
                     "--host", "10.0.0.5", cwd=tmp_path)
    )  # fmt: skip
    pki = tmp_path / "pki"
    assert "wrote pki/ca.key (0600)" in out and "wrote pki/pki.json (0644)" in out
    assert pki.stat().st_mode & 0o777 == 0o700
    for key in ("ca.key", "broker.key", "server.key", "server-client.key", "signing.key"):
        assert (pki / key).stat().st_mode & 0o777 == 0o600, key
    ca = cert(pki / "ca.crt")
    assert cn(ca) == "addin-deploy contoso CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    ca.verify_directly_issued_by(ca)
    for name, usage in (
        ("broker", ExtendedKeyUsageOID.SERVER_AUTH),
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("server-client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        c = cert(pki / f"{name}.crt")
        c.verify_directly_issued_by(ca)  # raises unless the CA signed it
        assert eku(c) == [usage]
        assert same_key(c, (pki / f"{name}.key").read_bytes())
    assert cn(cert(pki / "server-client.crt")) == "addin-server-contoso"
    sans = cert(pki / "broker.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.DNSName) == ["broker.contoso.test"]
    assert [str(ip) for ip in sans.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    signing = serialization.load_pem_private_key((pki / "signing.key").read_bytes(), None)
    assert isinstance(signing, ed25519.Ed25519PrivateKey)
    raw = base64.b64decode((pki / "signing.pub").read_text().strip())
    assert raw == signing.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    crl = x509.load_pem_x509_crl((pki / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca.public_key()) and len(crl) == 0  # type: ignore[arg-type]
    assert (pki / "pki.json").read_text().count("broker.contoso.test") == 1

    before = {p.name: p.read_bytes() for p in pki.iterdir()}
    line = one_error_line(addin_server("pki", "init", "pki", "--tenant", "contoso", cwd=tmp_path), 1)
    assert "already holds a CA" in line
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == before
    line = one_error_line(
        addin_server("pki", "init", "p2", "--tenant", "contoso", "--host", "a b", cwd=tmp_path), 2
    )
    assert "'a b'" in line and not (tmp_path / "p2").exists()


def test_enroll_writes_a_private_bundle_whose_certificate_is_the_devices(enrolled: Path) -> None:
    bundle = enrolled / "ann.toml"
    assert bundle.stat().st_mode & 0o777 == 0o600
    cfg = tomllib.loads(bundle.read_text())
    assert {k: cfg[k] for k in ("tenant", "user_id", "client_id", "insecure")} == {
        "tenant": "contoso", "user_id": "ann", "client_id": "ann-laptop", "insecure": False,
    }  # fmt: skip
    assert cfg["broker_url"] == "mqtts://localhost:8883"
    assert cfg["server_url"] == "https://localhost:8443"
    assert cfg["signing_key"] == (enrolled / "pki" / "signing.pub").read_text().strip()
    assert cfg["tls_ca"] == (enrolled / "pki" / "ca.crt").read_text()
    device = x509.load_pem_x509_certificate(cfg["tls_cert"].encode())
    device.verify_directly_issued_by(cert(enrolled / "pki" / "ca.crt"))
    assert cn(device) == "ann-laptop" and eku(device) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert same_key(device, cfg["tls_key"].encode())
    with sqlite3.connect(enrolled / "server.db") as db:
        rows = db.execute("SELECT device_id, user_id, cert_serial, token_sha256, revoked_at "
                          "FROM devices").fetchall()  # fmt: skip
    token_sha = hashlib.sha256(cfg["server_token"].encode()).hexdigest()
    assert rows == [("ann-laptop", "ann", format(device.serial_number, "x"), token_sha, None)]
    assert cfg["server_token"] not in (enrolled / "server.db").read_bytes().decode(errors="replace")


def test_enroll_refuses_in_one_line_and_replace_revokes_the_old_certificate(
    enrolled: Path,
) -> None:
    t = enrolled
    enroll = ("enroll", "--pki", "pki")
    line = one_error_line(addin_server(*enroll, "--user", "ann", "--device", "ann-laptop",
                                       "-o", "again.toml", cwd=t), 1)  # fmt: skip
    assert "already enrolled" in line and "--replace" in line
    line = one_error_line(addin_server(*enroll, "--user", "zed", "--device", "z1", cwd=t), 2)
    assert "unknown user 'zed'" in line
    line = one_error_line(
        addin_server(*enroll, "--user", "ann", "--device", "addin-server-contoso", cwd=t), 2
    )
    assert "reserved" in line
    line = one_error_line(addin_server(*enroll, "--user", "ann", "--device", "a/b", cwd=t), 2)
    assert "invalid device id" in line
    assert not (t / "again.toml").exists() and not (t / "z1.agent.toml").exists()

    old = cert_of(t / "ann.toml")
    out = ok(addin_server(*enroll, "--user", "ann", "--device", "ann-laptop", "--replace",
                          "-o", "ann.toml", cwd=t))  # fmt: skip
    new = cert_of(t / "ann.toml")
    assert new.serial_number != old.serial_number
    assert f"revoked its previous certificate (serial {old.serial_number:x})" in out
    crl = x509.load_pem_x509_crl((t / "pki" / "crl.pem").read_bytes())
    assert [r.serial_number for r in crl] == [old.serial_number]

    out = ok(addin_server("revoke", "ann-laptop", "--pki", "pki", cwd=t))
    assert "device ann-laptop (user ann) revoked" in out and "warning: no --broker-dir" in out
    crl = x509.load_pem_x509_crl((t / "pki" / "crl.pem").read_bytes())
    assert sorted(r.serial_number for r in crl) == sorted([old.serial_number, new.serial_number])
    assert crl.is_signature_valid(cert(t / "pki" / "ca.crt").public_key())  # type: ignore[arg-type]
    # A revoked device id is enrolled again only with --replace.
    line = one_error_line(addin_server(*enroll, "--user", "ann", "--device", "ann-laptop",
                                       "-o", "x.toml", cwd=t), 1)  # fmt: skip
    assert "already revoked" in line
    out = ok(addin_server(*enroll, "--user", "ann", "--device", "ann-laptop", "--replace",
                          "-o", "x.toml", cwd=t))  # fmt: skip
    assert "warning: ann-laptop was revoked: a broker connection its old certificate" in out
    again = cert_of(t / "x.toml")
    crl = x509.load_pem_x509_crl((t / "pki" / "crl.pem").read_bytes())
    assert again.serial_number not in [r.serial_number for r in crl] and len(crl) == 2
    line = one_error_line(addin_server("revoke", "nope", "--pki", "pki", cwd=t), 2)
    assert "no enrolled device 'nope'" in line
    table = ok(addin_server("device", "list", cwd=t)).splitlines()
    assert table[0].split() == ["DEVICE", "USER", "ENROLLED", "(UTC)", "REVOKED", "(UTC)"]
    assert table[1].split()[:2] == ["ann-laptop", "ann"] and table[1].split()[-1] == "-"
    ok(addin_server("revoke", "ann-laptop", "--pki", "pki", cwd=t))
    row = ok(addin_server("device", "list", cwd=t)).splitlines()[1].split()
    assert row[0] == "ann-laptop" and row[-1] != "-"


def cert_of(bundle: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(tomllib.loads(bundle.read_text())["tls_cert"].encode())


def test_broker_config_with_pki_writes_one_block_per_unrevoked_device(enrolled: Path) -> None:
    t = enrolled
    ok(addin_server("enroll", "--user", "bob", "--device", "bob-pc", "--pki", "pki", cwd=t))
    out = ok(addin_server("broker-config", "broker", "--pki", "pki", cwd=t))
    assert "2 enrolled devices" in out
    acl = (t / "broker" / "acl").read_text()
    assert not [line for line in acl.splitlines() if line.startswith("pattern")]
    assert "user ann-laptop\n" in acl and "user bob-pc\n" in acl
    assert "topic read addins/v1/contoso/member/ann\n" in acl
    assert "topic write addins/v1/contoso/report/bob-pc\n" in acl
    assert "user addin-server-contoso\ntopic readwrite addins/v1/contoso/#\n" in acl
    assert (t / "broker" / "broker.key").stat().st_mode & 0o777 == 0o600
    out = ok(addin_server("revoke", "bob-pc", "--pki", "pki", "--broker-dir", "broker", cwd=t))
    assert "no broker pid file" in out  # no broker runs: says how to reload it
    acl = (t / "broker" / "acl").read_text()
    assert "bob-pc" not in acl and "user ann-laptop\n" in acl
    assert (t / "broker" / "crl.pem").read_bytes() == (t / "pki" / "crl.pem").read_bytes()
    line = one_error_line(addin_server("broker-config", "broker", cwd=t), 1)
    assert "holds a TLS broker configuration" in line


def serve(tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return addin_server(
        "serve", "--tenant", "contoso", "--listen", f"127.0.0.1:{free_port()}",
        "--admin-token", "adm", *extra, cwd=tmp,
    )  # fmt: skip


def test_serve_is_secure_unless_told_otherwise(tmp_path: Path) -> None:
    broker = f"mqtt://127.0.0.1:{free_port()}"
    line = one_error_line(serve(tmp_path, "--broker", broker), 2)
    assert "--pki DIR" in line and "--insecure" in line
    line = one_error_line(serve(tmp_path, "--broker", broker, "--agent-token", "agt"), 2)
    assert "serve needs --pki" in line
    ok(addin_server("pki", "init", "pki", "--tenant", "contoso", cwd=tmp_path))
    line = one_error_line(serve(tmp_path, "--broker", broker, "--pki", "pki"), 2)
    assert "must look like mqtts://HOST:PORT" in line
    tls = f"mqtts://127.0.0.1:{free_port()}"
    line = one_error_line(serve(tmp_path, "--broker", tls, "--pki", "pki", "--agent-token", "a"), 2)
    assert "--agent-token is accepted only with --insecure" in line
    line = one_error_line(serve(tmp_path, "--broker", tls, "--pki", "pki", "--insecure"), 2)
    assert "exclude each other" in line
    line = one_error_line(serve(tmp_path, "--broker", tls, "--pki", "nowhere"), 2)
    assert "no PKI folder nowhere" in line
    assert not (tmp_path / "server.db").exists()
