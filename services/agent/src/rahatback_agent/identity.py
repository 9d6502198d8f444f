"""The agent's identity file: who it is, where the control plane is, and its X25519 private key.

The file holds a private key, so it is written 0600 atomically and refused when others can read it.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat
from pydantic import BaseModel, ConfigDict, ValidationError

from .private_files import write_private_atomic


class IdentityError(Exception):
    """The identity file is missing, unsafe or malformed; the message says what to do."""


class AgentIdentity(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    agent_id: str
    org_id: str
    nats_url: str
    api_url: str
    name: str
    x25519_private_key_b64: str
    # the API's command-signing key, pinned at enrollment (docs/security.md "Signed commands");
    # None only in identities enrolled before commands were signed: such an agent refuses to start
    command_key_id: str | None = None
    command_public_key_b64: str | None = None

    # operator/JWT mode (docs/nats-security.md): the NATS user nkey seed generated here (never sent)
    # and the current user JWT; both None when the control plane runs NATS in plain mode
    nats_seed: str | None = None
    nats_jwt: str | None = None

    def __repr__(self) -> str:  # keep the private key out of tracebacks and logs
        return f"AgentIdentity(agent_id={self.agent_id!r}, org_id={self.org_id!r}, name={self.name!r})"

    __str__ = __repr__

    @property
    def private_key(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(base64.b64decode(self.x25519_private_key_b64))

    @property
    def public_key_b64(self) -> str:
        return public_key_b64(self.private_key)


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_key_b64(key: X25519PrivateKey) -> str:
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return base64.b64encode(raw).decode()


def public_key_b64(key: X25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def save_identity(identity: AgentIdentity, path: Path, *, force: bool = False) -> None:
    """Written 0600 and atomically: no reader ever sees a half-written or briefly world-readable key."""
    path = path.expanduser()
    if path.exists() and not force:
        raise IdentityError(
            f"{path} already holds an agent identity; pass --force to replace it "
            "(the old agent will stop receiving commands)"
        )
    write_private_atomic(path, json.dumps(identity.model_dump(), indent=2) + "\n")


def load_identity(path: Path) -> AgentIdentity:
    path = path.expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise IdentityError(
            f"no agent identity at {path}: run `rahatback-agent enroll --api URL --token TOKEN` first"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}) and holds the agent's "
            f"private key; run `chmod 600 {path}`"
        )
    try:
        return AgentIdentity.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        problems = exc.error_count()
        raise IdentityError(f"{path} is not a valid agent identity: {problems} field error(s)") from None
