"""Agent reports: untrusted input, checked (ownership, legal transitions) and applied idempotently."""

from __future__ import annotations

import json

import structlog
from rahatback_api.backups.models import ACTIVE_RUN_STATUSES
from rahatback_api.columns import utcnow
from rahatback_api.context import app_context
from rahatback_api.metrics import COMMAND_REFUSALS
from rahatback_api.models import (
    BackupCopy,
    BackupJob,
    BackupRun,
    OutboxMessage,
    ProcessedMessage,
    RestoreRun,
    Storage,
    VerifyRun,
)
from rahatback_api.retention import service as retention
from rahatback_api.verification import service as verification
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from .service import (
    UntrustedReport,
    duration_ms,
    enqueue_backup_event,
    enqueue_restore_event,
    fail_active,
    fail_restore,
    fail_run,
)

__all__ = ["REPORT_MODELS", "UntrustedReport", "apply_report", "parse_report"]

log = structlog.get_logger(__name__)

REPORT_MODELS: dict[str, type[m.Report]] = {
    "backup.started": m.BackupStarted,
    "backup.completed": m.BackupCompleted,
    "backup.failed": m.BackupFailed,
    "restore.started": m.RestoreStarted,
    "restore.completed": m.RestoreCompleted,
    "restore.failed": m.RestoreFailed,
    "verify.started": m.VerifyStarted,
    "verify.completed": m.VerifyCompleted,
    "verify.failed": m.VerifyFailed,
    "prune.completed": m.PruneCompleted,
    "prune.failed": m.PruneFailed,
    "command.refused": m.CommandRefused,
}


def parse_report(subject: str, data: bytes) -> tuple[str, str, m.Report]:
    """(agent id from the subject — NATS permissions bind it —, report kind, parsed body)."""
    try:
        agent_id = subjects.agent_id_of(subject)
    except ValueError as exc:
        raise UntrustedReport(str(exc)) from exc
    kind = ".".join(subject.split(".")[3:])
    model = REPORT_MODELS.get(kind)
    if model is None:
        raise UntrustedReport(f"unknown report subject {subject!r}")
    try:
        report = model.model_validate_json(data)
    except ValueError as exc:
        raise UntrustedReport(f"malformed {kind} report: {exc}") from exc
    if report.agent_id != agent_id:
        raise UntrustedReport(f"report body claims agent {report.agent_id}, subject says {agent_id}")
    return agent_id, kind, report


async def apply_report(session: AsyncSession, agent_id: str, msg_id: str, report: m.Report) -> bool:
    """Apply one report; False if it was already applied (re-delivery) or changes nothing."""
    key = f"{agent_id}:{msg_id}"
    if await session.get(ProcessedMessage, key) is not None:
        return False
    session.add(ProcessedMessage(msg_id=key, processed_at=utcnow()))
    if isinstance(report, m.BackupStarted | m.BackupCompleted | m.BackupFailed):
        changed = await _apply_backup_report(session, agent_id, report)
    elif isinstance(report, m.RestoreStarted | m.RestoreCompleted | m.RestoreFailed):
        changed = await _apply_restore_report(session, agent_id, report)
    elif isinstance(report, m.VerifyStarted | m.VerifyCompleted | m.VerifyFailed):
        changed = await verification.apply_verify_report(session, agent_id, report)
    elif isinstance(report, m.PruneCompleted | m.PruneFailed):
        changed = await retention.apply_prune_report(session, agent_id, report)
    elif isinstance(report, m.CommandRefused):
        changed = await _apply_refusal(session, agent_id, report)
    else:  # pragma: no cover - parse_report only yields the kinds above
        raise UntrustedReport(f"unexpected report {type(report).__name__}")
    await session.flush()
    return changed


async def _apply_refusal(session: AsyncSession, agent_id: str, report: m.CommandRefused) -> bool:
    """An agent refused a command or request (docs/security.md "Signed commands"): always a
    security signal, logged and counted. When the refused command is the one the API issued to that
    agent for a run still queued or running, the run fails now with the agent's reason instead of
    waiting for the watchdog. The refused body is untrusted (it may be a forgery): its run id counts
    only if its command id is the one in the API's own outbox row for that run and agent."""
    COMMAND_REFUSALS.labels(reason=report.reason).inc()
    log.warning(
        "agent.command_refused",
        agent_id=agent_id,
        subject=report.subject,
        reason=report.reason,
        detail=report.detail,
        command_id=report.command_id,
        run_kind=report.run_kind,
        run_id=report.run_id,
    )
    # a replay was refused, not the original: whatever the original started goes on
    if report.reason == "replayed" or report.run_id is None or report.command_id is None:
        return False
    issued = (
        await session.execute(select(OutboxMessage).where(OutboxMessage.msg_id == f"{report.run_id}:command"))
    ).scalar_one_or_none()
    if (
        issued is None
        or not issued.subject.startswith(f"agent.{agent_id}.")
        or json.loads(issued.payload).get("command_id") != report.command_id
    ):
        log.warning("agent.command_refused.not_issued_by_us", agent_id=agent_id, run_id=report.run_id)
        return False
    error = f"the agent refused the command: {report.detail}"
    row: BackupRun | RestoreRun | VerifyRun | None
    if report.run_kind == "backup":
        row = await session.get(BackupRun, report.run_id, with_for_update=True)
    elif report.run_kind == "restore":
        row = await session.get(RestoreRun, report.run_id, with_for_update=True)
    elif report.run_kind == "verify":
        row = await session.get(VerifyRun, report.run_id, with_for_update=True)
    elif report.run_kind == "prune":  # its copies are tried again after the next success
        failed = m.PruneFailed(
            agent_id=agent_id, occurred_at=report.occurred_at, prune_id=report.run_id, error=error
        )
        return await retention.apply_prune_report(session, agent_id, failed)
    else:  # a cancel has no run of its own
        return False
    if row is None or row.agent_id != agent_id or row.status not in ACTIVE_RUN_STATUSES:
        return False
    await fail_active(session, row, error)
    return True


async def _owned_run(session: AsyncSession, agent_id: str, run_id: str) -> BackupRun:
    run = await session.get(BackupRun, run_id, with_for_update=True)
    if run is None or run.agent_id != agent_id:
        raise UntrustedReport(f"agent {agent_id} reported on run {run_id} it was not given")
    return run


async def _apply_backup_report(
    session: AsyncSession, agent_id: str, report: m.BackupStarted | m.BackupCompleted | m.BackupFailed
) -> bool:
    run = await _owned_run(session, agent_id, report.run_id)
    job = await session.get(BackupJob, run.job_id)
    if isinstance(report, m.BackupStarted):
        if run.status != "queued":
            return False
        run.status, run.stage = "running", "dumping"
        run.started_at = report.occurred_at
        run.last_progress_at = utcnow()
        run.agent_version = report.agent_version
        event_type = "backup.started"
    elif isinstance(report, m.BackupCompleted):
        # An agent sends one terminal report per run, so a completion for a failed run means our
        # watchdog gave up too early (e.g. a NATS outage): the artifact exists, the agent is right.
        if run.status not in (*ACTIVE_RUN_STATUSES, "failed"):
            return False
        failed_copies = await _record_copies(session, run, report)
        run.status, run.stage = ("partial" if failed_copies else "completed"), None
        run.started_at = run.started_at or report.started_at
        run.finished_at = report.finished_at
        run.duration_ms = duration_ms(report.started_at, report.finished_at)
        run.storage_key, run.manifest_key = report.storage_key, report.manifest_key
        run.dump_size, run.artifact_size = report.dump_size, report.artifact_size
        run.dump_sha256, run.artifact_sha256 = report.dump_sha256, report.artifact_sha256
        run.server_version, run.dump_format = report.server_version, report.dump_format
        run.agent_version = report.agent_version
        run.bytes_done = report.dump_size
        run.error = "; ".join(failed_copies) or None
        event_type = f"backup.{run.status}"
        if job is not None:
            job.last_success_at = report.finished_at
            job.overdue_since = None
    else:
        if run.status not in ACTIVE_RUN_STATUSES:
            return False
        fail_run(run, report.error, at=report.occurred_at)
        event_type = "backup.failed"
    if job is not None:
        job.last_run_status = run.status
    await enqueue_backup_event(session, run, event_type)
    if event_type in ("backup.completed", "backup.partial") and job is not None:
        # only a success moves retention: a failed run never expires anything
        await retention.apply_retention(session, app_context(session).box, job, run)
    return True


async def _apply_restore_report(
    session: AsyncSession, agent_id: str, report: m.RestoreStarted | m.RestoreCompleted | m.RestoreFailed
) -> bool:
    restore = await session.get(RestoreRun, report.restore_id, with_for_update=True)
    if restore is None or restore.agent_id != agent_id:
        raise UntrustedReport(f"agent {agent_id} reported on restore {report.restore_id} it was not given")
    if isinstance(report, m.RestoreStarted):
        if restore.status != "queued":
            return False
        restore.status = "running"
        restore.started_at = report.occurred_at
        restore.last_progress_at = utcnow()
        event_type = "restore.started"
    elif isinstance(report, m.RestoreCompleted):
        if restore.status not in (*ACTIVE_RUN_STATUSES, "failed"):  # see the backup case
            return False
        restore.status = "completed"
        restore.started_at = restore.started_at or report.started_at
        restore.finished_at = report.finished_at
        restore.duration_ms = duration_ms(report.started_at, report.finished_at)
        restore.bytes_restored = report.bytes_restored
        restore.error = None
        event_type = "restore.completed"
    else:
        if restore.status not in ACTIVE_RUN_STATUSES:
            return False
        fail_restore(restore, report.error, at=report.occurred_at)
        event_type = "restore.failed"
    backup = await session.get(BackupRun, restore.backup_run_id)
    if backup is not None:
        backup.last_restore_status = restore.status
        backup.last_restore_at = utcnow()
    await enqueue_restore_event(session, restore, event_type)
    return True


async def _record_copies(session: AsyncSession, run: BackupRun, report: m.BackupCompleted) -> list[str]:
    """One row per storage the run was sent to; returns the failed copies' errors, by storage.

    Copies are untrusted input like the rest of the report: only the run's own storages count,
    and a storage the agent does not mention is a failed copy.
    """
    targets = [run.storage_id, *run.extra_storage_ids]
    reported = {c.storage_id: c for c in report.copies if c.storage_id in targets}
    if not report.copies:  # an agent that predates copies wrote exactly one, to the primary storage
        reported[run.storage_id] = m.CopyResult(
            storage_id=run.storage_id,
            ok=True,
            storage_key=report.storage_key,
            manifest_key=report.manifest_key,
        )
    failures = []
    for storage_id in targets:
        copy = reported.get(storage_id) or m.CopyResult(storage_id=storage_id, ok=False, error="not reported")
        ok = copy.ok and copy.storage_key is not None
        session.add(
            BackupCopy(
                org_id=run.org_id,
                run_id=run.id,
                job_id=run.job_id,
                storage_id=storage_id,
                status="completed" if ok else "failed",
                storage_key=copy.storage_key if ok else None,
                manifest_key=copy.manifest_key if ok else None,
                error=None if ok else copy.error,
                finished_at=report.finished_at,
            )
        )
        if not ok:
            storage = await session.get(Storage, storage_id)
            where = repr(storage.name) if storage else storage_id
            failures.append(f"the copy in {where} failed: {copy.error or 'unknown error'}")
    # the run's own storage/key name a complete copy: the one the agent named first
    first = next((c for c in report.copies if c.ok and c.storage_key == report.storage_key), None)
    if first is not None and first.storage_id in targets:
        run.storage_id = first.storage_id
    return failures
