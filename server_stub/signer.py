"""The server's signing key: every retained state payload is signed on its way out.

Where signing happens, and why there. The database (outbox and `retained` tables) holds the
unsigned payloads; the serving process signs each one as it leaves: the publisher when it
publishes an outbox row or republishes the `retained` table to a broker that lost its state,
and the anti-entropy route ``/v1/agents/{user}/state`` when it answers. Ed25519 signatures
are deterministic, so all three give the same bytes for the same topic and payload: an agent
sees one signed form whichever path a message takes. Signing at the way out rather than at
commit means:

- the CLI commands that change state without a running server (they write the outbox, and
  ``serve`` publishes it later) need no access to the private key: only the one long-running
  process reads it;
- nothing stored is tied to one key: a server restarted with a new key signs everything it
  publishes or serves from then on with it, and a database never holds a mix of payloads
  signed and unsigned (or signed by an old key) depending on which process wrote them;
- no window exists in which anti-entropy would serve a committed-but-unpublished payload
  unsigned.

Signing costs about 25 µs per payload; results are remembered (bounded), so a republish or a
fleet's anti-entropy answers sign each (topic, payload) once.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from addin_core.signing import load_private_key, public_key_text, sign_state

SIGNING_KEY_FILE = "signing.key"
"""Name of the signing key in a PKI directory (``addin-server pki init``)."""

_REMEMBER = 8192
_REMEMBER_MAX_BYTES = 16 * 1024


class SigningKeyError(ValueError):
    """The signing key file is missing, unreadable or not an Ed25519 PKCS8 PEM key."""


class StateSigner:
    """Signs state payloads with one Ed25519 key; `public_text` is what agents configure as
    ``signing_key``."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_text = public_key_text(key)
        self._remembered = functools.lru_cache(maxsize=_REMEMBER)(self._sign)

    def _sign(self, topic: str, payload: bytes) -> bytes:
        return sign_state(self._key, topic, payload)

    def sign(self, topic: str, payload: bytes) -> bytes:
        """`payload` in its signed wire form for `topic`."""
        if len(payload) > _REMEMBER_MAX_BYTES:
            return self._sign(topic, payload)
        return self._remembered(topic, payload)


def sign_all(signer: StateSigner | None, msgs: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """`msgs` (topic, payload) as they go on the wire: signed, or as they are without a key."""
    if signer is None:
        return msgs
    return [(t, signer.sign(t, p)) for t, p in msgs]


def signing_key_path(explicit: Path | None, pki_dir: Path | None = None) -> Path | None:
    """The key ``serve`` signs with: ``--signing-key`` when given, else the PKI directory's
    ``signing.key`` (``--pki DIR``), else none (payloads go out unsigned)."""
    if explicit is not None:
        return explicit
    if pki_dir is not None:
        return pki_dir / SIGNING_KEY_FILE
    return None


def load_signer(path: Path) -> StateSigner:
    """The signer of the key in `path`; `SigningKeyError` saying what is wrong."""
    try:
        pem = path.read_bytes()
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SigningKeyError(f"signing key {path} does not exist") from None
    except IsADirectoryError:
        raise SigningKeyError(f"signing key {path} is a directory, not a key file") from None
    except OSError as e:
        raise SigningKeyError(f"signing key {path} cannot be read: {e.strerror or e}") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        # Whoever reads this key can make every agent of the tenant install anything.
        raise SigningKeyError(
            f"signing key {path} is readable by other users (mode {stat.S_IMODE(mode):o}): "
            f"run chmod 600 {path}"
        )
    try:
        return StateSigner(load_private_key(pem))
    except ValueError as e:
        raise SigningKeyError(f"signing key {path} {e}") from None
