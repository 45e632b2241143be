"""The agent's TLS material: ``tls_ca``, ``tls_cert`` and ``tls_key`` read and checked.

Each value is either the PEM text itself (what `addin-server enroll` writes inline into the
agent.toml it hands out) or the path of a PEM file. Everything is parsed when the config is
loaded, so a truncated paste, a key with a passphrase or a certificate that does not belong
to the key is refused before the daemon starts, naming the field, instead of failing every
reconnect later with an OpenSSL message. Errors are ValueErrors whose text says what to write
instead (the config's validators turn them into its one-line-per-field errors).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config_file import PEM_BEGIN as PEM_BEGIN  # re-exported
from agent.config_file import is_inline as is_inline

if TYPE_CHECKING:
    # Imported where used: cryptography's Rust module is ~8.5 MB of RSS, which an agent
    # whose config has no TLS material (a lab) should not carry (docs/benchmarks.md).
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

MAX_PEM_BYTES = 256 * 1024
"""A CA bundle with a few hundred certificates fits; anything bigger is not TLS material."""
ED25519_KEY_BYTES = 32


def pem_bytes(value: str) -> bytes:
    """The PEM text a tls_* value stands for: itself when inline, else its file's bytes."""
    if is_inline(value):
        return value.strip().encode() + b"\n"
    path = Path(value).expanduser()
    try:
        data = path.read_bytes() if path.stat().st_size <= MAX_PEM_BYTES else None
    except FileNotFoundError:
        raise ValueError(
            f"file {value} does not exist: give the path of a PEM file or the PEM text "
            "itself (-----BEGIN ...)"
        ) from None
    except IsADirectoryError:
        raise ValueError(f"{value} is a directory: give the path of a PEM file") from None
    except OSError as e:
        raise ValueError(f"file {value} cannot be read: {e.strerror or e}") from None
    if data is None:
        raise ValueError(f"file {value} is over {MAX_PEM_BYTES} bytes: not a PEM file")
    return data


def _where(value: str) -> str:
    return "the inline PEM text" if is_inline(value) else f"file {value}"


def certificates(value: str) -> list[x509.Certificate]:
    """The certificates in a tls_ca or tls_cert value (at least one)."""
    from cryptography import x509

    pem = pem_bytes(value)
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certs = []
    if not certs:
        raise ValueError(
            f"{_where(value)} holds no readable PEM certificate (-----BEGIN CERTIFICATE-----): "
            "a truncated copy, or not a certificate"
        )
    return certs


def private_key(value: str) -> PrivateKeyTypes:
    """The private key in a tls_key value (unencrypted PEM)."""
    from cryptography.hazmat.primitives import serialization

    pem = pem_bytes(value)
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError(
            f"{_where(value)} is encrypted with a passphrase; the agent runs unattended: give "
            "the key without one (as `addin-server enroll` writes it)"
        ) from None
    except (ValueError, binascii.Error):
        raise ValueError(
            f"{_where(value)} holds no readable PEM private key (-----BEGIN PRIVATE KEY-----): "
            "a truncated copy, or not a key"
        ) from None
    except Exception as e:  # cryptography's UnsupportedAlgorithm and the like
        raise ValueError(f"{_where(value)}: key not usable: {e}") from None


def common_name(cert: x509.Certificate) -> str | None:
    from cryptography.x509.oid import NameOID

    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def same_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    from cryptography.hazmat.primitives import serialization

    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return bool(cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt))


def signing_key_bytes(value: str) -> bytes:
    """The raw Ed25519 public key in a ``signing_key`` value (base64 of 32 bytes)."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != ED25519_KEY_BYTES:
        raise ValueError(
            "is not a base64 Ed25519 public key (32 bytes; the one line of the server's "
            "signing.pub, as `addin-server enroll` writes it)"
        )
    return raw
