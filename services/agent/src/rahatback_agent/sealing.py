"""Secrets in flight: HPKE (X25519, HKDF-SHA256, AES-256-GCM) to the agent's key, bound to one
run/restore/request through the HPKE `info`. A blob lifted from one command cannot open in another."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from rahatback_contracts.messages import Sealed

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)


class SealingError(Exception):
    """A sealed secret could not be opened; the message says why (never what it contained)."""


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
            "sealed secrets could not be opened with this agent's key "
            "(sealed to another agent, or the agent was re-enrolled)"
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


def open_job_key(private_key: X25519PrivateKey, sealed: Sealed, expected_info: str) -> bytes:
    """The per-job key travels as `{"key_b64": base64(32 raw bytes)}`."""
    payload = open_sealed(private_key, sealed, expected_info)
    key_b64 = payload.get("key_b64")
    if not isinstance(key_b64, str):
        raise SealingError("sealed job key has no key_b64 field")
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SealingError("sealed job key is not valid base64") from None
    if len(key) != 32:
        raise SealingError(f"sealed job key must be 32 bytes, got {len(key)}")
    return key
