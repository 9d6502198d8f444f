"""Writing and reading audit events."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.audit.models import AuditEvent, AuditEventPublic
from rahatback_api.auth.models import User


async def record(session: AsyncSession, event: AuditEvent) -> AuditEvent:
    session.add(event)
    await session.flush()
    return event


@dataclass(frozen=True)
class AuditFilter:
    action: str | None = None
    actor_user_id: str | None = None
    since: datetime | None = None


async def list_events(
    session: AsyncSession, org_id: str, filters: AuditFilter, limit: int, offset: int
) -> tuple[list[AuditEventPublic], int]:
    """This organization's events, newest first, with the actor's email where the user still exists."""
    conditions: list[ColumnElement[bool]] = [col(AuditEvent.org_id) == org_id]
    if filters.action is not None:
        conditions.append(col(AuditEvent.action) == filters.action)
    if filters.actor_user_id is not None:
        conditions.append(col(AuditEvent.actor_user_id) == filters.actor_user_id)
    if filters.since is not None:
        since = filters.since if filters.since.tzinfo else filters.since.replace(tzinfo=UTC)
        conditions.append(col(AuditEvent.at) >= since)
    total = (
        await session.execute(select(func.count()).select_from(AuditEvent).where(*conditions))
    ).scalar_one()
    rows = await session.execute(
        select(AuditEvent, User.email)
        .outerjoin(User, User.id == AuditEvent.actor_user_id)  # type: ignore[arg-type]
        .where(*conditions)
        .order_by(col(AuditEvent.at).desc(), col(AuditEvent.id).desc())
        .limit(limit)
        .offset(offset)
    )
    items = [
        AuditEventPublic(**event.model_dump(exclude={"org_id"}), actor_email=email) for event, email in rows
    ]
    return items, total
