"""Agents and enrollment tokens (the enrollment handshake itself lives in `operations/`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.models import Agent, AgentPublic, EnrollmentToken
from rahatback_api.auth.deps import Principal
from rahatback_api.columns import utcnow
from rahatback_api.errors import AppError, NotFound
from rahatback_api.security.tokens import ENROLLMENT_TOKEN_PREFIX, hash_token, new_token


async def create_enrollment_token(
    session: AsyncSession, principal: Principal, ttl_minutes: int
) -> tuple[EnrollmentToken, str]:
    plaintext = new_token(ENROLLMENT_TOKEN_PREFIX)
    token = EnrollmentToken(
        org_id=principal.org_id,
        token_hash=hash_token(plaintext),
        expires_at=utcnow() + timedelta(minutes=ttl_minutes),
        created_by_user_id=principal.user.id,
    )
    session.add(token)
    await session.flush()
    return token, plaintext


async def consume_enrollment_token(session: AsyncSession, token: str) -> EnrollmentToken:
    """Mark a one-time enrollment token used and return it (its `org_id` owns the new agent).

    401 for an unknown token, 410 for one already used or expired. The row is locked (PostgreSQL) and
    the update is conditional, so two agents racing with the same token cannot both enroll.
    """
    row = (
        await session.execute(
            select(EnrollmentToken).where(EnrollmentToken.token_hash == hash_token(token)).with_for_update()
        )
    ).scalar_one_or_none()
    if row is None:
        raise AppError("unknown enrollment token", 401)
    now = utcnow()
    if row.used_at is not None:
        raise AppError("this enrollment token was already used; create a new one", 410)
    if row.expires_at <= now:
        raise AppError("this enrollment token has expired; create a new one", 410)
    # conditional on still being unused: on SQLite `FOR UPDATE` is a no-op, this is what makes it one-time
    claimed = await session.execute(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.id) == row.id, col(EnrollmentToken.used_at).is_(None))
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise AppError("this enrollment token was already used; create a new one", 410)
    row.used_at = now
    return row


def is_online(agent: Agent, offline_after_seconds: int, now: datetime | None = None) -> bool:
    if agent.revoked_at is not None or agent.last_seen_at is None:
        return False
    return (now or utcnow()) - agent.last_seen_at <= timedelta(seconds=offline_after_seconds)


def agent_public(agent: Agent, offline_after_seconds: int) -> AgentPublic:
    return AgentPublic(
        id=agent.id,
        name=agent.name,
        hostname=agent.hostname,
        version=agent.version,
        online=is_online(agent, offline_after_seconds),
        last_seen_at=agent.last_seen_at,
        engines=list(agent.engines),
        storages=list(agent.storages),
        tools=dict(agent.tools or {}),
        enrolled_at=agent.enrolled_at,
        revoked=agent.revoked_at is not None,
        revoked_at=agent.revoked_at,
    )


async def list_agents(session: AsyncSession, org_id: str) -> list[Agent]:
    result = await session.execute(
        select(Agent).where(Agent.org_id == org_id).order_by(col(Agent.enrolled_at), col(Agent.id))
    )
    return list(result.scalars())


async def get_agent(session: AsyncSession, org_id: str, agent_id: str) -> Agent:
    agent = (
        await session.execute(select(Agent).where(Agent.id == agent_id, Agent.org_id == org_id))
    ).scalar_one_or_none()
    if agent is None:
        raise NotFound("agent")
    return agent


async def get_usable_agent(session: AsyncSession, org_id: str, agent_id: str, field: str) -> Agent:
    """An agent a database or storage may be bound to: same organization, not revoked."""
    try:
        agent = await get_agent(session, org_id, agent_id)
    except NotFound:
        raise AppError("no such agent in this organization", 422, field=field) from None
    if agent.revoked_at is not None:
        raise AppError("this agent is revoked", 422, field=field)
    return agent
