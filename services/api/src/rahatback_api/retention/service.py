"""Retention: after each successful backup, expire what the job's policy no longer keeps.

The API decides (it has the history); the agent that can reach the storage deletes the files
(`prune.execute`) and reports per item. Runs stay in history, marked pruned, so a user can still
see that a backup existed and when its files went.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import structlog
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.columns import new_id, utcnow
from rahatback_api.messaging.outbox import enqueue
from rahatback_api.models import Agent, BackupJob, BackupRun, PruneRun, Storage
from rahatback_api.operations import service as operations
from rahatback_api.retention.policy import Backup, Policy, expired
from rahatback_api.security.secretbox import SecretBox

log = structlog.get_logger(__name__)


def policy_of(job: BackupJob) -> Policy:
    return Policy(
        keep_last=job.keep_last,
        keep_days=job.keep_days,
        keep_daily=job.keep_daily,
        keep_weekly=job.keep_weekly,
        keep_monthly=job.keep_monthly,
        keep_yearly=job.keep_yearly,
    )


async def apply_retention(
    session: AsyncSession, box: SecretBox, job: BackupJob, latest: BackupRun
) -> PruneRun | None:
    """After `latest` succeeded: send one prune for the job's expired backups in its storage."""
    storage_id = latest.storage_id
    policy = policy_of(job)
    if policy.keeps_everything():
        return None
    runs = (
        (
            await session.execute(
                select(BackupRun).where(
                    BackupRun.job_id == job.id,
                    BackupRun.storage_id == storage_id,
                    col(BackupRun.status).in_(("completed", "partial")),
                    col(BackupRun.storage_key).is_not(None),
                    col(BackupRun.pruned_at).is_(None),
                )
            )
        )
        .scalars()
        .all()
    )
    if any(run.prune_id is not None for run in runs):
        return None  # a prune is under way; the next success looks again
    backups = [Backup(run.id, run.finished_at) for run in runs if run.finished_at is not None]
    doomed = expired(backups, policy, utcnow(), ZoneInfo(job.timezone))
    if not doomed:
        return None
    storage = await session.get(Storage, storage_id)
    if storage is None:
        return None
    # the agent bound to the storage (a local folder lives on its host), else the one that just
    # reached this storage successfully
    agent = await session.get(Agent, storage.agent_id or latest.agent_id or "")
    if agent is None or agent.revoked_at is not None:
        job.last_prune_error = "retention postponed: no agent can reach this storage"
        return None
    items = [run for run in runs if run.id in doomed]
    prune = PruneRun(
        id=new_id(),
        org_id=job.org_id,
        job_id=job.id,
        storage_id=storage.id,
        agent_id=agent.id,
        items=len(items),
    )
    session.add(prune)
    for run in items:
        run.prune_id = prune.id
    command = m.PruneCommand(
        **operations.command_envelope(job.org_id),
        prune_id=prune.id,
        job_id=job.id,
        storage=operations.saved_storage_target(box, storage, agent, m.seal_info("prune", prune.id)),
        items=[
            m.PruneItem(run_id=run.id, storage_key=run.storage_key or "", manifest_key=run.manifest_key)
            for run in items
        ],
    )
    enqueue(session, subjects.agent_command(agent.id, "prune.execute"), command, f"{prune.id}:command")
    log.info("retention.prune_sent", job_id=job.id, prune_id=prune.id, items=len(items))
    return prune


async def apply_prune_report(
    session: AsyncSession, agent_id: str, report: m.PruneCompleted | m.PruneFailed
) -> bool:
    prune = await session.get(PruneRun, report.prune_id, with_for_update=True)
    if prune is None or prune.agent_id != agent_id:
        raise operations.UntrustedReport(
            f"agent {agent_id} reported on prune {report.prune_id} it was not given"
        )
    if prune.status != "queued":
        return False
    runs = {
        run.id: run
        for run in (await session.execute(select(BackupRun).where(BackupRun.prune_id == prune.id))).scalars()
    }
    now = utcnow()
    errors: list[str] = []
    if isinstance(report, m.PruneFailed):
        errors.append(report.error)
        for run in runs.values():
            run.prune_id, run.prune_error = None, report.error
    else:
        for run_id in report.deleted:
            if run_id in runs:
                run = runs.pop(run_id)
                run.prune_id, run.pruned_at, run.prune_error = None, now, None
                prune.deleted += 1
        for failure in report.failures:
            if failure.run_id in runs:
                run = runs.pop(failure.run_id)
                run.prune_id, run.prune_error = None, failure.error
                errors.append(f"{failure.run_id}: {failure.error}")
        for run in runs.values():  # not mentioned by the agent: try again next time
            run.prune_id = None
    prune.finished_at = now
    prune.status = "completed" if not errors else ("partial" if prune.deleted else "failed")
    prune.error = "; ".join(errors)[:4000] or None
    job = await session.get(BackupJob, prune.job_id)
    if job is not None:
        job.last_prune_at = now
        job.last_prune_error = prune.error
    if errors:
        log.warning("retention.prune_failed", prune_id=prune.id, job_id=prune.job_id, errors=errors)
    await session.flush()
    return True
