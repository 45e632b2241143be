"""End-to-end signatures on retained state payloads (Ed25519). Pure: no I/O, no clock.

The deployment server signs every state payload it publishes; an agent configured with the
server's public key (``signing_key``) refuses any state message that does not carry a valid
signature. The broker, and anyone holding a broker account that may publish state, can then
no longer change what an agent installs: they can only withhold or replay messages, and
replays are caught by the revision rule (`ReceivedState`) and, across topics, by the topic
being part of what is signed.

Signed bytes::

    b"addin-deploy/state/v1\\n" + topic (UTF-8) + b"\\n" + unsigned payload

Wire form: the unsigned JSON object with ``,"sig":"<base64 Ed25519 signature>"`` inserted
before its final ``}``, so the signature is the object's last member and the payload stays
one JSON object that old tooling can read. Tombstones are signed the same way. Ed25519
signatures are deterministic (RFC 8032): the same key, topic and payload always give the
same bytes, so a payload signed again on republish or for anti-entropy is byte-identical to
the one first published.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from typing import TYPE_CHECKING, Literal

from addin_core.protocol import ProtocolError

if TYPE_CHECKING:
    # Imported where used: cryptography's Rust module is ~8.5 MB of RSS, and an agent without
    # a `signing_key` (a lab) never verifies anything (docs/benchmarks.md, "Agent").
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

CONTEXT = b"addin-deploy/state/v1\n"
"""Prefix of every signed byte string: a signature made for anything else (another
protocol, another version of this one) never verifies here."""

SIG_MEMBER = b',"sig":"'
_SIG_LEN = 88
"""Characters of a base64 Ed25519 signature (64 bytes, with padding)."""
_SIG_RE = re.compile(rb"[A-Za-z0-9+/]{86}==")

Reason = Literal["unsigned", "bad signature"]


class SignatureRefused(ProtocolError):
    """A state message refused for its signature. `reason` is ``"unsigned"`` (no signature
    where the wire form puts it) or ``"bad signature"`` (one that does not verify for this
    topic and payload with the configured key); the message names the topic."""

    def __init__(self, topic: str, reason: Reason, detail: str) -> None:
        self.topic = topic
        self.reason: Reason = reason
        super().__init__(f"{topic}: {reason}: {detail}")


def _signed_bytes(topic: str, unsigned: bytes) -> bytes:
    return CONTEXT + topic.encode("utf-8") + b"\n" + unsigned


def sign_state(key: Ed25519PrivateKey, topic: str, payload: bytes) -> bytes:
    """`payload` (a JSON object, unsigned) in its signed wire form for `topic`."""
    if not payload.startswith(b"{") or not payload.endswith(b"}"):
        raise ValueError("only a JSON object (from its { to its }) can be signed")
    sig = base64.b64encode(key.sign(_signed_bytes(topic, payload)))
    # An empty object has no member to put a comma after.
    sep = SIG_MEMBER if payload[1:-1].strip() else SIG_MEMBER[1:]
    return payload[:-1] + sep + sig + b'"}'


def split_state(raw: bytes) -> tuple[bytes, bytes | None]:
    """(unsigned payload, signature) of a wire payload; (raw, None) when it carries no
    signature as its last member. Does not verify anything: an agent without a key (a lab)
    uses it to read signed payloads, the verifier to find what was signed."""
    if not raw.endswith(b'"}'):
        return raw, None
    at = raw.rfind(SIG_MEMBER)
    if at >= 0:
        start, unsigned = at + len(SIG_MEMBER), raw[:at] + b"}"
    elif raw.startswith(b'{"sig":"'):
        start, unsigned = len(b'{"sig":"'), b"{}"
    else:
        return raw, None
    text = raw[start:-2]
    if len(text) != _SIG_LEN or not _SIG_RE.fullmatch(text):
        # Something ends like a signature member but is no signature: refused as bad, not
        # read as an unsigned payload with an odd last field.
        return unsigned, text or b"!"
    return unsigned, text


def verify_state(key: Ed25519PublicKey, topic: str, raw: bytes) -> bytes:
    """The unsigned payload of `raw` if it carries a valid signature by `key` for `topic`
    (it then goes through `addin_core.protocol.decode`); `SignatureRefused` otherwise.

    Results are remembered (bounded): a process hosting thousands of agents with the same
    key receives the same bytes once per agent and verifies them once."""
    raw = bytes(raw)
    if len(raw) > _REMEMBER_MAX_BYTES:
        return _verify(key, topic, raw)
    return _verify_remembered(_public_bytes(key), topic, raw)


def _verify(key: Ed25519PublicKey, topic: str, raw: bytes) -> bytes:
    unsigned, sig = split_state(raw)
    if sig is None:
        raise SignatureRefused(topic, "unsigned", "the payload carries no signature")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureRefused(topic, "bad signature", "the signature is not base64") from None
    if len(signature) != 64:
        raise SignatureRefused(topic, "bad signature", "the signature is not 64 bytes")
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, _signed_bytes(topic, unsigned))
    except InvalidSignature:
        raise SignatureRefused(
            topic,
            "bad signature",
            "it does not verify with the configured signing_key for this topic and payload",
        ) from None
    return unsigned


_REMEMBER = 4096
_REMEMBER_MAX_BYTES = 16 * 1024
"""Larger payloads (a membership of thousands of groups) are verified each time rather
than pinned in memory."""


@functools.lru_cache(maxsize=_REMEMBER)
def _verify_remembered(key: bytes, topic: str, raw: bytes) -> bytes:
    # A refusal is raised, never remembered: only verified results are kept.
    return _verify(_public_key_from_raw(key), topic, raw)


@functools.lru_cache(maxsize=64)
def _public_key_from_raw(raw: bytes) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_key_text(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """The one-line form of a public key: base64 of its raw 32 bytes (``signing.pub``, and
    the agent's ``signing_key``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(_public_bytes(pub)).decode("ascii")


@functools.lru_cache(maxsize=64)
def load_public_key(text: str) -> Ed25519PublicKey:
    """The public key of its one-line base64 form; ValueError saying what to write."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "is not base64: give the one-line public key of the server's signing key (signing.pub)"
        ) from None
    if len(raw) != 32:
        raise ValueError(
            f"is {len(raw)} bytes once decoded; an Ed25519 public key is 32 (signing.pub)"
        )
    return _public_key_from_raw(raw)


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from its PKCS8 PEM text; ValueError saying what is wrong."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except TypeError:
        raise ValueError("is encrypted: give the key unencrypted (mode 0600 protects it)") from None
    except ValueError:
        raise ValueError(
            "is not a PKCS8 PEM private key (-----BEGIN PRIVATE KEY-----, e.g. from "
            "`openssl genpkey -algorithm ed25519`)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"holds another kind of key ({type(key).__name__}), not an Ed25519 one")
    return key
