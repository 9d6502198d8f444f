"""Retention: after each successful backup, expire what the job's policy no longer keeps.

The API decides (it has the history); the agent that can reach the storage deletes the files
(`prune.execute`) and reports per item. Runs stay in history, marked pruned, so a user can still
see that a backup existed and when its files went.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import structlog
from rahatback_contracts import messages as m
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.columns import new_id, utcnow
from rahatback_api.models import Agent, BackupCopy, BackupJob, BackupRun, PruneRun, Storage
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
) -> list[PruneRun]:
    """After `latest` succeeded: one prune per storage it reached, for the copies that expired there."""
    if policy_of(job).keeps_everything():
        return []
    query = select(BackupCopy.storage_id).where(
        BackupCopy.run_id == latest.id, BackupCopy.status == "completed"
    )
    prunes = []
    for storage_id in sorted(set((await session.execute(query)).scalars())):
        prune = await _prune_storage(session, box, job, storage_id, latest)
        if prune is not None:
            prunes.append(prune)
    return prunes


async def _prune_storage(
    session: AsyncSession, box: SecretBox, job: BackupJob, storage_id: str, latest: BackupRun
) -> PruneRun | None:
    rows = (
        await session.execute(
            select(BackupCopy, BackupRun.finished_at)
            .join(BackupRun, col(BackupRun.id) == col(BackupCopy.run_id))
            .where(
                BackupCopy.job_id == job.id,
                BackupCopy.storage_id == storage_id,
                # a whole-server job keeps its policy per database
                BackupRun.database_name == latest.database_name,
                BackupCopy.status == "completed",
                col(BackupCopy.pruned_at).is_(None),
            )
        )
    ).all()
    if any(copy.prune_id is not None for copy, _ in rows):
        return None  # a prune is under way in this storage; the next success looks again
    backups = [Backup(copy.run_id, finished) for copy, finished in rows if finished is not None]
    doomed = expired(backups, policy_of(job), utcnow(), ZoneInfo(job.timezone))
    storage = await session.get(Storage, storage_id)
    if not doomed or storage is None:
        return None
    # the agent bound to the storage (a local folder lives on its host), else the one that just
    # reached this storage successfully
    agent = await session.get(Agent, storage.agent_id or latest.agent_id or "")
    if agent is None or agent.revoked_at is not None:
        job.last_prune_error = f"retention postponed in {storage.name!r}: no agent can reach it"
        return None
    items = [copy for copy, _ in rows if copy.run_id in doomed]
    prune = PruneRun(
        id=new_id(),
        org_id=job.org_id,
        job_id=job.id,
        storage_id=storage.id,
        agent_id=agent.id,
        items=len(items),
    )
    session.add(prune)
    for copy in items:
        copy.prune_id = prune.id
    command = m.PruneCommand(
        **operations.command_envelope(job.org_id),
        prune_id=prune.id,
        job_id=job.id,
        storage=operations.saved_storage_target(box, storage, agent, m.seal_info("prune", prune.id)),
        items=[
            m.PruneItem(
                run_id=copy.run_id, storage_key=copy.storage_key or "", manifest_key=copy.manifest_key
            )
            for copy in items
        ],
    )
    operations.enqueue_command(session, agent.id, "prune.execute", command, f"{prune.id}:command")
    log.info(
        "retention.prune_sent", job_id=job.id, storage_id=storage.id, prune_id=prune.id, items=len(items)
    )
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
    query = select(BackupCopy).where(BackupCopy.prune_id == prune.id)
    copies = {copy.run_id: copy for copy in (await session.execute(query)).scalars()}
    now = utcnow()
    errors: dict[str, str] = {}
    if isinstance(report, m.PruneFailed):
        errors = dict.fromkeys(copies, report.error)
    else:
        errors = {f.run_id: f.error for f in report.failures if f.run_id in copies}
    deleted = set() if isinstance(report, m.PruneFailed) else set(report.deleted) & set(copies)
    for run_id, copy in copies.items():
        copy.prune_id = None  # not mentioned by the agent: tried again after the next success
        if run_id in deleted:
            copy.pruned_at, copy.prune_error = now, None
        elif run_id in errors:
            copy.prune_error = errors[run_id]
    await session.flush()
    for run_id in copies:
        await _summarise_run(session, run_id, errors.get(run_id))
    prune.deleted = len(deleted)
    prune.finished_at = now
    prune.status = "completed" if not errors else ("partial" if deleted else "failed")
    prune.error = "; ".join(f"{run_id}: {error}" for run_id, error in errors.items())[:4000] or None
    job = await session.get(BackupJob, prune.job_id)
    if job is not None:
        job.last_prune_at = now
        job.last_prune_error = prune.error
    if errors:
        log.warning("retention.prune_failed", prune_id=prune.id, job_id=prune.job_id, errors=errors)
    await session.flush()
    return True


async def _summarise_run(session: AsyncSession, run_id: str, error: str | None) -> None:
    """A run is pruned once none of its complete copies is left."""
    run = await session.get(BackupRun, run_id)
    if run is None:
        return
    query = select(BackupCopy).where(BackupCopy.run_id == run_id, BackupCopy.status == "completed")
    copies = list((await session.execute(query)).scalars())
    if copies and all(c.pruned_at is not None for c in copies):
        run.pruned_at = max(c.pruned_at for c in copies if c.pruned_at is not None)
    run.prune_error = error
