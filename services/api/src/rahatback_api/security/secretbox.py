"""Secrets at rest: AES-256-GCM under the master key, with a key id for rotation.

Ciphertext format: ``v1:<key id>:<base64(nonce || ciphertext+tag)>``. The associated data binds a
ciphertext to the row it belongs to (e.g. ``database:<id>``): copying one row's ciphertext into
another row makes decryption fail instead of leaking the other secret.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = "v1"
_NONCE_BYTES = 12


class SecretBoxError(Exception):
    """A ciphertext could not be opened: wrong key, wrong row (AAD), unknown key id or tampered."""


class SecretBox:
    def __init__(self, master_key: bytes, key_id: str, old_keys: Mapping[str, bytes] | None = None) -> None:
        if len(master_key) != 32:
            raise ValueError("the master key must be 32 bytes")
        if ":" in key_id:
            raise ValueError("a key id cannot contain ':'")
        self.key_id = key_id
        self._keys: dict[str, AESGCM] = {kid: AESGCM(key) for kid, key in (old_keys or {}).items()}
        self._keys[key_id] = AESGCM(master_key)

    def encrypt(self, plaintext: bytes, aad: bytes) -> str:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = self._keys[self.key_id].encrypt(nonce, plaintext, aad)
        return f"{_VERSION}:{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, token: str, aad: bytes) -> bytes:
        try:
            version, key_id, encoded = token.split(":", 2)
        except ValueError:
            raise SecretBoxError("not a secretbox ciphertext") from None
        if version != _VERSION:
            raise SecretBoxError(f"unsupported ciphertext version {version!r}")
        aes = self._keys.get(key_id)
        if aes is None:
            raise SecretBoxError(f"ciphertext was encrypted with unknown key id {key_id!r}")
        try:
            raw = base64.b64decode(encoded, validate=True)
            return aes.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad)
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretBoxError("ciphertext does not open with this key and associated data") from None

    def needs_rotation(self, token: str) -> bool:
        return not token.startswith(f"{_VERSION}:{self.key_id}:")
