"""Transactional outbox and consumer idempotency."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Text
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow


class OutboxMessage(SQLModel, table=True):
    """A NATS message written in the same transaction as the change it announces.

    Published only after the commit (a rolled-back change must not have an event), with
    `msg_id` as `Nats-Msg-Id` so a re-publish after a crash is deduplicated by JetStream.
    """

    __tablename__ = "outbox_messages"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    subject: str = Field(max_length=255)
    msg_id: str = Field(max_length=255, unique=True)
    payload: str = Field(sa_type=Text)  # the JSON message body
    headers: dict[str, str] | None = Field(default=None, sa_type=JSON)  # besides Nats-Msg-Id
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, index=True)
    published_at: datetime | None = Field(default=None, sa_type=UTCDateTime, index=True)


class ProcessedMessage(SQLModel, table=True):
    """Msg-Ids the reports consumer has applied: a redelivery finds its row and changes nothing."""

    __tablename__ = "processed_messages"

    msg_id: str = Field(primary_key=True, max_length=255)
    processed_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
