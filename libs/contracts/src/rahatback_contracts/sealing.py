"""How a `Sealed` blob is made and opened: HPKE (RFC 9180) X25519 / HKDF-SHA256 / AES-256-GCM.

Part of the wire contract, so it lives here: the API seals secrets to an agent (or to the notifier)
for one run, request or event; only the holder of the private key opens them, and only with the
same `info`, so a blob lifted from one message cannot be replayed into another.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .messages import Sealed

__all__ = ["SealingError", "open_optional", "open_sealed", "seal"]

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


class SealingError(Exception):
    """A sealed secret could not be opened; the message says why (never what it contained)."""


def seal(public_key_b64: str, payload: dict[str, Any], info: str) -> Sealed:
    public_key = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    ciphertext = SUITE.encrypt(json.dumps(payload).encode(), public_key, info=info.encode())
    return Sealed(ciphertext_b64=base64.b64encode(ciphertext).decode(), info=info)


def open_sealed(private_key: X25519PrivateKey, sealed: Sealed, expected_info: str) -> dict[str, Any]:
    if sealed.info != expected_info:
        raise SealingError(
            f"sealed secrets are bound to {sealed.info!r}, not to {expected_info!r}: "
            "refusing secrets that were sealed for another run or request"
        )
    try:
        ciphertext = base64.b64decode(sealed.ciphertext_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SealingError("sealed secrets are not valid base64") from None
    try:
        plaintext = SUITE.decrypt(ciphertext, private_key, info=expected_info.encode())
    except (InvalidTag, ValueError):
        raise SealingError(
            "sealed secrets could not be opened with this key "
            "(sealed to another recipient, or the recipient's key changed)"
        ) from None
    try:
        value = json.loads(plaintext)
    except ValueError:
        raise SealingError("sealed secrets are not a JSON object") from None
    if not isinstance(value, dict):
        raise SealingError("sealed secrets are not a JSON object")
    return value


def open_optional(private_key: X25519PrivateKey, sealed: Sealed | None, expected_info: str) -> dict[str, Any]:
    return {} if sealed is None else open_sealed(private_key, sealed, expected_info)
