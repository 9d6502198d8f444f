"""The per-job key inside a sealed blob; HPKE sealing is in rahatback_contracts.sealing."""

from __future__ import annotations

import base64
import binascii

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_contracts.messages import Sealed
from rahatback_contracts.sealing import SealingError, open_optional, open_sealed

__all__ = ["SealingError", "open_job_key", "open_optional", "open_sealed"]


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
