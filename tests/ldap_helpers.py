"""A private OpenLDAP (`slapd`) for the directory sync tests: its own slapd.conf, schema from
the system's /etc/ldap/schema, data in a temporary folder, listening on a free loopback port
(never the system instance Debian's package may have configured); a test tree loaded with
ldap3; stopped (SIGTERM, then SIGKILL) at the end."""

from __future__ import annotations

import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import ldap3
import pytest

from simulator.mosquitto import free_port

SUFFIX = "dc=example,dc=org"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PW = "secret"
SCHEMA = Path("/etc/ldap/schema")
MODULES = Path("/usr/lib/ldap")
START_TIMEOUT = 15.0


def find_slapd() -> str:
    """The slapd binary, or a skip saying how to get it."""
    found = shutil.which("slapd") or (
        "/usr/sbin/slapd" if Path("/usr/sbin/slapd").exists() else None
    )
    if found is None or not (SCHEMA / "inetorgperson.schema").exists():
        pytest.skip(
            "slapd is missing: run scripts/bootstrap.sh as root, or "
            "sudo apt-get install -y slapd ldap-utils"
        )
    return found


class Slapd:
    """`tls`: (CA, certificate, key) files; slapd then listens on ldaps:// only, or with
    `starttls` on ldap:// offering StartTLS."""

    def __init__(
        self, workdir: Path, tls: tuple[Path, Path, Path] | None = None, starttls: bool = False
    ) -> None:
        self.binary = find_slapd()
        self.dir = workdir
        self.tls = tls
        self.starttls = starttls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "slapd.log"

    @property
    def url(self) -> str:
        return f"{'ldaps' if self.tls and not self.starttls else 'ldap'}://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "slapd.conf"
        schemas = "\n".join(
            f"include {SCHEMA / s}.schema" for s in ("core", "cosine", "inetorgperson", "nis")
        )
        modules = f"modulepath {MODULES}\nmoduleload back_mdb\n" if MODULES.is_dir() else ""
        if self.tls is not None:
            ca, cert, key = self.tls
            modules += (
                f"TLSCACertificateFile {ca}\nTLSCertificateFile {cert}\n"
                f"TLSCertificateKeyFile {key}\n"
            )
        conf.write_text(
            f"""{schemas}
pidfile {self.dir / "slapd.pid"}
argsfile {self.dir / "slapd.args"}
{modules}
database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {data}
"""
        )
        return conf

    def start(self) -> None:
        conf = self._config()
        with open(self.log, "ab") as log:
            # -d 0: stay in the foreground (this process owns it), log nothing extra.
            self.proc = subprocess.Popen(
                [self.binary, "-f", str(conf), "-h", f"{self.url}/", "-d", "0"],
                stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"slapd exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                self.connection().unbind()
                return
            except ldap3.core.exceptions.LDAPException:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(
            f"slapd did not answer within {START_TIMEOUT} s: {self.log.read_text()}"
        )

    def connection(self) -> ldap3.Connection:
        tls = (
            ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(self.tls[0]))
            if self.tls
            else None
        )
        bind = ldap3.AUTO_BIND_TLS_BEFORE_BIND if self.starttls else ldap3.AUTO_BIND_NO_TLS
        return ldap3.Connection(
            ldap3.Server(self.url, connect_timeout=5, get_info=ldap3.NONE, tls=tls),
            ROOT_DN, ROOT_PW, auto_bind=bind, raise_exceptions=True, receive_timeout=10,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def user(conn: ldap3.Connection, uid: str, name: str, ou: str = "people") -> str:
    dn = f"uid={uid},ou={ou},{SUFFIX}"
    conn.add(dn, ["inetOrgPerson"], {"cn": name, "sn": name.split()[-1], "displayName": name})
    return dn


def group(conn: ldap3.Connection, cn: str, members: list[str]) -> str:
    dn = f"cn={cn},ou=groups,{SUFFIX}"
    conn.add(dn, ["groupOfNames"], {"cn": cn, "member": members})
    return dn


def base_tree(conn: ldap3.Connection) -> None:
    conn.add(SUFFIX, ["dcObject", "organization"], {"dc": "example", "o": "Example"})
    for ou in ("people", "groups"):
        conn.add(f"ou={ou},{SUFFIX}", ["organizationalUnit"], {"ou": ou})
