"""Seal secrets to one agent with HPKE (X25519, HKDF-SHA256, AES-256-GCM), bound to a run or request.

The control plane decrypts secrets only to re-seal them here; NATS and JetStream only ever carry the
sealed form, which only the agent holding the private key can open, and only for the same `info`.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from rahatback_contracts.messages import Sealed

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def seal_for_agent(public_key_b64: str, payload: dict[str, Any], info: str) -> Sealed:
    public_key = X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    ciphertext = SUITE.encrypt(json.dumps(payload).encode(), public_key, info=info.encode())
    return Sealed(ciphertext_b64=base64.b64encode(ciphertext).decode(), info=info)
