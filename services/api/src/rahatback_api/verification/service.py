"""Verification: prove a backup restores. The API picks the copy and the agent; the agent downloads,
authenticates, decompresses and checks the checksums (integrity), and for a test restore also
restores into a scratch database and compares row counts with the manifest."""

from __future__ import annotations

from datetime import timedelta

import structlog
from rahatback_contracts import messages as m
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.columns import new_id, utcnow
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.keys.custody import is_customer_key_id, require_key_held
from rahatback_api.models import BackupJob, BackupRun, Database, ProcessedMessage, Storage, VerifyRun
from rahatback_api.operations import service as operations
from rahatback_api.security.secretbox import SecretBox

log = structlog.get_logger(__name__)


async def active_verify_of(session: AsyncSession, backup_run_id: str) -> str | None:
    query = select(VerifyRun.id).where(
        VerifyRun.backup_run_id == backup_run_id, col(VerifyRun.status).in_(("queued", "running"))
    )
    return (await session.execute(query)).scalars().first()


async def start_verify(
    session: AsyncSession,
    box: SecretBox,
    run: BackupRun,
    *,
    level: m.VerifyLevel,
    offline_after: timedelta,
    storage_id: str | None = None,
    trigger: str = "manual",
) -> VerifyRun:
    busy = await active_verify_of(session, run.id)
    if busy is not None:
        raise Conflict(f"backup run {run.id} is already being verified (verification {busy})")
    copy = await operations.restorable_copy(session, run, storage_id)
    storage = await session.get(Storage, copy.storage_id)
    if storage is None:
        raise Conflict("the storage holding this copy of the backup no longer exists")
    source = await session.get(Database, run.database_id)
    if level == "test_restore" and source is None:
        raise AppError(
            "a test restore needs the backed-up database's server, and that database was deleted;"
            " use level 'integrity'",
            422,
            field="level",
        )
    # a local folder lives on its agent's host; a test restore needs an agent that reaches the server
    preferred = storage.agent_id if storage.kind == "local" else (source.agent_id if source else None)
    agent = await operations.choose_agent(session, run.org_id, preferred or run.agent_id, offline_after)
    if run.encrypted and run.key_id and is_customer_key_id(run.key_id):  # before the row is queued
        await require_key_held(session, agent, run.org_id, run.key_id, "verify")

    verify = VerifyRun(
        id=new_id(),
        org_id=run.org_id,
        backup_run_id=run.id,
        job_id=run.job_id,
        database_id=run.database_id,
        storage_id=storage.id,
        agent_id=agent.id,
        level=level,
        trigger=trigger,
        status="queued",
        queued_at=utcnow(),
    )
    session.add(verify)
    info = m.seal_info("verify", verify.id)
    encryption = None
    if run.encrypted:
        if run.key_id is None:
            raise Conflict(f"backup run {run.id} is encrypted but records no key id")
        encryption = await operations.sealed_key(session, box, agent, run.org_id, run.key_id, info)
    command = m.VerifyCommand(
        **operations.command_envelope(run.org_id),
        verify_id=verify.id,
        backup_run_id=run.id,
        level=level,
        storage=operations.saved_storage_target(box, storage, agent, info),
        storage_key=copy.storage_key or "",
        manifest_key=copy.manifest_key,
        compression=run.compression or "zstd",
        encrypted=run.encrypted,
        artifact_sha256=run.artifact_sha256,
        dump_sha256=run.dump_sha256,
        encryption=encryption,
        database=(
            operations.saved_database_target(box, source, agent, info)
            if level == "test_restore" and source is not None
            else None
        ),
    )
    operations.enqueue_command(session, agent.id, "verify.execute", command, f"{verify.id}:command")
    await session.flush()
    return verify


async def apply_verify_report(
    session: AsyncSession, agent_id: str, report: m.VerifyStarted | m.VerifyCompleted | m.VerifyFailed
) -> bool:
    verify = await session.get(VerifyRun, report.verify_id, with_for_update=True)
    if verify is None or verify.agent_id != agent_id:
        raise operations.UntrustedReport(
            f"agent {agent_id} reported on verification {report.verify_id} it was not given"
        )
    if isinstance(report, m.VerifyStarted):
        if verify.status != "queued":
            return False
        verify.status, verify.started_at, verify.last_progress_at = "running", report.occurred_at, utcnow()
        return True
    if verify.status not in ("queued", "running"):
        return False
    if isinstance(report, m.VerifyFailed):
        await operations.finish_verify(session, verify, "failed", report.error, at=report.occurred_at)
        return True
    verify.started_at = verify.started_at or report.started_at
    verify.artifact_sha256_ok, verify.dump_sha256_ok = report.artifact_sha256_ok, report.dump_sha256_ok
    verify.tables_compared = report.tables_compared
    verify.mismatches = [c.model_dump() for c in report.mismatches]
    error = report.error
    if not report.ok and error is None:
        error = "verification failed: " + ", ".join(
            f"{c.table} expected {c.expected} rows, found {c.found}" for c in report.mismatches
        )
    await operations.finish_verify(
        session, verify, "completed" if report.ok else "failed", error, at=report.finished_at
    )
    return True


async def latest_verifiable_run(session: AsyncSession, job_id: str) -> BackupRun | None:
    """The job's newest successful backup whose files are still there."""
    runs = await session.execute(
        select(BackupRun)
        .where(
            BackupRun.job_id == job_id,
            col(BackupRun.status).in_(("completed", "partial")),
            col(BackupRun.pruned_at).is_(None),
        )
        .order_by(col(BackupRun.finished_at).desc())
        .limit(1)
    )
    return runs.scalars().first()


async def handle_verify_requested(
    session: AsyncSession,
    box: SecretBox,
    request: m.VerifyRequested,
    msg_id: str,
    *,
    offline_after: timedelta,
) -> VerifyRun | None:
    """A scheduled verification of the job's latest successful backup. Idempotent by Msg-Id."""
    if await session.get(ProcessedMessage, msg_id) is not None:
        return None
    session.add(ProcessedMessage(msg_id=msg_id, processed_at=utcnow()))
    job = await session.get(BackupJob, request.job_id)
    if job is None or job.org_id != request.org_id or job.verify_cron is None or not job.enabled:
        log.info("verify.schedule_ignored", job_id=request.job_id)
        return None
    run = await latest_verifiable_run(session, job.id)
    if run is not None and (busy := await active_verify_of(session, run.id)) is not None:
        log.info("verify.schedule_skipped", job_id=job.id, running=busy)  # the next fire tries again
        return None
    if run is None:
        job.last_verify_status, job.last_verified_at = "skipped", utcnow()
        log.warning("verify.nothing_to_verify", job_id=job.id)
        return None
    try:
        return await start_verify(
            session,
            box,
            run,
            level=job.verify_level,  # type: ignore[arg-type]  # validated on the way in
            offline_after=offline_after,
            trigger="schedule",
        )
    except AppError as exc:  # Conflict included: e.g. no agent online, copy deleted by retention
        job.last_verify_status, job.last_verified_at = "failed", utcnow()
        log.warning("verify.schedule_not_started", job_id=job.id, reason=exc.message)
        return None


async def get_verify(session: AsyncSession, org_id: str, verify_id: str) -> VerifyRun:
    verify = await session.get(VerifyRun, verify_id)
    if verify is None or verify.org_id != org_id:
        raise NotFound("verification")
    return verify


async def list_verifies(
    session: AsyncSession, org_id: str, backup_run_id: str | None, job_id: str | None, limit: int, offset: int
) -> tuple[list[VerifyRun], int]:
    query = select(VerifyRun).where(VerifyRun.org_id == org_id)
    if backup_run_id is not None:
        query = query.where(VerifyRun.backup_run_id == backup_run_id)
    if job_id is not None:
        query = query.where(VerifyRun.job_id == job_id)
    total = (await session.execute(select(func.count()).select_from(query.subquery()))).scalar_one()
    page = query.order_by(col(VerifyRun.queued_at).desc()).limit(limit).offset(offset)
    return list((await session.execute(page)).scalars()), total
