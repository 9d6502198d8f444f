"""Login throttling: failed logins counted per email and per client address, in the database so every
API replica sees the same counts. Too many failures within the window lock the email (or address)
out for a while; a successful login clears the email's count.

Each attempt is counted *before* its password is checked, atomically, so parallel requests cannot
all slip past the limit while the first ones are still hashing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, literal, null, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, or_, select

from rahatback_api.auth.models import LoginThrottle
from rahatback_api.columns import UTCDateTime, new_id, utcnow
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
    # always the email first, then the address: every request locks rows in the same order, so two
    # PostgreSQL transactions reserving at once wait for each other instead of deadlocking
    keys = [("email", email[:320])]
    if ip is not None:
        keys.append(("ip", ip[:320]))
    return keys


class LockedOut(Exception):
    """The email or the address is locked out until `until`; the password must not be checked."""

    def __init__(self, until: datetime) -> None:
        super().__init__(f"locked out until {until:%Y-%m-%d %H:%M:%S} UTC")
        self.until = until


@dataclass(frozen=True)
class Reservation:
    """One login attempt counted before its password is checked; `locked` names the scopes it locked."""

    email: str
    ip: str | None
    locked: frozenset[str]


async def reserve_attempt(
    session: AsyncSession, email: str, ip: str | None, policy: ThrottlePolicy
) -> Reservation:
    """Count the attempt as a failure before the password is checked; raise LockedOut if refused.

    Each count is one conditional UPDATE that only matches a row that is not locked, so concurrent
    attempts (parallel requests, other replicas) queue on the row and the one that reaches the limit
    locks it for the others: at most the limit's worth of attempts ever reach the password check.
    Refused, the caller must roll back `session`: the email's count is not left raised when the
    address refused the attempt.
    """
    limits = {"email": policy.max_failures_per_email, "ip": policy.max_failures_per_ip}
    now = utcnow()
    locked: set[str] = set()
    for scope, key in _keys(email, ip):
        await _ensure_row(session, scope, key)
        failures = col(LoginThrottle.failures)
        started = col(LoginThrottle.window_started_at)
        lock_end = col(LoginThrottle.locked_until)
        # a new window once the old one is over or a lock has run out
        fresh = or_(started <= now - policy.window, lock_end <= now)
        attempts = case((fresh, 1), else_=failures + 1)
        row = (
            await session.execute(
                update(LoginThrottle)
                .where(col(LoginThrottle.scope) == scope, col(LoginThrottle.key) == key)
                .where(or_(lock_end.is_(None), lock_end <= now))
                .values(
                    failures=attempts,
                    window_started_at=case((fresh, literal(now, UTCDateTime())), else_=started),
                    locked_until=case(
                        (attempts >= limits[scope], literal(now + policy.lockout, UTCDateTime())),
                        else_=null(),
                    ),
                )
                .returning(lock_end)
                .execution_options(synchronize_session=False)
            )
        ).one_or_none()
        if row is None:
            until = (
                await session.execute(
                    select(LoginThrottle.locked_until).where(
                        LoginThrottle.scope == scope, LoginThrottle.key == key
                    )
                )
            ).scalar_one()
            raise LockedOut(until if until is not None else now + policy.lockout)
        if row[0] is not None:
            locked.add(scope)
    return Reservation(email=email, ip=ip, locked=frozenset(locked))


async def password_accepted(session: AsyncSession, reservation: Reservation) -> None:
    """The reserved attempt had the right password (a wrong one simply stays counted): clear the
    email's count and take this attempt's count, and any lock it set, back from the address, whose
    other failures still stand."""
    if reservation.ip is not None:
        ip_row = (col(LoginThrottle.scope) == "ip") & (col(LoginThrottle.key) == reservation.ip[:320])
        values: dict[str, Any] = {
            "failures": case((col(LoginThrottle.failures) > 0, col(LoginThrottle.failures) - 1), else_=0)
        }
        if "ip" in reservation.locked:
            values["locked_until"] = None
        await session.execute(
            update(LoginThrottle).where(ip_row).values(**values).execution_options(synchronize_session=False)
        )
    await reset_email(session, reservation.email)


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
