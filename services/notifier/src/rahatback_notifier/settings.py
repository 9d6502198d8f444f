"""Notifier configuration, from the environment (prefix `RAHATBACK_NOTIFIER_`)."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

X25519_KEY_BYTES = 32
_DEFAULT_SMTP_PORTS = {"none": 25, "starttls": 587, "tls": 465}


class ConfigurationError(RuntimeError):
    """The notifier cannot start with this configuration; the message says what to set."""


class NotifierSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAHATBACK_NOTIFIER_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    # operator/JWT mode: this service's NATS user (creds/notifier.creds from `rahatback-api nats-setup`,
    # docs/nats-security.md); unset: plain NATS
    nats_creds: Path | None = None
    # replicas of EVENTS, DEAD_LETTERS and the bucket if the notifier is the first to create them
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # X25519 key the API seals webhook/Slack URLs and signing secrets to: base64 of the 32 raw bytes,
    # inline or in a file (`rahatback-notifier keygen` writes one). Without it only email works.
    private_key: SecretStr | None = None
    private_key_file: Path | None = None

    # no smtp_host = dev mode: every email is written to `outbox_dir` as an .eml file instead
    smtp_host: str | None = None
    smtp_port: int | None = None  # default: 25 / 587 / 465 by smtp_security
    smtp_security: Literal["none", "starttls", "tls"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    # a CA bundle to trust for the SMTP server's certificate (a private CA); system CAs otherwise
    smtp_ca_file: Path | None = None
    smtp_timeout_seconds: float = Field(default=30.0, gt=0)
    mail_from: str = "RahatBack <rahatback@localhost>"
    outbox_dir: Path = Path("var/outbox")

    # a failing channel is tried this many times (deliveries of the event) before it is dead-lettered
    max_attempts: int = Field(default=8, ge=1)
    # delay before retry n: min(base * 2**(n-1), cap)
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_cap_seconds: float = Field(default=600.0, gt=0)
    http_timeout_seconds: float = Field(default=10.0, gt=0)
    # how long one fetch waits for an event before the loop looks at the stop flag again
    fetch_timeout_seconds: float = Field(default=1.0, gt=0)

    metrics_port: int = Field(default=0, ge=0, le=65535)  # 0 = no metrics endpoint
    # scraped from another host when enabled (the endpoint carries counters, never ids or secrets)
    metrics_host: str = "0.0.0.0"  # noqa: S104 - see the comment above
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @property
    def dev_mode(self) -> bool:
        return not self.smtp_host

    @property
    def resolved_smtp_port(self) -> int:
        return self.smtp_port or _DEFAULT_SMTP_PORTS[self.smtp_security]

    def backoff(self, attempt: int) -> float:
        """Seconds before the next delivery after `attempt` failed deliveries (1-based)."""
        exponent = max(attempt, 1) - 1
        return float(min(self.backoff_base_seconds * 2 ** min(exponent, 32), self.backoff_cap_seconds))

    def load_private_key(self) -> X25519PrivateKey | None:
        if self.private_key is not None:
            return decode_private_key(self.private_key.get_secret_value(), "RAHATBACK_NOTIFIER_PRIVATE_KEY")
        if self.private_key_file is not None:
            path = self.private_key_file.expanduser()
            try:
                text = path.read_text()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE {path}: {exc.strerror} "
                    "(create one with `rahatback-notifier keygen --out <file>`)"
                ) from None
            return decode_private_key(text, str(path))
        return None


def decode_private_key(value: str, name: str) -> X25519PrivateKey:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{name} is not valid base64") from None
    if len(raw) != X25519_KEY_BYTES:
        raise ConfigurationError(
            f"{name} must decode to the {X25519_KEY_BYTES} raw bytes of an X25519 key, got {len(raw)}"
        )
    return X25519PrivateKey.from_private_bytes(raw)
