"""Configuration from the environment (prefix `RAHATBACK_`)."""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from rahatback_contracts.signing import decode_private_key

from rahatback_api.security.signing import CommandSigner, dev_signing_key

MASTER_KEY_BYTES = 32


class ConfigurationError(RuntimeError):
    """The service cannot start with this configuration; the message says what to set."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAHATBACK_", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./var/rahatback.db"
    # base64 of 32 random bytes, e.g. `openssl rand -base64 32`
    master_key: SecretStr | None = None
    # key id written into every ciphertext, so the key can be rotated later
    master_key_id: str = "k1"
    # older keys still accepted for decryption during a rotation: {"k0": "<base64>"}
    old_master_keys: dict[str, SecretStr] = {}
    dev_mode: bool = False
    var_dir: Path = Path("var")
    nats_url: str = "nats://127.0.0.1:4222"
    public_url: str = "http://127.0.0.1:8000"
    # a running run that its heartbeating agent no longer lists (or that never progresses) fails after this
    agent_stall_seconds: int = 120
    agent_offline_seconds: int = 30
    # JetStream replicas of the streams and buckets (3 on a 3-node NATS cluster)
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # `backup.overdue` fires this long after a scheduled run should have succeeded and has not
    overdue_grace_seconds: int = 1800
    # base64 raw X25519 public key of the notifier (`rahatback-notifier keygen`): webhook URLs and
    # secrets travel sealed to it; without it only email channels can be used
    notifier_public_key: str | None = None
    # base64 raw 32-byte Ed25519 private key (`rahatback-api command-signing-keygen`): every command
    # and request to an agent is signed with it; agents pin its public half and id at enrollment
    command_signing_key: SecretStr | None = None
    command_signing_key_id: str = "c1"
    # operator/JWT mode (docs/nats-security.md; files from `rahatback-api nats-setup`): the API's own
    # NATS user, the system-account user that pushes revocations, and api-signing.json, which turns
    # on minting agents' user JWTs. Unset: plain NATS, as in the dev stack.
    nats_creds: Path | None = None
    nats_system_creds: Path | None = None
    nats_signing: Path | None = None
    # lifetime of an agent's NATS user JWT; the agent renews it at half-life
    agent_jwt_hours: float = Field(default=24.0, gt=0, le=24 * 30)
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    login_token_hours: int = 12
    # login throttling: this many failed logins for one email (or from one client address) within the
    # window lock that email (or address) out for the lockout; the attempts then get 429
    login_max_failures: int = Field(default=5, ge=1)
    login_max_failures_per_ip: int = Field(default=5, ge=1)
    login_failure_window_minutes: int = Field(default=15, ge=1)
    login_lockout_minutes: int = Field(default=15, ge=1)
    # reverse proxies (addresses or CIDR networks, JSON list) whose X-Forwarded-For names the client
    # in the audit log and the login throttle; empty: the connecting address is the client
    trusted_proxies: list[str] = []

    def master_key_bytes(self) -> bytes:
        """The decoded master key; in dev mode one is generated and kept in `var/master.key`.

        Outside dev mode a missing or malformed key stops the service: running with a made-up key
        would encrypt secrets that nobody can decrypt after a restart.
        """
        if self.master_key is not None:
            return decode_master_key(self.master_key.get_secret_value(), "RAHATBACK_MASTER_KEY")
        if not self.dev_mode:
            raise ConfigurationError(
                "RAHATBACK_MASTER_KEY is not set: set it to the base64 encoding of 32 random bytes "
                "(or set RAHATBACK_DEV_MODE=true to generate a development key)"
            )
        return _dev_master_key(self.var_dir / "master.key")

    def command_signer(self) -> CommandSigner:
        """The command-signing key; in dev mode one is generated and kept in `var/command-signing.key`.

        Outside dev mode a missing or malformed key stops the service: enrolled agents pin the
        public half, so a made-up key would have every agent refuse every command after a restart.
        """
        if self.command_signing_key is not None:
            encoded = self.command_signing_key.get_secret_value()
        elif self.dev_mode:
            encoded = dev_signing_key(self.var_dir / "command-signing.key")
        else:
            raise ConfigurationError(
                "RAHATBACK_COMMAND_SIGNING_KEY is not set: set it to the output of "
                "`rahatback-api command-signing-keygen` (or set RAHATBACK_DEV_MODE=true to generate one)"
            )
        try:
            return CommandSigner(self.command_signing_key_id, decode_private_key(encoded))
        except ValueError as exc:
            raise ConfigurationError(f"RAHATBACK_COMMAND_SIGNING_KEY[_ID]: {exc}") from None

    def check_notifier_public_key(self) -> None:
        if self.notifier_public_key is None:
            return
        try:
            X25519PublicKey.from_public_bytes(base64.b64decode(self.notifier_public_key, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise ConfigurationError(
                "RAHATBACK_NOTIFIER_PUBLIC_KEY must be the base64 of a raw 32-byte X25519 public key "
                "(as printed by `rahatback-notifier keygen`)"
            ) from exc

    def old_master_key_bytes(self) -> dict[str, bytes]:
        return {
            key_id: decode_master_key(value.get_secret_value(), f"RAHATBACK_OLD_MASTER_KEYS[{key_id}]")
            for key_id, value in self.old_master_keys.items()
        }


def decode_master_key(value: str, name: str) -> bytes:
    try:
        key = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigurationError(f"{name} is not valid base64") from exc
    if len(key) != MASTER_KEY_BYTES:
        raise ConfigurationError(f"{name} must decode to {MASTER_KEY_BYTES} bytes, got {len(key)}")
    return key


def _dev_master_key(path: Path) -> bytes:
    if path.exists():
        return decode_master_key(path.read_text(), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded = base64.b64encode(secrets.token_bytes(MASTER_KEY_BYTES)).decode()
    # O_EXCL + 0600: never readable by others, and two processes starting together don't overwrite
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return decode_master_key(path.read_text(), str(path))
    with os.fdopen(fd, "w") as out:
        out.write(encoded + "\n")
    return base64.b64decode(encoded)
