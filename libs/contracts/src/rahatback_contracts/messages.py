"""Every message that crosses NATS. Frozen pydantic models, JSON on the wire, each with `schema_version`.

Only add fields (with defaults); a breaking change gets a new subject or a new schema_version.
Secrets never appear in these models in plaintext: they travel as `Sealed` blobs (HPKE to the
receiving agent's X25519 public key, bound to the run or request id through the HPKE `info`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Engine = Literal["postgresql", "sqlite", "mysql", "mongodb", "mssql"]
StorageKind = Literal["local", "s3", "gdrive"]
Compression = Literal["zstd", "gzip", "none"]
RunStatus = Literal["queued", "running", "completed", "partial", "failed", "skipped"]
Stage = Literal["queued", "dumping", "uploading", "downloading", "restoring", "finalizing"]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Any:
        return cls.model_validate_json(data)


class Sealed(BaseModel):
    """An HPKE (X25519, HKDF-SHA256, AES-256-GCM) ciphertext for one agent.

    `info` is the binding the agent must reproduce to open it, e.g. `rahatback:run:<run id>`:
    a sealed blob lifted from one command cannot be replayed into another.
    """

    model_config = ConfigDict(frozen=True)

    ciphertext_b64: str
    info: str


def seal_info(purpose: Literal["run", "restore", "rpc"], ident: str) -> str:
    return f"rahatback:{purpose}:{ident}"


class DatabaseTarget(BaseModel):
    """How the agent reaches a database. Non-secret settings in clear; the password sealed."""

    model_config = ConfigDict(frozen=True)

    database_id: str | None = None
    name: str
    engine: Engine
    # engine settings without secrets, e.g. {"host", "port", "user", "database", "sslmode"} or {"path"}
    settings: dict[str, Any]
    # sealed JSON object of the engine's secret fields, e.g. {"password": "..."}; None if none
    secrets: Sealed | None = None


class StorageTarget(BaseModel):
    model_config = ConfigDict(frozen=True)

    storage_id: str | None = None
    name: str
    kind: StorageKind
    settings: dict[str, Any]  # e.g. {"path": "/var/backups"}
    secrets: Sealed | None = None


class EncryptionSpec(BaseModel):
    """Envelope encryption: the agent draws a random data key per artifact and wraps it with the
    job key; the job key reaches the agent only sealed to it for this run."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    key_id: str | None = None
    job_key: Sealed | None = None  # sealed 32 raw bytes (base64 inside the sealed JSON)


# ---------------------------------------------------------------- commands (AGENT_COMMANDS)


class Command(Message):
    command_id: str
    org_id: str
    issued_at: AwareDatetime
    expires_at: AwareDatetime


class BackupCommand(Command):
    run_id: str
    job_id: str
    database: DatabaseTarget
    storage: StorageTarget
    compression: Compression = "zstd"
    compression_level: int = 3
    encryption: EncryptionSpec


class RestoreCommand(Command):
    restore_id: str
    backup_run_id: str
    database: DatabaseTarget  # the restore target
    storage: StorageTarget
    storage_key: str  # the artifact's key inside the storage
    compression: Compression
    encrypted: bool
    artifact_sha256: str | None = None
    dump_sha256: str | None = None
    encryption: EncryptionSpec | None = None


class CancelCommand(Command):
    run_id: str


# ---------------------------------------------------------------- rpc (core request/reply)


class DbTestRequest(Message):
    request_id: str
    database: DatabaseTarget


class DbTestReply(Message):
    ok: bool
    server_version: str | None = None
    latency_ms: float | None = None
    # machine-readable cause: auth_failed | unreachable | unknown_database | bad_settings | timeout | error
    error_code: str | None = None
    error: str | None = None


class StorageTestRequest(Message):
    """API → agent `rpc.storage.test`: can the agent write, read back and delete in this storage?"""

    request_id: str
    storage: StorageTarget  # secrets sealed with seal_info("rpc", request_id)


class StorageTestReply(Message):
    ok: bool
    error_code: str | None = None
    error: str | None = None


# ---------------------------------------------------------------- reports (AGENT_REPORTS)


class Report(Message):
    agent_id: str
    occurred_at: AwareDatetime


class BackupStarted(Report):
    run_id: str
    agent_version: str


class BackupCompleted(Report):
    run_id: str
    started_at: AwareDatetime
    finished_at: AwareDatetime
    storage_key: str
    manifest_key: str
    dump_size: int
    artifact_size: int
    dump_sha256: str
    artifact_sha256: str
    server_version: str | None = None
    dump_format: str
    agent_version: str


class BackupFailed(Report):
    run_id: str
    stage: Stage | None = None
    error: str


class RestoreStarted(Report):
    restore_id: str


class RestoreCompleted(Report):
    restore_id: str
    started_at: AwareDatetime
    finished_at: AwareDatetime
    bytes_restored: int


class RestoreFailed(Report):
    restore_id: str
    stage: Stage | None = None
    error: str


# ---------------------------------------------------------------- core telemetry


class Progress(Message):
    agent_id: str
    kind: Literal["backup", "restore"]
    run_id: str  # backup run id or restore id
    stage: Stage
    bytes_in: int  # plaintext dump bytes read (backup) / artifact bytes read (restore)
    bytes_out: int  # artifact bytes written (backup) / dump bytes fed to the engine (restore)
    rate_bps: float
    at: AwareDatetime


class Heartbeat(Message):
    agent_id: str
    version: str
    engines: list[Engine] = Field(default_factory=list)
    storages: list[StorageKind] = Field(default_factory=list)
    running: list[str] = Field(default_factory=list)
    at: AwareDatetime


# ---------------------------------------------------------------- domain events (EVENTS)


class DomainEvent(Message):
    """A fact the API has committed. `type` is also the subject, e.g. `backup.completed`."""

    event_id: str
    type: str
    org_id: str
    occurred_at: AwareDatetime


class BackupEvent(DomainEvent):
    run_id: str
    job_id: str
    job_name: str
    database_id: str
    database_name: str
    status: RunStatus
    trigger: Literal["manual", "schedule"] = "manual"
    dump_size: int | None = None
    artifact_size: int | None = None
    duration_ms: int | None = None
    storage_key: str | None = None
    error: str | None = None


class RestoreEvent(DomainEvent):
    restore_id: str
    backup_run_id: str
    database_id: str
    database_name: str
    status: RunStatus
    duration_ms: int | None = None
    error: str | None = None


class PresenceEvent(DomainEvent):
    agent_id: str
    agent_name: str
    online: bool


class BackupRequested(Message):
    """Scheduler → API (stream CONTROL), deduplicated by `Nats-Msg-Id = sched:<job id>:<fire time>`."""

    job_id: str
    org_id: str
    fire_time: AwareDatetime
