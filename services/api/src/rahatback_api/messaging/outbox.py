"""Transactional outbox: messages are rows written in the same transaction as the state they announce.

A relay publishes them after the commit, with the row's Msg-Id, so a rolled-back change never
announces anything and a crash between commit and publish only delays the message. Several API
replicas may relay the same row; JetStream's deduplication by Msg-Id makes that harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime

import structlog
from rahatback_api.db import OUTBOX_PENDING
from rahatback_api.models import OutboxMessage
from rahatback_contracts.messages import Message
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select

from .bus import Bus

log = structlog.get_logger(__name__)


def enqueue(
    session: AsyncSession,
    subject: str,
    message: Message | None,
    msg_id: str,
    headers: dict[str, str] | None = None,
) -> None:
    """`message=None` publishes an empty body (e.g. a KV delete, told by its headers)."""
    session.info[OUTBOX_PENDING] = True
    session.add(
        OutboxMessage(
            id=uuid.uuid4().hex,
            subject=subject,
            msg_id=msg_id,
            payload="" if message is None else message.model_dump_json(),
            headers=headers,
            created_at=datetime.now(UTC),
        )
    )


class OutboxRelay:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], bus: Bus, poll_seconds: float = 2.0
    ) -> None:
        self._sessions = sessions
        self._bus = bus
        self._poll_seconds = poll_seconds
        # the request scope sets this event after a commit that enqueued something (db.OUTBOX_PENDING)
        self.wakeup = asyncio.Event()

    def kick(self) -> None:
        """Called after a commit that enqueued something: publish now rather than at the next poll."""
        self.wakeup.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            self.wakeup.clear()
            try:
                await self.publish_pending()
            except Exception:  # the relay must outlive a NATS or DB hiccup; the next pass retries
                log.exception("outbox.relay_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), self._poll_seconds)

    async def publish_pending(self, batch: int = 100) -> int:
        published = 0
        while True:
            async with self._sessions() as session:
                rows = (
                    (
                        await session.execute(
                            select(OutboxMessage)
                            .where(col(OutboxMessage.published_at).is_(None))
                            .order_by(col(OutboxMessage.created_at))
                            .limit(batch)
                        )
                    )
                    .scalars()
                    .all()
                )
                if not rows:
                    return published
                for row in rows:
                    await self._bus.publish_durable(
                        row.subject, row.payload.encode(), row.msg_id, row.headers
                    )
                    row.published_at = datetime.now(UTC)
                    published += 1
                await session.commit()
