"""Every message that crosses NATS. Frozen pydantic models, JSON on the wire, each with `schema_version`.

Only add fields (with defaults); a breaking change gets a new subject or a new schema_version.
Secrets never appear in these models in plaintext: they travel as `Sealed` blobs (HPKE to the
receiving agent's X25519 public key, bound to the run or request id through the HPKE `info`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

Engine = Literal["postgresql", "sqlite", "mysql", "mongodb", "mssql"]
StorageKind = Literal["local", "s3", "gdrive"]
Compression = Literal["zstd", "gzip", "none"]
# skipped: a scheduled fire found the job still running; missed: the scheduler was down at fire time
RunStatus = Literal["queued", "running", "completed", "partial", "failed", "skipped", "missed"]
Stage = Literal["queued", "dumping", "uploading", "downloading", "restoring", "verifying", "finalizing"]
# integrity: download, authenticate every chunk, decompress, check both SHA-256s against the manifest;
# test_restore: also restore into a scratch database and compare per-table row counts with the manifest
VerifyLevel = Literal["integrity", "test_restore"]


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


def seal_info(purpose: Literal["run", "restore", "rpc", "prune", "notify", "verify"], ident: str) -> str:
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
    # customer: the key never leaves the agent host; the command names it (key_id + fingerprint)
    # and carries no job_key; the agent takes it from its own keyring (docs/backup-keys.md)
    custody: Literal["managed", "customer"] = "managed"
    fingerprint: str | None = None


# ---------------------------------------------------------------- commands (AGENT_COMMANDS)


class Command(Message):
    command_id: str
    org_id: str
    issued_at: AwareDatetime
    expires_at: AwareDatetime


class BackupCommand(Command):
    """One dump, written to `storage` and every `extra_storages` target at once (3-2-1 copies)."""

    run_id: str
    job_id: str
    database: DatabaseTarget
    storage: StorageTarget
    extra_storages: list[StorageTarget] = Field(default_factory=list)
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


class VerifyCommand(Command):
    """Prove one copy of a backup restores. Secrets sealed with seal_info("verify", verify_id).

    The expected checksums come from the API's record of the run; the expected row counts from the
    manifest next to the artifact (`manifest_key`). For `test_restore`, `database` is the backed-up
    database's connection: the agent creates a scratch database on that server (or on
    `scratch_server` when given), never writes to the source, and drops the scratch database in
    every case.
    """

    verify_id: str
    backup_run_id: str
    level: VerifyLevel
    storage: StorageTarget
    storage_key: str
    manifest_key: str | None = None
    compression: Compression
    encrypted: bool
    artifact_sha256: str | None = None
    dump_sha256: str | None = None
    encryption: EncryptionSpec | None = None
    database: DatabaseTarget | None = None
    scratch_server: DatabaseTarget | None = None


class PruneItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    storage_key: str
    manifest_key: str | None = None


class PruneCommand(Command):
    """Retention: delete these expired artifacts (and their manifests) from one storage."""

    prune_id: str
    job_id: str
    storage: StorageTarget  # secrets sealed with seal_info("prune", prune_id)
    items: list[PruneItem]


# ---------------------------------------------------------------- rpc (core request/reply)


class RpcRequest(Message):
    """What every API → agent request carries besides its own fields. The API signs each request
    (docs/security.md "Signed commands") and gives it an expiry; an agent refuses one that has none."""

    request_id: str
    issued_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None


class DbTestRequest(RpcRequest):
    request_id: str
    database: DatabaseTarget


class DbTestReply(Message):
    ok: bool
    server_version: str | None = None
    latency_ms: float | None = None
    # machine-readable cause: auth_failed | unreachable | unknown_database | bad_settings | timeout |
    # tool_missing | tool_too_old | error
    error_code: str | None = None
    error: str | None = None
    # the connection works but a backup would not, e.g. "pg_dump 13 cannot dump server 15: install
    # postgresql-client-15"
    warning: str | None = None


class DbListRequest(RpcRequest):
    """API → agent `rpc.db.list`: which databases does this server hold (whole-server jobs)?"""

    request_id: str
    database: DatabaseTarget  # the server connection; secrets sealed with seal_info("rpc", request_id)


class DbListReply(Message):
    ok: bool
    # the server's databases, without its system databases and RahatBack's own scratch databases
    databases: list[str] = Field(default_factory=list)
    error_code: str | None = None
    error: str | None = None


class StorageTestRequest(RpcRequest):
    """API → agent `rpc.storage.test`: can the agent write, read back and delete in this storage?"""

    request_id: str
    storage: StorageTarget  # secrets sealed with seal_info("rpc", request_id)


class StorageTestReply(Message):
    ok: bool
    error_code: str | None = None
    error: str | None = None


class RpcFailureReply(Message):
    """The answer to any RPC the agent could not or would not serve (refused, crashed). Every reply
    above carries `ok`, `error_code` and `error` with these meanings and defaults for the rest, so
    the API reads this with the reply model of the request it sent."""

    ok: Literal[False] = False
    # refused: the agent refused the request itself (signature, expiry, replay); error: an agent bug
    error_code: str
    error: str


# ---------------------------------------------------------------- reports (AGENT_REPORTS)


class Report(Message):
    agent_id: str
    occurred_at: AwareDatetime


class BackupStarted(Report):
    run_id: str
    agent_version: str


class CopyResult(BaseModel):
    """One storage's copy of a backup: where it is, or why it is not there."""

    model_config = ConfigDict(frozen=True)

    storage_id: str | None = None
    ok: bool
    storage_key: str | None = None
    manifest_key: str | None = None
    error: str | None = None


class BackupCompleted(Report):
    """At least one copy is complete. `storage_key`/`manifest_key` name the first complete copy (the
    primary storage's when it succeeded); `copies` lists every target, failed ones with their error."""

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
    copies: list[CopyResult] = Field(default_factory=list)


class BackupFailed(Report):
    run_id: str
    stage: Stage | None = None
    error: str


class TableCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    table: str
    expected: int | None = None  # rows at dump time (manifest); None: the table was not in the manifest
    found: int | None = None  # rows after the test restore; None: the table is missing


class VerifyStarted(Report):
    verify_id: str


class VerifyCompleted(Report):
    """The verification ran to its end; `ok` says whether the backup passed. A failed check (flipped
    bit, truncated artifact, missing manifest, wrong key, row-count mismatch) is ok=False with `error`
    naming what failed; `mismatches` lists the tables whose counts differ."""

    verify_id: str
    level: VerifyLevel
    ok: bool
    started_at: AwareDatetime
    finished_at: AwareDatetime
    artifact_sha256_ok: bool | None = None
    dump_sha256_ok: bool | None = None
    tables_compared: int = 0
    mismatches: list[TableCheck] = Field(default_factory=list)
    error: str | None = None


class VerifyFailed(Report):
    """The verification could not run (storage unreachable, scratch server refused, cancelled…)."""

    verify_id: str
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


class PruneFailure(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    error: str


class PruneCompleted(Report):
    """Per-item outcome: `deleted` run ids are gone from storage (a key already absent counts as
    deleted); `failures` name what could not be deleted and why."""

    prune_id: str
    deleted: list[str] = Field(default_factory=list)
    failures: list[PruneFailure] = Field(default_factory=list)


class PruneFailed(Report):
    """Nothing was attempted (e.g. the storage could not be opened)."""

    prune_id: str
    error: str


# why an agent refused a command or request (docs/security.md "Signed commands")
RefusalReason = Literal[
    "unsigned", "malformed_signature", "unknown_key", "bad_signature", "expired", "replayed"
]


class CommandRefused(Report):
    """`agent.<id>.report.command.refused`: the agent ran nothing. `command_id`, `run_kind` and
    `run_id` are read from the refused body as it came (unsigned bodies included): the API acts on
    them only when they name a command it issued itself to that agent."""

    subject: str
    reason: RefusalReason
    detail: str
    command_id: str | None = None
    run_kind: Literal["backup", "restore", "verify", "prune", "cancel", "rpc"] | None = None
    run_id: str | None = None


# ---------------------------------------------------------------- core telemetry


class Progress(Message):
    agent_id: str
    kind: Literal["backup", "restore", "verify"]
    run_id: str  # backup run id, restore id or verify id
    stage: Stage
    bytes_in: int  # plaintext dump bytes read (backup) / artifact bytes read (restore)
    bytes_out: int  # artifact bytes written (backup) / dump bytes fed to the engine (restore)
    rate_bps: float
    at: AwareDatetime


class HeldKey(BaseModel):
    model_config = ConfigDict(frozen=True)

    key_id: str
    fingerprint: str  # hex, see docs/backup-keys.md


class Heartbeat(Message):
    agent_id: str
    version: str
    engines: list[Engine] = Field(default_factory=list)
    storages: list[StorageKind] = Field(default_factory=list)
    running: list[str] = Field(default_factory=list)
    # dump/restore tools found at start-up: name → version ("pg_dump" → "15.18"); absent = not found
    tools: dict[str, str] = Field(default_factory=dict)
    at: AwareDatetime
    # customer-held backup keys in the agent's keyring (ids and fingerprints, never key material)
    keys: list[HeldKey] = Field(default_factory=list)


# ---------------------------------------------------------------- domain events (EVENTS)


NotifyKind = Literal["email", "webhook", "slack"]


class NotifyTarget(BaseModel):
    """Whom to tell, attached by the API so the notifier needs no database of its own.

    `recipients` are email addresses (email channels). A webhook's URL and signing secret, and a
    Slack incoming-webhook URL (itself a credential), travel sealed to the notifier's X25519 key with
    `seal_info("notify", f"{event_id}:{channel_id}")`: `{"url": ..., "secret": ...}`.
    """

    model_config = ConfigDict(frozen=True)

    channel_id: str
    channel_name: str
    kind: NotifyKind
    recipients: list[str] = Field(default_factory=list)
    secrets: Sealed | None = None


class DomainEvent(Message):
    """A fact the API has committed. `type` is also the subject, e.g. `backup.completed`."""

    event_id: str
    type: str
    org_id: str
    occurred_at: AwareDatetime
    notify: list[NotifyTarget] = Field(default_factory=list)
    link: str | None = None  # where a person sees the details (API URL of the run)


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
    storage_name: str | None = None
    error: str | None = None


class RestoreEvent(DomainEvent):
    restore_id: str
    backup_run_id: str
    job_id: str | None = None
    job_name: str | None = None
    database_id: str
    database_name: str
    status: RunStatus
    duration_ms: int | None = None
    error: str | None = None


class VerifyEvent(DomainEvent):
    """`verify.completed` / `verify.failed`."""

    verify_id: str
    backup_run_id: str
    job_id: str | None = None
    job_name: str | None = None
    database_id: str
    database_name: str
    level: VerifyLevel
    status: Literal["completed", "failed"]
    duration_ms: int | None = None
    tables_compared: int = 0
    mismatches: list[TableCheck] = Field(default_factory=list)
    error: str | None = None


class OverdueEvent(DomainEvent):
    """`backup.overdue`: a scheduled job has had no successful backup by `expected_by`."""

    job_id: str
    job_name: str
    database_id: str
    database_name: str
    cron: str
    timezone: str
    last_success_at: AwareDatetime | None = None
    expected_by: AwareDatetime


class PresenceEvent(DomainEvent):
    agent_id: str
    agent_name: str
    online: bool


EVENT_MODELS: dict[str, type[DomainEvent]] = {
    **dict.fromkeys(("backup.started", "backup.completed", "backup.partial", "backup.failed"), BackupEvent),
    "backup.overdue": OverdueEvent,
    **dict.fromkeys(("restore.started", "restore.completed", "restore.failed"), RestoreEvent),
    **dict.fromkeys(("presence.online", "presence.offline"), PresenceEvent),
    **dict.fromkeys(("verify.completed", "verify.failed"), VerifyEvent),
}


def parse_event(data: bytes) -> DomainEvent:
    """Decode an EVENTS message into its model by its `type` (unknown types: the base model)."""
    base = DomainEvent.model_validate_json(data)
    model = EVENT_MODELS.get(base.type, DomainEvent)
    return model.model_validate_json(data)


# ---------------------------------------------------------------- scheduling (KV SCHEDULES, stream CONTROL)

ScheduleKind = Literal["backup", "verify"]


def schedule_key(kind: ScheduleKind, job_id: str) -> str:
    """Key in the SCHEDULES bucket, e.g. `backup.<job id>`."""
    return f"{kind}.{job_id}"


class ScheduleEntry(Message):
    """Value in KV SCHEDULES. The API writes it whenever a job's schedule changes (deleted job or
    removed schedule: the key is deleted); the scheduler watches the bucket and nothing else.

    `cron` is a standard 5-field crontab expression (day of week 0 or 7 = Sunday) evaluated in the
    IANA `timezone`, as the API validated it.
    """

    kind: ScheduleKind = "backup"
    job_id: str
    org_id: str
    cron: str
    timezone: str
    enabled: bool = True
    updated_at: AwareDatetime


class BackupRequested(Message):
    """Scheduler → API (stream CONTROL), deduplicated by `Nats-Msg-Id = sched:<job id>:<fire time>`.

    `missed=True`: the scheduler was down at `fire_time` (and `missed_fires` times in all since its
    last fire) beyond the grace period; the API records a visible `missed` run instead of running.
    """

    job_id: str
    org_id: str
    fire_time: AwareDatetime
    missed: bool = False
    missed_fires: int = 0


class VerifyRequested(BackupRequested):
    """Scheduler → API (`verify.requested`): verify the job's latest successful backup now."""


def scheduled_msg_id(kind: ScheduleKind, job_id: str, fire_time: datetime) -> str:
    """`Nats-Msg-Id` of a scheduled request: every replica computes the same one for the same fire
    (the fire time in UTC, to the second, e.g. `sched:<job id>:2026-03-29T01:00:00Z`)."""
    prefix = "sched" if kind == "backup" else "sched-verify"
    stamp = fire_time.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{prefix}:{job_id}:{stamp}"
