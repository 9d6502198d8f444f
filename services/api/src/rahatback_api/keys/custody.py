"""Which agents hold which customer-held keys, and the checks that keep such keys on their hosts.

Agents report key ids and fingerprints in their heartbeats (untrusted input: checked and bounded).
A job with a customer-held key, and every backup, restore and verification of its backups, must
go to an agent that reports holding that key with the recorded fingerprint; the command then names
the key and carries no key material.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import timedelta

import structlog
from rahatback_contracts import messages as m
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.models import Agent
from rahatback_api.backups.models import BackupJob
from rahatback_api.columns import utcnow
from rahatback_api.databases.models import Database
from rahatback_api.errors import AppError, Conflict
from rahatback_api.keys.models import CustomerKey, CustomerKeyHolder
from rahatback_api.storages.models import Storage

log = structlog.get_logger(__name__)

# the agent's keyring accepts the same ids (rahatback_agent.keyring.KEY_ID_PATTERN); managed key
# ids are "<job id>:<generation>", so a ":" tells the two kinds apart
CUSTOMER_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
MAX_REPORTED_KEYS = 1000
# a heartbeat every few seconds must not write every time: last-seen moves at most this often
SEEN_RESOLUTION = timedelta(minutes=1)
# an agent that stops reporting a key stays its holder until it was last seen this long ago (so for
# one to two minutes, as last-seen lags up to SEEN_RESOLUTION): one failed key command (a vault that
# timed out) or a keyring unreadable for a few heartbeats must not take the key away from its jobs
HOLDER_GRACE = timedelta(minutes=2)


def is_customer_key_id(key_id: str) -> bool:
    return ":" not in key_id


async def get_customer_key(session: AsyncSession, org_id: str, key_id: str) -> CustomerKey | None:
    query = select(CustomerKey).where(CustomerKey.org_id == org_id, CustomerKey.key_id == key_id)
    return (await session.execute(query)).scalar_one_or_none()


async def holders_of(session: AsyncSession, key: CustomerKey) -> list[Agent]:
    """Agents (not revoked) that report this key id with its recorded fingerprint."""
    query = (
        select(Agent)
        .join(CustomerKeyHolder, col(CustomerKeyHolder.agent_id) == col(Agent.id))
        .where(
            CustomerKeyHolder.org_id == key.org_id,
            CustomerKeyHolder.key_id == key.key_id,
            CustomerKeyHolder.fingerprint == key.fingerprint,
            col(Agent.revoked_at).is_(None),
        )
        .order_by(col(Agent.name))
    )
    return list((await session.execute(query)).scalars())


async def holds(session: AsyncSession, agent_id: str, key: CustomerKey) -> bool:
    query = select(CustomerKeyHolder.id).where(
        CustomerKeyHolder.agent_id == agent_id,
        CustomerKeyHolder.key_id == key.key_id,
        CustomerKeyHolder.fingerprint == key.fingerprint,
    )
    return (await session.execute(query)).first() is not None


def _names(agents: Sequence[Agent]) -> str:
    return ", ".join(f"{a.name!r} ({a.id})" for a in agents)


async def customer_encryption(
    session: AsyncSession, agent: Agent, org_id: str, key_id: str, info: str
) -> m.EncryptionSpec:
    """The encryption part of a command for a customer-held key: id, fingerprint, no material.
    409 when `agent` does not hold the key, naming the agents that do."""
    # info is seal_info(purpose, id): "rahatback:run:…", "rahatback:restore:…", "rahatback:verify:…"
    purpose = info.split(":")[1] if info.count(":") >= 2 else "run"
    key = await require_key_held(session, agent, org_id, key_id, purpose)
    return m.EncryptionSpec(enabled=True, key_id=key_id, custody="customer", fingerprint=key.fingerprint)


async def require_key_held(
    session: AsyncSession, agent: Agent, org_id: str, key_id: str, purpose: str = "run"
) -> CustomerKey:
    """409 unless `agent` reports holding this customer key with its recorded fingerprint. Called
    before a run is queued, so a refused scheduled run leaves no queued row behind."""
    key = await get_customer_key(session, org_id, key_id)
    if key is None:
        raise Conflict(
            f"backup key {key_id!r} is a customer-held key no agent of this organization has reported;"
            " add it to an agent's keyring from your exported copy"
        )
    if not await holds(session, agent.id, key):
        action = {"run": "back up", "restore": "restore", "verify": "verify"}.get(purpose, "run it")
        others = await holders_of(session, key)
        where = (
            f"{action} on an agent that holds it: {_names(others)}"
            if others
            else "no agent reports holding it now; put it back in an agent's keyring"
            " (`rahatback-agent keys`, docs/backup-keys.md)"
        )
        raise Conflict(
            f"agent {agent.name!r} does not hold backup key {key_id!r}"
            f" (fingerprint {key.fingerprint}); {where}"
        )
    return key


async def job_agent_id(session: AsyncSession, job: BackupJob) -> str | None:
    """The agent a job's backups run on when its targets name one (as `start_backup` picks it)."""
    db = await session.get(Database, job.database_id)
    if db is not None and db.agent_id:
        return db.agent_id
    for storage_id in (job.storage_id, *job.extra_storage_ids):
        storage = await session.get(Storage, storage_id)
        if storage is not None and storage.agent_id:
            return storage.agent_id
    return None


async def check_job_customer_key(session: AsyncSession, job: BackupJob, key_id: str | None) -> CustomerKey:
    """A job may use a customer-held key only if its agent reports holding it (422 otherwise)."""

    def invalid(message: str) -> AppError:
        return AppError(message, 422, field="customer_key_id")

    if not key_id:
        raise invalid(
            "key_custody 'customer' needs customer_key_id: a key id from `rahatback-agent keys list`"
        )
    if not job.encryption_enabled:
        raise AppError("a customer-held key encrypts backups: enable encryption", 422, field="key_custody")
    key = await get_customer_key(session, job.org_id, key_id)
    if key is None:
        raise invalid(
            f"no agent of this organization reports a backup key {key_id!r}: create it on the job's agent"
            " with `rahatback-agent keys create` and wait for its next heartbeat"
        )
    agent_id = await job_agent_id(session, job)
    if agent_id is None:
        raise invalid(
            "a customer-held key lives on one agent: bind the job's database (or storage) to the agent"
            " that holds the key"
        )
    if not await holds(session, agent_id, key):
        agent = await session.get(Agent, agent_id)
        name = agent.name if agent else agent_id
        raise invalid(f"the job's agent {name!r} does not report holding backup key {key_id!r}")
    return key


async def record_held_keys(session: AsyncSession, agent: Agent, reported: Sequence[m.HeldKey]) -> None:
    """Apply one heartbeat's key list: new holders and keys are recorded, keys the agent has not
    reported for HOLDER_GRACE lose it as a holder. Malformed entries are skipped (the agent is
    untrusted)."""
    now = utcnow()
    wanted: dict[str, str] = {}
    for held in reported[:MAX_REPORTED_KEYS]:
        if CUSTOMER_KEY_ID.match(held.key_id) and FINGERPRINT.match(held.fingerprint):
            wanted[held.key_id] = held.fingerprint
        else:
            log.warning("heartbeat.bad_key_entry", agent_id=agent.id)
    query = select(CustomerKeyHolder).where(CustomerKeyHolder.agent_id == agent.id)
    current = {h.key_id: h for h in (await session.execute(query)).scalars()}
    for key_id, gone in current.items():
        if key_id not in wanted and now - gone.last_seen_at >= HOLDER_GRACE:
            await session.delete(gone)
    for key_id, fingerprint in wanted.items():
        holder = current.get(key_id)
        if holder is None:
            session.add(
                CustomerKeyHolder(
                    org_id=agent.org_id,
                    agent_id=agent.id,
                    key_id=key_id,
                    fingerprint=fingerprint,
                    first_seen_at=now,
                    last_seen_at=now,
                )
            )
        elif holder.fingerprint != fingerprint or now - holder.last_seen_at >= SEEN_RESOLUTION:
            holder.fingerprint, holder.last_seen_at = fingerprint, now
        else:
            continue  # nothing new: no write, no key lookup
        key = await get_customer_key(session, agent.org_id, key_id)
        if key is None:
            session.add(
                CustomerKey(
                    org_id=agent.org_id,
                    key_id=key_id,
                    fingerprint=fingerprint,
                    first_seen_at=now,
                    last_seen_at=now,
                )
            )
        elif key.fingerprint == fingerprint:
            key.last_seen_at = now
        else:
            log.warning(
                "customer_key.fingerprint_differs",
                agent_id=agent.id,
                key_id=key_id,
                recorded=key.fingerprint,
                reported=fingerprint,
            )
