"""Backup jobs, their runs (history) and restores."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from pydantic import Field as PydanticField
from sqlalchemy import JSON, BigInteger, Index, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel

from rahatback_api.backups.schedule import check_cron, check_timezone
from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow
from rahatback_api.keys.models import KeyCustody

Compression = Literal["zstd", "gzip", "none"]
# skipped: a scheduled fire found the job still running; missed: the scheduler was down at fire time
RunStatus = Literal["queued", "running", "completed", "partial", "failed", "skipped", "missed"]
RestoreStatus = Literal["queued", "running", "completed", "failed"]
Trigger = Literal["manual", "schedule"]
VerifyLevel = Literal["integrity", "test_restore"]

T = TypeVar("T")

# (min, max, default) level per compression
COMPRESSION_LEVELS: dict[str, tuple[int, int, int] | None] = {
    "zstd": (1, 19, 3),
    "gzip": (1, 9, 6),
    "none": None,
}


class BackupJob(SQLModel, table=True):
    __tablename__ = "backup_jobs"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    database_id: str = Field(foreign_key="databases.id", index=True, max_length=ID_LENGTH)
    storage_id: str = Field(foreign_key="storages.id", index=True, max_length=ID_LENGTH)
    # more copies of every backup, written at once from the same dump (the 3-2-1 rule)
    extra_storage_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    # whole-server job: every database the server lists at run time (system databases never),
    # narrowed by glob patterns; each database is its own run, artifact and manifest
    all_databases: bool = False
    include_databases: list[str] = Field(default_factory=list, sa_type=JSON)  # empty = all
    exclude_databases: list[str] = Field(default_factory=list, sa_type=JSON)
    compression: str = Field(default="zstd", max_length=8)
    compression_level: int | None = None
    encryption_enabled: bool = True
    key_id: str = Field(max_length=80)  # f"{job id}:{generation}"
    # "customer": key_id names a key kept only in the agent's keyring (rahatback_api.keys)
    key_custody: str = Field(default="managed", max_length=16)
    # the 32-byte job key under the master key (SecretBox, AAD f"job-key:{job id}")
    cron: str | None = Field(default=None, max_length=120)
    timezone: str = Field(default="UTC", max_length=64)
    enabled: bool = True
    # when cron/timezone/enabled last changed: the dead-man alert's clock starts here or at a success
    schedule_set_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # retention (all empty = keep everything); a backup is kept if any rule keeps it
    keep_last: int | None = None
    keep_days: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None
    last_run_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_run_status: str | None = Field(default=None, max_length=16)
    last_success_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # set when `backup.overdue` was raised, cleared by the next success
    overdue_since: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_prune_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_prune_error: str | None = Field(default=None, sa_type=Text)
    # scheduled verification of the latest successful backup (same time zone as the backups)
    verify_cron: str | None = Field(default=None, max_length=120)
    verify_level: str = Field(default="integrity", max_length=16)
    last_verified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # any outcome
    last_verify_status: str | None = Field(default=None, max_length=16)
    last_verify_ok_at: datetime | None = Field(default=None, sa_type=UTCDateTime)  # last that passed
    last_verify_id: str | None = Field(default=None, max_length=ID_LENGTH)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BackupKey(SQLModel, table=True):
    """A managed backup key (wraps each artifact's data key). Kept apart from its job so that
    deleting or re-keying a job never makes its old backups unrestorable."""

    __tablename__ = "backup_keys"

    id: str = Field(
        primary_key=True, max_length=80
    )  # the key id written in artifacts: f"{job id}:{generation}"
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    job_id: str = Field(index=True, max_length=ID_LENGTH)  # no FK: outlives the job
    # SecretBox ciphertext (AAD f"backup-key:{id}") of the 32 raw key bytes
    key_encrypted: str = Field(sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


ACTIVE_RUN_STATUSES = ("queued", "running")


class BackupRun(SQLModel, table=True):
    """One backup attempt. Deliberately no foreign keys to jobs/databases/storages: history outlives
    the job (a deleted job's runs keep its id) and must never block deleting configuration."""

    __tablename__ = "backup_runs"
    __table_args__ = (
        Index("ix_backup_runs_org_queued", "org_id", "queued_at"),
        Index("ix_backup_runs_org_job_queued", "org_id", "job_id", "queued_at"),
        Index("ix_backup_runs_org_database_queued", "org_id", "database_id", "queued_at"),
        Index("ix_backup_runs_org_status_queued", "org_id", "status", "queued_at"),
        Index("ix_backup_runs_status_progress", "status", "last_progress_at"),  # stall watchdog
        # at most one queued/running run per job (per database of a whole-server job), even when
        # two "run now" requests race
        Index(
            "uq_backup_runs_active_job",
            "job_id",
            "database_name",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", max_length=ID_LENGTH)
    job_id: str | None = Field(default=None, max_length=ID_LENGTH)
    database_id: str = Field(max_length=ID_LENGTH)
    # the database dumped, when a whole-server job chose it ("" = the one the connection names)
    database_name: str = Field(default="", max_length=128)
    # the runs one start of a whole-server job made, one per database
    batch_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    storage_id: str = Field(max_length=ID_LENGTH)
    agent_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    trigger: str = Field(default="manual", max_length=16)
    status: str = Field(default="queued", max_length=16)
    queued_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_ms: int | None = Field(default=None, sa_type=BigInteger)
    dump_size: int | None = Field(default=None, sa_type=BigInteger)
    artifact_size: int | None = Field(default=None, sa_type=BigInteger)
    dump_sha256: str | None = Field(default=None, max_length=64)
    artifact_sha256: str | None = Field(default=None, max_length=64)
    storage_key: str | None = Field(default=None, sa_type=Text)
    manifest_key: str | None = Field(default=None, sa_type=Text)
    compression: str | None = Field(default=None, max_length=8)
    encrypted: bool = True
    key_id: str | None = Field(default=None, max_length=80)
    key_custody: str | None = Field(default=None, max_length=16)  # managed | customer; None: unencrypted
    server_version: str | None = Field(default=None, max_length=255)
    dump_format: str | None = Field(default=None, max_length=32)
    agent_version: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_type=Text)
    stage: str | None = Field(default=None, max_length=32)
    bytes_done: int | None = Field(default=None, sa_type=BigInteger)
    last_progress_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_restore_status: str | None = Field(default=None, max_length=16)
    last_restore_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # the job's extra storages when the run started (each gets a copy; see BackupCopy)
    extra_storage_ids: list[str] = Field(default_factory=list, sa_type=JSON)
    # retention: when the last copy's files were deleted, or why a deletion failed
    pruned_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    prune_error: str | None = Field(default=None, sa_type=Text)


class BackupCopy(SQLModel, table=True):
    """One storage's copy of a backup run. Restore and verify may use any completed copy; retention
    deletes copies storage by storage."""

    __tablename__ = "backup_copies"
    __table_args__ = (UniqueConstraint("run_id", "storage_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    run_id: str = Field(foreign_key="backup_runs.id", index=True, max_length=ID_LENGTH)
    job_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    storage_id: str = Field(index=True, max_length=ID_LENGTH)  # no FK: history outlives storages
    status: str = Field(max_length=16)  # completed | failed
    storage_key: str | None = Field(default=None, sa_type=Text)
    manifest_key: str | None = Field(default=None, sa_type=Text)
    error: str | None = Field(default=None, sa_type=Text)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    prune_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    pruned_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    prune_error: str | None = Field(default=None, sa_type=Text)


class PruneRun(SQLModel, table=True):
    """One retention pass sent to an agent: which files of which runs it must delete."""

    __tablename__ = "prune_runs"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    job_id: str = Field(index=True, max_length=ID_LENGTH)  # no FK: outlives the job
    storage_id: str = Field(max_length=ID_LENGTH)
    agent_id: str = Field(max_length=ID_LENGTH)
    status: str = Field(default="queued", max_length=16)  # queued | completed | partial | failed
    items: int = 0
    deleted: int = 0
    requested_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    error: str | None = Field(default=None, sa_type=Text)


class VerifyRun(SQLModel, table=True):
    """One verification of one copy of a backup: integrity, or a test restore into a scratch database."""

    __tablename__ = "verify_runs"
    __table_args__ = (
        Index("ix_verify_runs_org_queued", "org_id", "queued_at"),
        # one verification of a backup at a time
        Index(
            "uq_verify_runs_active_backup",
            "backup_run_id",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", max_length=ID_LENGTH)
    backup_run_id: str = Field(foreign_key="backup_runs.id", index=True, max_length=ID_LENGTH)
    job_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    database_id: str = Field(max_length=ID_LENGTH)
    storage_id: str = Field(max_length=ID_LENGTH)  # the copy verified
    agent_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    level: str = Field(max_length=16)
    trigger: str = Field(default="manual", max_length=16)
    status: str = Field(default="queued", max_length=16)  # queued | running | completed | failed
    queued_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_ms: int | None = Field(default=None, sa_type=BigInteger)
    artifact_sha256_ok: bool | None = None
    dump_sha256_ok: bool | None = None
    tables_compared: int = 0
    mismatches: list[dict[str, Any]] = Field(default_factory=list, sa_type=JSON)
    error: str | None = Field(default=None, sa_type=Text)
    last_progress_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class RestoreRun(SQLModel, table=True):
    __tablename__ = "restore_runs"
    __table_args__ = (
        Index("ix_restore_runs_org_queued", "org_id", "queued_at"),
        # two restores into one database at once would interleave: at most one queued/running
        Index(
            "uq_restore_runs_active_database",
            "database_id",
            unique=True,
            sqlite_where=text("status IN ('queued', 'running')"),
            postgresql_where=text("status IN ('queued', 'running')"),
        ),
    )

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", max_length=ID_LENGTH)
    backup_run_id: str = Field(foreign_key="backup_runs.id", index=True, max_length=ID_LENGTH)
    database_id: str = Field(index=True, max_length=ID_LENGTH)  # the restore target
    storage_id: str | None = Field(default=None, max_length=ID_LENGTH)  # the copy restored from
    agent_id: str | None = Field(default=None, index=True, max_length=ID_LENGTH)
    status: str = Field(default="queued", max_length=16)
    queued_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    duration_ms: int | None = Field(default=None, sa_type=BigInteger)
    bytes_restored: int | None = Field(default=None, sa_type=BigInteger)
    error: str | None = Field(default=None, sa_type=Text)
    last_progress_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# --- HTTP schemas -------------------------------------------------------------------------------


class _ScheduleFields(BaseModel):
    @field_validator("cron", "verify_cron", check_fields=False)
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else check_cron(value)

    @field_validator("timezone", check_fields=False)
    @classmethod
    def _timezone(cls, value: str | None) -> str | None:
        return None if value is None else check_timezone(value)


class RetentionPolicy(BaseModel):
    """Which successful backups to keep; the others are deleted from storage after each success.

    A backup is kept if ANY rule keeps it; with no rule set everything is kept. The newest
    successful backup is always kept. Daily/weekly/monthly/yearly keep the newest backup of each of
    the last K days/ISO weeks/months/years that have one, counted in the job's time zone.
    """

    model_config = ConfigDict(extra="forbid")

    keep_last: int | None = PydanticField(default=None, ge=1, le=10_000)
    keep_days: int | None = PydanticField(default=None, ge=1, le=36_500)
    keep_daily: int | None = PydanticField(default=None, ge=1, le=10_000)
    keep_weekly: int | None = PydanticField(default=None, ge=1, le=10_000)
    keep_monthly: int | None = PydanticField(default=None, ge=1, le=10_000)
    keep_yearly: int | None = PydanticField(default=None, ge=1, le=1_000)


RETENTION_FIELDS = tuple(RetentionPolicy.model_fields)

# fnmatch globs against database names, e.g. "shop_*", "*_test", "tenant_[0-9]*"
DatabasePatterns = list[Annotated[str, PydanticField(min_length=1, max_length=128)]]
MAX_PATTERNS = 50


class BackupJobCreate(_ScheduleFields):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str = PydanticField(min_length=1, max_length=200)
    database_id: str
    storage_id: str
    extra_storage_ids: list[str] = PydanticField(default_factory=list, max_length=4)
    all_databases: bool = False
    include_databases: DatabasePatterns = PydanticField(default_factory=list, max_length=MAX_PATTERNS)
    exclude_databases: DatabasePatterns = PydanticField(default_factory=list, max_length=MAX_PATTERNS)
    compression: Compression = "zstd"
    compression_level: int | None = None  # default depends on compression
    encryption_enabled: bool = True
    # customer: the key stays on the job's agent (`rahatback-agent keys create`), docs/backup-keys.md
    key_custody: KeyCustody = "managed"
    customer_key_id: str | None = PydanticField(default=None, min_length=1, max_length=80)
    cron: str | None = None
    timezone: str = "UTC"
    enabled: bool = True
    retention: RetentionPolicy = PydanticField(default_factory=RetentionPolicy)
    verify_cron: str | None = None
    verify_level: VerifyLevel = "integrity"


class BackupJobUpdate(_ScheduleFields):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str | None = PydanticField(default=None, min_length=1, max_length=200)
    database_id: str | None = None
    storage_id: str | None = None
    extra_storage_ids: list[str] | None = PydanticField(default=None, max_length=4)
    all_databases: bool | None = None
    include_databases: DatabasePatterns | None = PydanticField(default=None, max_length=MAX_PATTERNS)
    exclude_databases: DatabasePatterns | None = PydanticField(default=None, max_length=MAX_PATTERNS)
    compression: Compression | None = None
    compression_level: int | None = None
    encryption_enabled: bool | None = None
    cron: str | None = None  # send null to remove the schedule
    timezone: str | None = None
    enabled: bool | None = None
    retention: RetentionPolicy | None = None  # replaces the whole policy; {} keeps everything
    verify_cron: str | None = None  # send null to stop scheduled verification
    verify_level: VerifyLevel | None = None


class BackupJobPublic(BaseModel):
    id: str
    name: str
    database_id: str
    storage_id: str
    extra_storage_ids: list[str]
    all_databases: bool
    include_databases: list[str]
    exclude_databases: list[str]
    compression: Compression
    compression_level: int | None
    encryption_enabled: bool
    key_id: str
    key_custody: KeyCustody = "managed"
    customer_key_id: str | None = None  # = key_id when the key is customer-held

    @model_validator(mode="after")
    def _customer_key_id(self) -> BackupJobPublic:
        self.customer_key_id = self.key_id if self.key_custody == "customer" else None
        return self

    cron: str | None
    timezone: str
    enabled: bool
    retention: RetentionPolicy
    last_run_at: datetime | None
    last_run_status: str | None
    last_success_at: datetime | None
    overdue_since: datetime | None
    last_prune_at: datetime | None
    last_prune_error: str | None
    verify_cron: str | None
    verify_level: VerifyLevel
    last_verified_at: datetime | None
    last_verify_status: str | None
    last_verify_ok_at: datetime | None
    last_verify_id: str | None
    created_at: datetime
    updated_at: datetime


class BackupKeyExport(BaseModel):
    key_id: str
    key_b64: str


class BackupRunPublic(BaseModel):
    id: str
    job_id: str | None
    database_id: str
    database_name: str
    batch_id: str | None
    storage_id: str
    agent_id: str | None
    trigger: str
    status: str
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    dump_size: int | None
    artifact_size: int | None
    dump_sha256: str | None
    artifact_sha256: str | None
    storage_key: str | None
    manifest_key: str | None
    compression: str | None
    encrypted: bool
    key_id: str | None
    key_custody: str | None = None
    server_version: str | None
    dump_format: str | None
    agent_version: str | None
    error: str | None
    stage: str | None
    bytes_done: int | None
    last_progress_at: datetime | None
    last_restore_status: str | None
    last_restore_at: datetime | None
    pruned_at: datetime | None
    prune_error: str | None
    copies: list[BackupCopyPublic] = PydanticField(default_factory=list)


class TableCheckPublic(BaseModel):
    table: str
    expected: int | None
    found: int | None


class VerifyRunPublic(BaseModel):
    id: str
    backup_run_id: str
    job_id: str | None
    database_id: str
    storage_id: str
    agent_id: str | None
    level: VerifyLevel
    trigger: str
    status: str
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    artifact_sha256_ok: bool | None
    dump_sha256_ok: bool | None
    tables_compared: int
    mismatches: list[TableCheckPublic]
    error: str | None


class BackupCopyPublic(BaseModel):
    storage_id: str
    status: str
    storage_key: str | None
    manifest_key: str | None
    error: str | None
    pruned_at: datetime | None
    prune_error: str | None


class RestoreRunPublic(BaseModel):
    id: str
    backup_run_id: str
    database_id: str
    storage_id: str | None
    agent_id: str | None
    status: str
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_ms: int | None
    bytes_restored: int | None
    error: str | None
    last_progress_at: datetime | None


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
