"""Backup keys of an organization (both custody modes, no material) and key rotation."""

from __future__ import annotations

from collections import defaultdict

import structlog
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.models import Agent
from rahatback_api.backups.models import BackupJob, BackupKey
from rahatback_api.backups.service import get_job, new_backup_key
from rahatback_api.columns import utcnow
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.keys.custody import check_job_customer_key, get_customer_key, is_customer_key_id
from rahatback_api.keys.models import (
    BackupKeyPublic,
    CustomerKey,
    CustomerKeyHolder,
    KeyCustody,
    KeyHolderPublic,
    RotateKey,
)
from rahatback_api.security.secretbox import SecretBox

log = structlog.get_logger(__name__)


async def list_keys(session: AsyncSession, org_id: str) -> list[BackupKeyPublic]:
    jobs = (await session.execute(select(BackupJob).where(BackupJob.org_id == org_id))).scalars().all()
    users: dict[str, list[str]] = defaultdict(list)
    for job in jobs:
        if job.key_id:
            users[job.key_id].append(job.id)
    keys: list[BackupKeyPublic] = []
    managed = await session.execute(
        select(BackupKey).where(BackupKey.org_id == org_id).order_by(col(BackupKey.created_at))
    )
    for key in managed.scalars():
        keys.append(
            BackupKeyPublic(
                key_id=key.id,
                custody="managed",
                fingerprint=None,
                job_id=key.job_id,
                used_by_job_ids=users.get(key.id, []),
                created_at=key.created_at,
                last_seen_at=None,
                holders=[],
            )
        )
    holders: dict[str, list[KeyHolderPublic]] = defaultdict(list)
    customer = (
        (
            await session.execute(
                select(CustomerKey)
                .where(CustomerKey.org_id == org_id)
                .order_by(col(CustomerKey.first_seen_at))
            )
        )
        .scalars()
        .all()
    )
    pinned = {k.key_id: k.fingerprint for k in customer}
    rows = await session.execute(
        select(CustomerKeyHolder, Agent)
        .join(Agent, col(Agent.id) == col(CustomerKeyHolder.agent_id))
        .where(CustomerKeyHolder.org_id == org_id, col(Agent.revoked_at).is_(None))
        .order_by(col(Agent.name))
    )
    for holder, agent in rows.all():
        holders[holder.key_id].append(
            KeyHolderPublic(
                agent_id=agent.id,
                agent_name=agent.name,
                fingerprint=holder.fingerprint,
                fingerprint_matches=holder.fingerprint == pinned.get(holder.key_id),
                first_seen_at=holder.first_seen_at,
                last_seen_at=holder.last_seen_at,
            )
        )
    for ckey in customer:
        keys.append(
            BackupKeyPublic(
                key_id=ckey.key_id,
                custody="customer",
                fingerprint=ckey.fingerprint,
                job_id=None,
                used_by_job_ids=users.get(ckey.key_id, []),
                created_at=ckey.first_seen_at,
                last_seen_at=ckey.last_seen_at,
                holders=holders.get(ckey.key_id, []),
            )
        )
    return keys


async def _next_generation(session: AsyncSession, job: BackupJob) -> int:
    ids = (await session.execute(select(BackupKey.id).where(BackupKey.job_id == job.id))).scalars().all()
    generations = [int(i.rsplit(":", 1)[1]) for i in ids if i.rsplit(":", 1)[-1].isdigit()]
    return max(generations, default=0) + 1


async def set_job_key(
    session: AsyncSession,
    box: SecretBox,
    job: BackupJob,
    custody: KeyCustody,
    customer_key_id: str | None,
    *,
    new_managed_key: bool,
) -> None:
    """Point the job's new backups at a key. Earlier keys are never deleted: runs keep their key id
    and stay restorable (managed: stored here; customer: in the agent's keyring)."""
    if custody == "customer":
        key = await check_job_customer_key(session, job, customer_key_id)
        job.key_id = key.key_id
    else:
        if customer_key_id is not None:
            raise AppError("customer_key_id is only for key_custody 'customer'", 422, field="customer_key_id")
        if new_managed_key or not job.key_id or is_customer_key_id(job.key_id):
            new_backup_key(session, box, job, await _next_generation(session, job))
    job.key_custody = custody


async def rotate_key(
    session: AsyncSession, box: SecretBox, org_id: str, job_id: str, body: RotateKey
) -> BackupJob:
    job = await get_job(session, org_id, job_id)
    custody: KeyCustody = body.key_custody or ("customer" if job.key_custody == "customer" else "managed")
    previous = job.key_id
    if custody == "customer" and body.customer_key_id == previous:
        raise Conflict(
            f"the job already uses backup key {previous!r}; name a new key (`rahatback-agent keys create`)",
            field="customer_key_id",
        )
    await set_job_key(session, box, job, custody, body.customer_key_id, new_managed_key=True)
    job.updated_at = utcnow()
    await session.flush()
    log.info(
        "backup key rotated", job_id=job.id, previous_key_id=previous, key_id=job.key_id, custody=custody
    )
    return job


async def refuse_customer_export(session: AsyncSession, org_id: str, key_id: str) -> None:
    """Customer-held keys are not here to export: say where they are."""
    if not is_customer_key_id(key_id):
        return
    if await get_customer_key(session, org_id, key_id) is None:
        raise NotFound("backup key")
    raise Conflict(
        "this key is held by the customer's agent; export it there with `rahatback-agent keys export`"
        f" {key_id} --out FILE"
    )
