"""Backup jobs (with their managed encryption keys), run history and restores."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from rahatback_api.backups.models import (
    ACTIVE_RUN_STATUSES,
    COMPRESSION_LEVELS,
    RETENTION_FIELDS,
    BackupCopy,
    BackupCopyPublic,
    BackupJob,
    BackupJobCreate,
    BackupJobPublic,
    BackupJobUpdate,
    BackupKey,
    BackupRun,
    BackupRunPublic,
    RestoreRun,
    RestoreRunPublic,
    RetentionPolicy,
)
from rahatback_api.columns import new_id, utcnow
from rahatback_api.databases.engines import SERVER_ENGINES
from rahatback_api.databases.models import Database
from rahatback_api.databases.service import get_database
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.keys.custody import check_job_customer_key
from rahatback_api.scheduling.kv import enqueue_schedule
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.settings_schemas import invalid_field
from rahatback_api.storages.models import Storage
from rahatback_api.storages.service import get_storage

JOB_KEY_BYTES = 32


# --- job keys -----------------------------------------------------------------------------------


def _key_aad(key_id: str) -> bytes:
    return f"backup-key:{key_id}".encode()


def new_backup_key(session: AsyncSession, box: SecretBox, job: BackupJob, generation: int = 1) -> None:
    """Give the job a fresh key; earlier keys stay stored so older backups remain restorable."""
    key_id = f"{job.id}:{generation}"
    raw = secrets.token_bytes(JOB_KEY_BYTES)
    session.add(
        BackupKey(
            id=key_id, org_id=job.org_id, job_id=job.id, key_encrypted=box.encrypt(raw, _key_aad(key_id))
        )
    )
    job.key_id = key_id


async def load_backup_key(session: AsyncSession, box: SecretBox, org_id: str, key_id: str) -> bytes:
    """The 32-byte key with this id (it wraps each artifact's data key)."""
    key = await session.get(BackupKey, key_id)
    if key is None or key.org_id != org_id:
        raise Conflict(
            f"backup key {key_id!r} is not available; the backups made with it cannot be decrypted here"
        )
    return box.decrypt(key.key_encrypted, _key_aad(key_id))


# --- jobs ---------------------------------------------------------------------------------------


def job_public(job: BackupJob) -> BackupJobPublic:
    retention = RetentionPolicy(**{name: getattr(job, name) for name in RETENTION_FIELDS})
    return BackupJobPublic.model_validate({**job.model_dump(), "retention": retention}, from_attributes=True)


def _set_retention(job: BackupJob, policy: RetentionPolicy) -> None:
    for name in RETENTION_FIELDS:
        setattr(job, name, getattr(policy, name))


def _resolve_level(compression: str, level: int | None) -> int | None:
    bounds = COMPRESSION_LEVELS[compression]
    if bounds is None:
        if level is not None:
            raise invalid_field(("compression_level",), "must be empty when compression is 'none'")
        return None
    low, high, default = bounds
    if level is None:
        return default
    if not low <= level <= high:
        raise invalid_field(
            ("compression_level",), f"{compression} levels go from {low} to {high}", "less_than_equal"
        )
    return level


async def _check_targets(
    session: AsyncSession, org_id: str, database_id: str, storage_id: str, extra_storage_ids: list[str]
) -> None:
    async def owned(getter: Any, ident: str, field: str) -> Any:
        try:
            return await getter(session, org_id, ident)
        except NotFound:
            what = "storage" if field == "extra_storage_ids" else field.removesuffix("_id")
            raise AppError(f"no such {what} {ident!r} in this organization", 422, field=field) from None

    database: Database = await owned(get_database, database_id, "database_id")
    storage: Storage = await owned(get_storage, storage_id, "storage_id")
    if storage_id in extra_storage_ids or len(set(extra_storage_ids)) != len(extra_storage_ids):
        raise AppError("each storage may hold only one copy: list it once", 422, field="extra_storage_ids")
    extras: list[Storage] = [await owned(get_storage, s, "extra_storage_ids") for s in extra_storage_ids]
    # one agent dumps once and writes every copy: every agent-bound target must name the same agent
    agents = {a for a in (database.agent_id, storage.agent_id, *(s.agent_id for s in extras)) if a}
    if len(agents) > 1:
        reference = database.agent_id or storage.agent_id
        primary_differs = storage.agent_id is not None and storage.agent_id != reference
        raise AppError(
            "the database and the storages are bound to different agents; one agent must reach all",
            422,
            field="storage_id" if primary_differs else "extra_storage_ids",
        )


async def _set_database_selection(
    session: AsyncSession,
    job: BackupJob,
    all_databases: bool,
    include: list[str],
    exclude: list[str],
) -> None:
    """Whole-server jobs need a server engine; patterns only mean something for them."""
    if all_databases:
        database = await session.get(Database, job.database_id)
        if database is not None and database.engine not in SERVER_ENGINES:
            raise AppError(
                f"a {database.engine} database is a single database: whole-server backups need one of "
                + ", ".join(sorted(SERVER_ENGINES)),
                422,
                field="all_databases",
            )
    elif include or exclude:
        field = "include_databases" if include else "exclude_databases"
        raise AppError(
            f"{field} selects databases of a whole-server job: set all_databases to true", 422, field=field
        )
    job.all_databases = all_databases
    job.include_databases, job.exclude_databases = list(include), list(exclude)


async def _check_name_free(
    session: AsyncSession, org_id: str, name: str, exclude_id: str | None = None
) -> None:
    query = select(BackupJob.id).where(BackupJob.org_id == org_id, BackupJob.name == name)
    if exclude_id is not None:
        query = query.where(BackupJob.id != exclude_id)
    if (await session.execute(query)).first() is not None:
        raise Conflict(f"a backup job named {name!r} already exists", field="name")


async def create_job(session: AsyncSession, box: SecretBox, org_id: str, data: BackupJobCreate) -> BackupJob:
    level = _resolve_level(data.compression, data.compression_level)
    await _check_targets(session, org_id, data.database_id, data.storage_id, data.extra_storage_ids)
    await _check_name_free(session, org_id, data.name)
    job = BackupJob(
        id=new_id(),
        org_id=org_id,
        name=data.name,
        database_id=data.database_id,
        storage_id=data.storage_id,
        extra_storage_ids=data.extra_storage_ids,
        compression=data.compression,
        compression_level=level,
        encryption_enabled=data.encryption_enabled,
        cron=data.cron,
        timezone=data.timezone,
        enabled=data.enabled,
        key_id="",
    )
    _set_retention(job, data.retention)
    await _set_database_selection(
        session, job, data.all_databases, data.include_databases, data.exclude_databases
    )
    job.verify_cron, job.verify_level = data.verify_cron, data.verify_level
    if data.key_custody == "customer":  # the key stays on the agent: nothing to generate here
        job.key_id = (await check_job_customer_key(session, job, data.customer_key_id)).key_id
        job.key_custody = "customer"
    elif data.customer_key_id is not None:
        raise AppError("customer_key_id is only for key_custody 'customer'", 422, field="customer_key_id")
    else:
        new_backup_key(session, box, job)
    session.add(job)
    if job.cron is not None or job.verify_cron is not None:
        enqueue_schedule(session, job)
    await session.flush()
    return job


async def list_jobs(session: AsyncSession, org_id: str) -> list[BackupJob]:
    result = await session.execute(
        select(BackupJob).where(BackupJob.org_id == org_id).order_by(col(BackupJob.name))
    )
    return list(result.scalars())


async def get_job(session: AsyncSession, org_id: str, job_id: str) -> BackupJob:
    job = (
        await session.execute(select(BackupJob).where(BackupJob.id == job_id, BackupJob.org_id == org_id))
    ).scalar_one_or_none()
    if job is None:
        raise NotFound("backup job")
    return job


async def update_job(session: AsyncSession, org_id: str, job_id: str, data: BackupJobUpdate) -> BackupJob:
    job = await get_job(session, org_id, job_id)
    fields = data.model_fields_set
    for required in (
        "name",
        "database_id",
        "storage_id",
        "compression",
        "encryption_enabled",
        "timezone",
        "enabled",
        "all_databases",
        "include_databases",
        "exclude_databases",
    ):
        if required in fields and getattr(data, required) is None:
            raise invalid_field((required,), "cannot be null")
    if data.name is not None and data.name != job.name:
        await _check_name_free(session, org_id, data.name, exclude_id=job.id)
        job.name = data.name
    if data.database_id is not None or data.storage_id is not None or data.extra_storage_ids is not None:
        database_id = data.database_id or job.database_id
        storage_id = data.storage_id or job.storage_id
        extras = job.extra_storage_ids if data.extra_storage_ids is None else data.extra_storage_ids
        await _check_targets(session, org_id, database_id, storage_id, list(extras))
        job.database_id, job.storage_id, job.extra_storage_ids = database_id, storage_id, list(extras)
        if job.key_custody == "customer":  # the new targets' agent must hold the job's key too
            await check_job_customer_key(session, job, job.key_id)
    if fields & {"database_id", "all_databases", "include_databases", "exclude_databases"}:
        await _set_database_selection(
            session,
            job,
            job.all_databases if data.all_databases is None else data.all_databases,
            job.include_databases if data.include_databases is None else data.include_databases,
            job.exclude_databases if data.exclude_databases is None else data.exclude_databases,
        )
    if data.compression is not None or "compression_level" in fields:
        compression = data.compression or job.compression
        # changing the algorithm without a level takes that algorithm's default level
        level = data.compression_level if "compression_level" in fields else None
        if "compression_level" not in fields and compression == job.compression:
            level = job.compression_level
        job.compression_level = _resolve_level(compression, level)
        job.compression = compression
    if data.encryption_enabled is not None:
        job.encryption_enabled = data.encryption_enabled
    if data.retention is not None:
        _set_retention(job, data.retention)
    if data.verify_level is not None:
        job.verify_level = data.verify_level
    schedule_before = (job.cron, job.verify_cron, job.timezone, job.enabled)
    if "verify_cron" in fields:
        job.verify_cron = data.verify_cron
    if "cron" in fields:
        job.cron = data.cron
    if data.timezone is not None:
        job.timezone = data.timezone
    if data.enabled is not None:
        job.enabled = data.enabled
    job.updated_at = utcnow()
    if (job.cron, job.verify_cron, job.timezone, job.enabled) != schedule_before:
        job.schedule_set_at = job.updated_at
        job.overdue_since = None
        enqueue_schedule(session, job)
    await session.flush()
    return job


async def delete_job(session: AsyncSession, org_id: str, job_id: str) -> None:
    """Removes the job; its runs stay in the history with their job_id, its keys stay stored."""
    job = await get_job(session, org_id, job_id)
    active = (
        await session.execute(
            select(BackupRun.id).where(
                BackupRun.job_id == job.id, col(BackupRun.status).in_(ACTIVE_RUN_STATUSES)
            )
        )
    ).first()
    if active is not None:
        raise Conflict(
            "the job has a queued or running backup; wait for it to finish before deleting the job"
        )
    if job.cron is not None or job.verify_cron is not None:
        enqueue_schedule(session, job, deleted=True)
    await session.delete(job)
    await session.flush()


def run_public(run: BackupRun, copies: Sequence[BackupCopy] = ()) -> BackupRunPublic:
    public = BackupRunPublic.model_validate(run, from_attributes=True)
    public.copies = [BackupCopyPublic.model_validate(c, from_attributes=True) for c in copies]
    return public


async def runs_public(session: AsyncSession, runs: Sequence[BackupRun]) -> list[BackupRunPublic]:
    """Runs with their copies, in one query for the whole page."""
    copies: dict[str, list[BackupCopy]] = {}
    if runs:
        query = select(BackupCopy).where(col(BackupCopy.run_id).in_([r.id for r in runs]))
        for copy in (await session.execute(query)).scalars():
            copies.setdefault(copy.run_id, []).append(copy)
    return [run_public(r, copies.get(r.id, [])) for r in runs]


def restore_public(restore: RestoreRun) -> RestoreRunPublic:
    return RestoreRunPublic.model_validate(restore, from_attributes=True)


# --- history ------------------------------------------------------------------------------------


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class HistoryFilter:
    job_id: str | None = None
    database_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None


async def _page(
    session: AsyncSession, query: SelectOfScalar[Any], limit: int, offset: int
) -> tuple[list[Any], int]:
    total = (await session.execute(select(func.count()).select_from(query.subquery()))).scalar_one()
    items = list((await session.execute(query.limit(limit).offset(offset))).scalars())
    return items, int(total)


async def list_runs(
    session: AsyncSession, org_id: str, filters: HistoryFilter, limit: int, offset: int
) -> tuple[list[BackupRun], int]:
    query = select(BackupRun).where(BackupRun.org_id == org_id)
    if filters.job_id is not None:
        query = query.where(BackupRun.job_id == filters.job_id)
    if filters.database_id is not None:
        query = query.where(BackupRun.database_id == filters.database_id)
    if filters.batch_id is not None:
        query = query.where(BackupRun.batch_id == filters.batch_id)
    if filters.status is not None:
        query = query.where(BackupRun.status == filters.status)
    if (since := _as_utc(filters.since)) is not None:
        query = query.where(BackupRun.queued_at >= since)
    if (until := _as_utc(filters.until)) is not None:
        query = query.where(BackupRun.queued_at < until)
    if since is not None and until is not None and since > until:
        raise AppError("'since' must not be later than 'until'", 422, field="since")
    query = query.order_by(col(BackupRun.queued_at).desc(), col(BackupRun.id).desc())
    return await _page(session, query, limit, offset)


async def get_run(session: AsyncSession, org_id: str, run_id: str) -> BackupRun:
    run = (
        await session.execute(select(BackupRun).where(BackupRun.id == run_id, BackupRun.org_id == org_id))
    ).scalar_one_or_none()
    if run is None:
        raise NotFound("backup run")
    return run


async def list_restores(
    session: AsyncSession,
    org_id: str,
    backup_run_id: str | None,
    database_id: str | None,
    limit: int,
    offset: int,
) -> tuple[list[RestoreRun], int]:
    query = select(RestoreRun).where(RestoreRun.org_id == org_id)
    if backup_run_id is not None:
        query = query.where(RestoreRun.backup_run_id == backup_run_id)
    if database_id is not None:
        query = query.where(RestoreRun.database_id == database_id)
    query = query.order_by(col(RestoreRun.queued_at).desc(), col(RestoreRun.id).desc())
    return await _page(session, query, limit, offset)


async def get_restore(session: AsyncSession, org_id: str, restore_id: str) -> RestoreRun:
    restore = (
        await session.execute(
            select(RestoreRun).where(RestoreRun.id == restore_id, RestoreRun.org_id == org_id)
        )
    ).scalar_one_or_none()
    if restore is None:
        raise NotFound("restore")
    return restore
