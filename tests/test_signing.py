"""Signed state payloads (addin_core/signing.py): the wire form, and every way a payload that
the server did not sign for this topic is refused."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from addin_core.protocol import (
    Assignment,
    Mode,
    ProtocolError,
    Tombstone,
    Topic,
    decode,
)
from addin_core.signing import (
    SignatureRefused,
    load_private_key,
    load_public_key,
    public_key_text,
    sign_state,
    split_state,
    verify_state,
)

KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key()
ANN = Topic.assign_user("contoso", "ann", "addin-a")
BOB = Topic.assign_user("contoso", "bob", "addin-a")


def _assignment(revision: int = 7, mode: Mode = Mode.FIXED) -> bytes:
    return Assignment(mode=mode, revision=revision, committed_at=1.5).to_bytes()


def _refusal(topic: Topic, raw: bytes, key: object = PUB) -> SignatureRefused:
    with pytest.raises(SignatureRefused) as e:
        verify_state(key, str(topic), raw)  # type: ignore[arg-type]
    assert isinstance(e.value, ProtocolError)
    assert str(topic) in str(e.value)
    return e.value


def test_wire_form_is_the_object_with_sig_last_and_verifies_to_the_unsigned_payload() -> None:
    payload = _assignment()
    raw = sign_state(KEY, str(ANN), payload)
    assert raw.startswith(payload[:-1] + b',"sig":"') and raw.endswith(b'"}')
    data = json.loads(raw)
    assert list(data)[-1] == "sig" and len(base64.b64decode(data["sig"])) == 64
    signed = b"addin-deploy/state/v1\n" + str(ANN).encode() + b"\n" + payload
    PUB.verify(base64.b64decode(data["sig"]), signed)  # exactly the bytes SEC_SPEC names
    assert verify_state(PUB, str(ANN), raw) == payload
    assert decode(ANN, verify_state(PUB, str(ANN), raw)) == Assignment.model_validate_json(payload)


def test_signing_is_deterministic() -> None:
    # Republish and anti-entropy sign again; the bytes must be those first published.
    assert sign_state(KEY, str(ANN), _assignment()) == sign_state(KEY, str(ANN), _assignment())


def test_tombstone_is_signed_the_same_way() -> None:
    tomb = Tombstone(deleted=True, revision=9).to_bytes()
    raw = sign_state(KEY, str(ANN), tomb)
    unsigned = verify_state(PUB, str(ANN), raw)
    assert unsigned == tomb and isinstance(decode(ANN, unsigned), Tombstone)


def test_tampered_payload_is_a_bad_signature() -> None:
    raw = sign_state(KEY, str(ANN), _assignment(mode=Mode.AVAILABLE))
    forged = raw.replace(b'"available"', b'"fixed"')
    assert forged != raw
    assert _refusal(ANN, forged).reason == "bad signature"
    higher = raw.replace(b'"revision":7', b'"revision":8')
    assert _refusal(ANN, higher).reason == "bad signature"


def test_payload_signed_for_bob_replayed_on_anns_topic_is_refused() -> None:
    raw = sign_state(KEY, str(BOB), _assignment())
    assert verify_state(PUB, str(BOB), raw) == _assignment()
    assert _refusal(ANN, raw).reason == "bad signature"
    other_tenant = Topic.assign_user("fabrikam", "ann", "addin-a")
    assert _refusal(other_tenant, sign_state(KEY, str(ANN), _assignment())).reason == (
        "bad signature"
    )


def test_missing_signature_is_unsigned() -> None:
    e = _refusal(ANN, _assignment())
    assert e.reason == "unsigned" and e.topic == str(ANN)
    assert "unsigned" in str(e)


def test_wrong_key_is_a_bad_signature() -> None:
    raw = sign_state(Ed25519PrivateKey.generate(), str(ANN), _assignment())
    assert _refusal(ANN, raw).reason == "bad signature"


def test_signature_not_last_is_refused() -> None:
    raw = sign_state(KEY, str(ANN), _assignment())
    sig = json.loads(raw)["sig"]
    first = b'{"sig":"' + sig.encode() + b'",' + _assignment()[1:]
    assert _refusal(ANN, first).reason in ("unsigned", "bad signature")
    # A member after the signature: the object no longer ends with it.
    moved = raw[:-1] + b',"revision":8}'
    assert _refusal(ANN, moved).reason == "unsigned"


@pytest.mark.parametrize(
    "sig",
    [b"not base64 at all!", b"A" * 87 + b"=", b"@" * 86 + b"==", b"", b"QUJD"],
)
def test_garbage_signature_is_a_bad_signature(sig: bytes) -> None:
    raw = _assignment()[:-1] + b',"sig":"' + sig + b'"}'
    assert _refusal(ANN, raw).reason == "bad signature"


def test_a_refusal_is_not_remembered_and_a_success_is() -> None:
    raw = sign_state(KEY, str(ANN), _assignment(revision=11))
    assert verify_state(PUB, str(ANN), raw) == _assignment(revision=11)
    assert verify_state(PUB, str(ANN), raw) == _assignment(revision=11)
    # The remembered success is per (key, topic): another key or topic is checked again.
    other = Ed25519PrivateKey.generate().public_key()
    _refusal(ANN, raw, other)
    _refusal(BOB, raw)


def test_large_payload_is_verified_without_being_remembered() -> None:
    big = json.dumps({"groups": [f"g{i:05d}" for i in range(4000)], "revision": 3}).encode()
    topic = Topic.member("contoso", "ann")
    raw = sign_state(KEY, str(topic), big)
    assert len(raw) > 16 * 1024
    assert verify_state(PUB, str(topic), raw) == big
    _refusal(topic, raw.replace(b"g00001", b"g00002"))


def test_split_without_key_reads_signed_and_unsigned_payloads() -> None:
    payload = _assignment()
    assert split_state(payload) == (payload, None)
    unsigned, sig = split_state(sign_state(KEY, str(ANN), payload))
    assert unsigned == payload and sig is not None and len(sig) == 88
    empty = sign_state(KEY, str(ANN), b"{}")
    assert empty.startswith(b'{"sig":"') and verify_state(PUB, str(ANN), empty) == b"{}"


def test_only_json_objects_are_signed() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        sign_state(KEY, str(ANN), b"[1]")


def test_public_key_text_round_trips_and_bad_text_is_refused_clearly() -> None:
    text = public_key_text(KEY)
    assert text == public_key_text(PUB) and len(base64.b64decode(text)) == 32
    raw = sign_state(KEY, str(ANN), _assignment())
    assert verify_state(load_public_key(text), str(ANN), raw) == _assignment()
    with pytest.raises(ValueError, match="not base64"):
        load_public_key("not a key!")
    with pytest.raises(ValueError, match="32"):
        load_public_key(base64.b64encode(b"short").decode())


def test_private_key_from_pkcs8_pem_and_wrong_kinds_refused() -> None:
    pem = KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert public_key_text(load_private_key(pem)) == public_key_text(KEY)
    with pytest.raises(ValueError, match="PEM"):
        load_private_key(b"-----BEGIN NOTHING-----\n")
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ValueError, match="not an Ed25519 one"):
        load_private_key(ec_pem)
