"""Login throttling: failed logins counted per email and per client address, in the database so every
API replica sees the same counts. Too many failures within the window lock the email (or address)
out for a while; a successful login clears the email's count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, or_, select

from rahatback_api.auth.models import LoginThrottle
from rahatback_api.columns import new_id, utcnow
from rahatback_api.settings import Settings


@dataclass(frozen=True)
class ThrottlePolicy:
    max_failures_per_email: int
    max_failures_per_ip: int
    window: timedelta
    lockout: timedelta

    @classmethod
    def from_settings(cls, settings: Settings) -> ThrottlePolicy:
        return cls(
            max_failures_per_email=settings.login_max_failures,
            max_failures_per_ip=settings.login_max_failures_per_ip,
            window=timedelta(minutes=settings.login_failure_window_minutes),
            lockout=timedelta(minutes=settings.login_lockout_minutes),
        )


def _keys(email: str, ip: str | None) -> list[tuple[str, str]]:
    keys = [("email", email[:320])]
    if ip is not None:
        keys.append(("ip", ip[:320]))
    return keys


async def locked_until(session: AsyncSession, email: str, ip: str | None) -> datetime | None:
    """When the later of the email's and the address's lockouts ends; None if neither is locked."""
    now = utcnow()
    matches = [(LoginThrottle.scope == scope) & (LoginThrottle.key == key) for scope, key in _keys(email, ip)]
    rows = await session.execute(
        select(LoginThrottle.locked_until).where(or_(*matches), col(LoginThrottle.locked_until) > now)
    )
    ends = [end for end in rows.scalars() if end is not None]
    return max(ends) if ends else None


async def record_failure(
    session: AsyncSession, email: str, ip: str | None, policy: ThrottlePolicy
) -> datetime | None:
    """Count one failed login for the email and the address; returns when a lockout it started ends."""
    limits = {"email": policy.max_failures_per_email, "ip": policy.max_failures_per_ip}
    locked: datetime | None = None
    for scope, key in _keys(email, ip):
        await _ensure_row(session, scope, key)
        # FOR UPDATE: two replicas counting the same email at once both count (SQLite serializes writers)
        row = (
            await session.execute(
                select(LoginThrottle)
                .where(LoginThrottle.scope == scope, LoginThrottle.key == key)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
        ).scalar_one()
        now = utcnow()
        if row.locked_until is not None and row.locked_until > now:
            continue
        if now - row.window_started_at > policy.window:
            row.failures, row.window_started_at = 0, now
        row.failures += 1
        if row.failures >= limits[scope]:
            row.locked_until = now + policy.lockout
            row.failures, row.window_started_at = 0, now
            locked = max(locked, row.locked_until) if locked else row.locked_until
    await session.flush()
    return locked


async def _ensure_row(session: AsyncSession, scope: str, key: str) -> None:
    values = {"id": new_id(), "scope": scope, "key": key, "failures": 0, "window_started_at": utcnow()}
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(
        insert(LoginThrottle).values(**values).on_conflict_do_nothing(index_elements=["scope", "key"])
    )


async def reset_email(session: AsyncSession, email: str) -> None:
    await session.execute(
        update(LoginThrottle)
        .where(col(LoginThrottle.scope) == "email", col(LoginThrottle.key) == email[:320])
        .values(failures=0, locked_until=None)
        .execution_options(synchronize_session=False)
    )


def retry_after_seconds(until: datetime) -> int:
    return max(1, math.ceil((until - utcnow()).total_seconds()))
