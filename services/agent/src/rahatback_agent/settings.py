"""Agent runtime settings, from the environment (prefix `RAHATBACK_AGENT_`).

Who the agent *is* (ids, keys, where the control plane lives) is in the identity file written by
`rahatback-agent enroll`; this class only tunes how it runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def default_config_path() -> Path:
    configured = os.environ.get("RAHATBACK_AGENT_CONFIG")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".config" / "rahatback" / "agent.json"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAHATBACK_AGENT_", extra="ignore")

    config: Path = Field(default_factory=default_config_path)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    max_concurrency: int = Field(default=2, ge=1)
    drain_seconds: float = Field(default=60.0, ge=0)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # overrides the identity's nats_url, e.g. when the agent reaches NATS through another address
    nats_url: str | None = None
    # how long one fetch waits for a command before the loop looks at the stop event again
    fetch_timeout_seconds: float = Field(default=2.0, gt=0)
    # a core progress message at most this often per run
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    # at start-up, how long dropping one scratch database left by a killed agent may take before
    # it is left for the next start (docs/verification.md)
    scratch_cleanup_timeout_seconds: float = Field(default=30.0, gt=0)
    # Prometheus /metrics of the agent itself; 0 = off (an agent on a customer host exposes nothing
    # unless asked). Bound to metrics_host, loopback by default.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # signed commands (docs/security.md): how far the agent's clock may trail the API's before a
    # command counts as expired, and how many accepted command ids the replay cache keeps
    command_clock_skew_seconds: float = Field(default=300.0, ge=0)
    replay_cache_max_entries: int = Field(default=10_000, ge=100)
    # customer-held backup keys (docs/backup-keys.md): the keyring file (default: agent.keys.json
    # next to the identity), one extra key file, and a command printing the key for a key id
    keyring: Path | None = None
    key_file: Path | None = None
    key_command: str | None = None
    key_command_ids: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("key_command_ids", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
