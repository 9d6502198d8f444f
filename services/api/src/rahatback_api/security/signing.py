"""The API's command-signing key: every message the API sends to an agent is signed with it.

Agents pin the public half (and its key id) at enrollment and refuse anything it did not sign
(docs/security.md "Signed commands"). What exactly is signed is defined in
`rahatback_contracts.signing`; this module holds the key and signs.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rahatback_contracts import signing
from rahatback_contracts.messages import Message

__all__ = ["CommandSigner", "dev_signing_key", "new_signing_key"]


class CommandSigner:
    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        signing.sign(private_key, key_id, "check", b"")  # a key id the header cannot carry fails here
        self.key_id = key_id
        self._private_key = private_key
        self.public_key_b64 = signing.encode_public_key(private_key.public_key())

    def __repr__(self) -> str:  # never the private key, in a traceback or a log line
        return f"CommandSigner(key_id={self.key_id!r}, public_key={self.public_key_b64!r})"

    def headers(self, subject: str, body: bytes) -> dict[str, str]:
        """The `Rahatback-Signature` header for exactly these subject and body bytes."""
        return signing.signature_headers(self._private_key, self.key_id, subject, body)

    def headers_for(self, subject: str, message: Message) -> dict[str, str]:
        """For a message published as `message.to_bytes()` (RPC requests) or as
        `message.model_dump_json()` (outbox rows): the same bytes."""
        return self.headers(subject, message.to_bytes())


def new_signing_key() -> str:
    """A fresh key in the form RAHATBACK_COMMAND_SIGNING_KEY takes (base64 of the raw 32 bytes)."""
    return signing.encode_private_key(Ed25519PrivateKey.generate())


def dev_signing_key(path: Path) -> str:
    """Dev mode only: the key kept in `path` (var/command-signing.key), made on first use.

    Agents pin the public half at enrollment, so the key must survive restarts of the dev stack:
    a new key on every start would make the enrolled agent refuse every command.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = new_signing_key()
    # O_EXCL + 0600: never readable by others, and two processes starting together don't overwrite
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(encoded + "\n")
    return encoded
