"""Revoking an agent: `POST /v1/agents/{agent_id}/revoke` (admin).

The database first (the agent is revoked, its queued and running runs fail with the reason, its
credential renewals are refused from the commit on), then NATS: its command consumer is deleted and
its pending commands purged, and in JWT mode its user key goes into the account's revocations, which
closes its live connection and refuses reconnects. Calling it again redoes the NATS steps, so a
revocation interrupted by a NATS outage is completed by retrying.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypeVar

import structlog
from fastapi import APIRouter, Depends, Request
from nats.js.errors import NotFoundError
from pydantic import BaseModel
from rahatback_contracts import streams, subjects
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.models import Agent
from rahatback_api.agents.nats_identity import NatsAuthorityDep
from rahatback_api.agents.service import get_agent
from rahatback_api.auth.deps import AdminPrincipal
from rahatback_api.backups.models import ACTIVE_RUN_STATUSES, BackupRun, RestoreRun, VerifyRun
from rahatback_api.columns import utcnow
from rahatback_api.db import SessionDep
from rahatback_api.errors import AppError
from rahatback_api.messaging.bus import Bus
from rahatback_api.operations.service import fail_active

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/agents", tags=["agents"])


class AgentRevoked(BaseModel):
    agent_id: str
    revoked_at: datetime
    # queued or running runs of the agent, now failed with the reason "agent … was revoked"
    runs_failed: int
    # its durable command consumer was deleted (false: there was none)
    consumer_deleted: bool
    # commands that were waiting for it in AGENT_COMMANDS, now removed
    commands_purged: int
    # JWT mode: its NATS user is revoked, its connection closed and reconnects refused.
    # Plain mode (no per-agent NATS identity): false, and `detail` says so.
    nats_user_revoked: bool
    detail: str


def revoked_reason(agent: Agent) -> str:
    return f"agent {agent.name!r} was revoked"


async def revoke_agent(session: AsyncSession, org_id: str, agent_id: str) -> tuple[Agent, int]:
    """Mark the agent revoked (once; the first time stays) and fail its queued and running runs."""
    agent = await get_agent(session, org_id, agent_id)
    if agent.revoked_at is None:
        agent.revoked_at = utcnow()
    rows: list[BackupRun | RestoreRun | VerifyRun] = [
        *await _active_runs(session, BackupRun, agent.id),
        *await _active_runs(session, RestoreRun, agent.id),
        *await _active_runs(session, VerifyRun, agent.id),
    ]
    for row in rows:
        await fail_active(session, row, revoked_reason(agent))
    await session.flush()
    return agent, len(rows)


_Run = TypeVar("_Run", BackupRun, RestoreRun, VerifyRun)


async def _active_runs(session: AsyncSession, model: type[_Run], agent_id: str) -> list[_Run]:
    query = select(model).where(col(model.agent_id) == agent_id, col(model.status).in_(ACTIVE_RUN_STATUSES))
    return list((await session.execute(query)).scalars())


async def remove_commands(bus: Bus, agent_id: str) -> tuple[bool, int]:
    """Delete the agent's consumer and purge what was addressed to it; (deleted, purged)."""
    spec = streams.agent_commands_consumer(agent_id)
    pending = 0
    deleted = False
    try:
        info = await bus.js.consumer_info(spec.stream, spec.durable)
        pending = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        await bus.js.delete_consumer(spec.stream, spec.durable)
        deleted = True
    except NotFoundError:
        pass
    # also what no consumer counted (e.g. published after the consumer went away)
    before = (await bus.js.stream_info(spec.stream)).state.messages
    await bus.js.purge_stream(spec.stream, subject=subjects.agent_commands_filter(agent_id))
    after = (await bus.js.stream_info(spec.stream)).state.messages
    return deleted, max(pending, before - after)


def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


@router.post("/{agent_id}/revoke", response_model=AgentRevoked)
async def revoke(
    agent_id: str,
    principal: AdminPrincipal,
    session: SessionDep,
    bus: Annotated[Bus, Depends(_bus)],
    authority: NatsAuthorityDep,
) -> AgentRevoked:
    """Revoke an agent: it can no longer receive commands, report, or (JWT mode) connect to NATS."""
    agent, runs_failed = await revoke_agent(session, principal.org_id, agent_id)
    # committed before NATS changes: from here on renewals are refused and the revocation is
    # part of every account update any API replica pushes
    await session.commit()
    log.info("agent.revoked", agent_id=agent.id, runs_failed=runs_failed)
    try:
        consumer_deleted, purged = await remove_commands(bus, agent.id)
        revoked_user = False
        if authority is not None and agent.nats_public_key is not None:
            await authority.push_revocations(session)
            revoked_user = True
    except Exception as exc:  # NatsIdentityError, nats errors, timeouts: all mean "retry"
        log.error("agent.revocation_incomplete", agent_id=agent.id, error=str(exc))
        cause = str(exc) or type(exc).__name__
        raise AppError(
            f"the agent is revoked in the database, but NATS could not be updated ({cause}); "
            "call revoke again",
            503,
        ) from None
    if revoked_user:
        detail = "its NATS user is revoked: its connection was closed and reconnects are refused"
    elif authority is None:
        detail = (
            "NATS runs in plain mode: the agent has no NATS identity of its own to revoke (it could "
            "still connect); it gets no more commands"
        )
    else:
        detail = (
            "the agent was enrolled while NATS ran in plain mode: it has no NATS user, so the servers "
            "(now in JWT mode) already refuse it; nothing more to revoke. To use that host again, "
            "enroll it anew"
        )
    assert agent.revoked_at is not None
    return AgentRevoked(
        agent_id=agent.id,
        revoked_at=agent.revoked_at,
        runs_failed=runs_failed,
        consumer_deleted=consumer_deleted,
        commands_purged=purged,
        nats_user_revoked=revoked_user,
        detail=detail,
    )
