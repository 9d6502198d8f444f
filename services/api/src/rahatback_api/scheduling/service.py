"""Scheduled work: run what the scheduler requests, and raise `backup.overdue` when a scheduled
job has gone too long without a successful backup. (How schedules reach the scheduler: `kv.py`.)"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog
from croniter import croniter  # type: ignore[import-untyped]  # croniter ships no type hints
from rahatback_contracts import messages as m
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.columns import new_id, utcnow
from rahatback_api.databases.models import Database
from rahatback_api.errors import AppError
from rahatback_api.messaging.bus import Bus
from rahatback_api.models import BackupJob, BackupRun, ProcessedMessage
from rahatback_api.notifications.service import enqueue_event
from rahatback_api.operations import service as operations
from rahatback_api.security.secretbox import SecretBox

log = structlog.get_logger(__name__)


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first fire strictly after `after` (aware), as the scheduler computes it."""
    start = after.astimezone(ZoneInfo(timezone))
    fire: datetime = croniter(cron, start).get_next(datetime)
    return fire


# ---------------------------------------------------------------------------------- requests


async def handle_backup_requested(
    session: AsyncSession,
    box: SecretBox,
    bus: Bus,
    request: m.BackupRequested,
    msg_id: str,
    *,
    offline_after: timedelta,
) -> BackupRun | None:
    """Run a scheduled job like "run now"; record a visible run when it cannot start. Idempotent."""
    if await session.get(ProcessedMessage, msg_id) is not None:
        return None
    run = await _start_scheduled(session, box, bus, request, offline_after)
    # written last: until here the transaction only reads, so on SQLite (WAL) a whole-server job's
    # listing (a round trip to its agent, up to the RPC timeout) holds no write lock
    session.add(ProcessedMessage(msg_id=msg_id, processed_at=utcnow()))
    return run


async def _start_scheduled(
    session: AsyncSession,
    box: SecretBox,
    bus: Bus,
    request: m.BackupRequested,
    offline_after: timedelta,
) -> BackupRun | None:
    job = await session.get(BackupJob, request.job_id)
    if job is None or job.org_id != request.org_id or job.cron is None or not job.enabled:
        log.info(
            "schedule.request_ignored", job_id=request.job_id, reason="job deleted, unscheduled or disabled"
        )
        return None
    if request.missed:
        return await _record_unstarted(
            session,
            job,
            "missed",
            f"the scheduler was not running at {request.fire_time.isoformat()} "
            f"({request.missed_fires or 1} scheduled run(s) missed); the next run follows the schedule",
            request.fire_time,
        )
    try:
        runs = await operations.start_backup(
            session, box, bus, job, trigger="schedule", offline_after=offline_after
        )
        return runs[0]
    except AppError as exc:  # a 409 (busy, offline, nothing to back up), or the agent not answering
        active = await operations.active_backup_of(session, job.id)
        if active is not None:
            return await _record_unstarted(
                session,
                job,
                "skipped",
                f"skipped: the previous run ({active}) was still running at {request.fire_time.isoformat()}",
                request.fire_time,
            )
        # e.g. no agent online: a scheduled backup that cannot run is a failure someone must hear of
        run = await _record_unstarted(session, job, "failed", exc.message, request.fire_time)
        await operations.enqueue_backup_event(session, run, "backup.failed")
        return run


async def _record_unstarted(
    session: AsyncSession, job: BackupJob, status: str, reason: str, fire_time: datetime
) -> BackupRun:
    now = utcnow()
    run = BackupRun(
        id=new_id(),
        org_id=job.org_id,
        job_id=job.id,
        database_id=job.database_id,
        storage_id=job.storage_id,
        trigger="schedule",
        status=status,
        queued_at=fire_time,
        finished_at=now,
        compression=job.compression,
        encrypted=job.encryption_enabled,
        error=reason,
    )
    session.add(run)
    if status == "failed":
        job.last_run_at, job.last_run_status = now, status
    await session.flush()
    log.warning("schedule.run_not_started", job_id=job.id, status=status, reason=reason)
    return run


# ---------------------------------------------------------------------------------- dead man


def overdue_deadline(job: BackupJob, grace: timedelta) -> datetime | None:
    """When `backup.overdue` fires: the first scheduled time after the last success (or after the
    schedule was set), plus the grace. None for unscheduled or disabled jobs."""
    if job.cron is None or not job.enabled:
        return None
    since = max(filter(None, (job.last_success_at, job.schedule_set_at)))
    return next_fire(job.cron, job.timezone, since) + grace


async def sweep_overdue(session: AsyncSession, grace: timedelta) -> int:
    """Raise `backup.overdue` once per lapse; a success clears it. Returns how many were raised."""
    moment = utcnow()
    jobs: Sequence[BackupJob] = (
        (
            await session.execute(
                select(BackupJob)
                .where(col(BackupJob.cron).is_not(None), col(BackupJob.enabled).is_(True))
                .where(col(BackupJob.overdue_since).is_(None))
                .with_for_update(skip_locked=True)
            )
        )
        .scalars()
        .all()
    )
    raised = 0
    for job in jobs:
        deadline = overdue_deadline(job, grace)
        if deadline is None or moment <= deadline:
            continue
        job.overdue_since = moment
        db = await session.get(Database, job.database_id)
        event = m.OverdueEvent(
            event_id=new_id(),
            type="backup.overdue",
            org_id=job.org_id,
            occurred_at=moment,
            job_id=job.id,
            job_name=job.name,
            database_id=job.database_id,
            database_name=db.name if db else "(deleted database)",
            cron=job.cron or "",
            timezone=job.timezone,
            last_success_at=job.last_success_at,
            expected_by=deadline - grace,
        )
        stamp = deadline.isoformat()
        await enqueue_event(
            session,
            event,
            f"{job.id}:backup.overdue:{stamp}",
            job_id=job.id,
            link_path=f"/v1/backups/jobs/{job.id}",
        )
        raised += 1
        log.warning("job.overdue", job_id=job.id, expected_by=(deadline - grace).isoformat())
    return raised
