"""What the API signs in a message to an agent, and how an agent checks it (Ed25519).

Part of the wire contract, so it lives here. The signature covers the subject and the body:

    b"rahatback-command-v1\\n" + subject + b"\\n" + body

so a signed backup command cannot be replayed onto another agent's subject or turned into a
restore (another subject), and no byte of the body can change. It travels in one NATS header,
`Rahatback-Signature: <key id>:<base64 signature>`; the key id names which of the API's keys
signed, so an agent holding several pinned keys knows which one to try. Expiry and replay are
the agent's business (they need a clock and a memory); this module is pure.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "DOMAIN",
    "SIGNATURE_HEADER",
    "SignatureError",
    "SignatureProblem",
    "decode_private_key",
    "decode_public_key",
    "encode_private_key",
    "encode_public_key",
    "sign",
    "signature_headers",
    "signed_bytes",
    "verify",
]

SIGNATURE_HEADER = "Rahatback-Signature"
DOMAIN = b"rahatback-command-v1\n"
# a key id sits before the ":" of the header; keep it short and free of separators
KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

SignatureProblem = Literal["unsigned", "malformed_signature", "unknown_key", "bad_signature"]


class SignatureError(Exception):
    """The message is not signed by a key this agent trusts; `problem` says which way, the message why."""

    def __init__(self, problem: SignatureProblem, message: str) -> None:
        super().__init__(message)
        self.problem: SignatureProblem = problem


def _checked_key_id(key_id: str) -> str:
    if not KEY_ID.fullmatch(key_id):
        raise ValueError(f"a signing key id is 1-64 characters of A-Z a-z 0-9 . _ -, got {key_id!r}")
    return key_id


def signed_bytes(subject: str, body: bytes) -> bytes:
    """Exactly the bytes the signature covers."""
    return DOMAIN + subject.encode() + b"\n" + body


def sign(private_key: Ed25519PrivateKey, key_id: str, subject: str, body: bytes) -> str:
    """The value of the `Rahatback-Signature` header for this subject and body."""
    signature = private_key.sign(signed_bytes(subject, body))
    return f"{_checked_key_id(key_id)}:{base64.b64encode(signature).decode()}"


def signature_headers(
    private_key: Ed25519PrivateKey, key_id: str, subject: str, body: bytes
) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign(private_key, key_id, subject, body)}


def verify(trusted: Mapping[str, Ed25519PublicKey], subject: str, body: bytes, header: str | None) -> str:
    """Check `header` (the `Rahatback-Signature` value, None if absent) against the subject and
    body the message arrived with; returns the key id that signed. Raises SignatureError."""
    if not header:
        raise SignatureError("unsigned", "the message carries no Rahatback-Signature header")
    key_id, sep, encoded = header.partition(":")
    if not sep or not KEY_ID.fullmatch(key_id):
        raise SignatureError("malformed_signature", "the Rahatback-Signature header is not <key id>:<base64>")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("malformed_signature", "the signature is not valid base64") from None
    public_key = trusted.get(key_id)
    if public_key is None:
        known = ", ".join(sorted(trusted)) or "none"
        raise SignatureError(
            "unknown_key",
            f"signed with key id {key_id!r}, which this agent does not trust (pinned: {known})",
        )
    try:
        public_key.verify(signature, signed_bytes(subject, body))
    except InvalidSignature:
        raise SignatureError(
            "bad_signature",
            f"the signature does not match key {key_id!r} for this subject and body "
            "(forged, altered, or signed for another subject)",
        ) from None
    return key_id


def encode_private_key(key: Ed25519PrivateKey) -> str:
    """Base64 of the raw 32-byte private key (the form of RAHATBACK_COMMAND_SIGNING_KEY)."""
    return base64.b64encode(key.private_bytes_raw()).decode()


def encode_public_key(key: Ed25519PublicKey) -> str:
    return base64.b64encode(key.public_bytes_raw()).decode()


def decode_private_key(value: str) -> Ed25519PrivateKey:
    """Raises ValueError naming what is wrong (never the value)."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an Ed25519 private key must be base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 private key is 32 raw bytes, this one decodes to {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def decode_public_key(value: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("an Ed25519 public key must be base64") from None
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 raw bytes, this one decodes to {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)
