"""Database engine, sessions and migrations.

Services take an `AsyncSession` first and never commit: the request scope (`SessionDep`) commits once
after the endpoint returns and rolls back on any error; background code uses `session_scope`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from alembic import command
from alembic.config import Config
from fastapi import Depends, Request
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Set on the session by code that wrote an OutboxMessage; after the commit the request scope sets
# `app.state.outbox_wakeup` (an asyncio.Event, if the outbox relay installed one) so it publishes now.
OUTBOX_PENDING = "rahatback.outbox_pending"


def async_url(url: str) -> str:
    """Accept plain `postgresql://` and `sqlite://` URLs and pick the async drivers."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    return parsed.render_as_string(hide_password=False)


def _sqlite_pragmas(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")  # wait for a concurrent writer instead of failing
    cursor.execute("PRAGMA journal_mode=WAL")  # readers don't block the writer
    cursor.close()


def create_engine(database_url: str) -> AsyncEngine:
    url = make_url(async_url(database_url))
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(url, pool_pre_ping=True)


def create_sessionmaker(
    engine: AsyncEngine, info: dict[str, Any] | None = None
) -> async_sessionmaker[AsyncSession]:
    """`info` becomes every session's `session.info` (the app puts its AppContext there)."""
    # expire_on_commit=False: objects stay readable after the commit, e.g. to build the response
    return async_sessionmaker(engine, expire_on_commit=False, info=info or {})


@asynccontextmanager
async def session_scope(sessionmaker: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """One transaction: commit if the block succeeds, roll back if it raises."""
    async with sessionmaker() as session:
        try:
            yield session
            await session.commit()
        except BaseException:
            await session.rollback()
            raise


async def _request_session(request: Request) -> AsyncIterator[AsyncSession]:
    sessionmaker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    async with session_scope(sessionmaker) as session:
        yield session
    wakeup: asyncio.Event | None = getattr(request.app.state, "outbox_wakeup", None)
    if session.info.get(OUTBOX_PENDING) and wakeup is not None:
        wakeup.set()


# scope="function": the commit happens before the response is sent, so a failed commit is an error
# response (e.g. 409) instead of a 2xx for a change that was never stored.
SessionDep = Annotated[AsyncSession, Depends(_request_session, scope="function")]


def alembic_config(database_url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        cfg.set_main_option("sqlalchemy.url", async_url(database_url).replace("%", "%%"))
    return cfg


async def run_migrations(database_url: str, revision: str = "head") -> None:
    """Upgrade the schema; safe to call on every start (a no-op at head)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                # SQLite alters a table by copying it and dropping the original, which foreign keys
                # pointing at it forbid; the pragma only takes effect outside a transaction
                await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                await conn.commit()  # ends SQLAlchemy's autobegun transaction (no SQL BEGIN was sent)
            async with conn.begin():
                await conn.run_sync(_upgrade, revision)
    finally:
        await engine.dispose()


def _upgrade(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection  # env.py uses it instead of opening its own
    command.upgrade(cfg, revision)
