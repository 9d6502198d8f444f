"""Scheduler settings, from the environment (prefix `RAHATBACK_SCHEDULER_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SchedulerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAHATBACK_SCHEDULER_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"
    # operator/JWT mode: this service's NATS user (creds/scheduler.creds from `rahatback-api nats-setup`,
    # docs/nats-security.md); unset: plain NATS
    nats_creds: Path | None = None
    # replicas of CONTROL and the buckets if the scheduler is the first to create them
    stream_replicas: int = Field(default=1, ge=1, le=5)
    # a fire found due at most this long ago (after downtime or an outage) still runs; older ones are
    # reported as missed runs (docs/scheduling.md)
    misfire_grace_seconds: float = Field(default=300.0, ge=0)
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Prometheus /metrics; 0 = off
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # on SIGTERM: how long in-flight publishes may take before they are abandoned
    drain_seconds: float = Field(default=10.0, ge=0)
    # one JetStream publish attempt waits this long for the stream's ack
    publish_timeout_seconds: float = Field(default=5.0, gt=0)
