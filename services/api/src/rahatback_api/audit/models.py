"""The audit log table and its HTTP schemas."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import JSON, Index
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow


class AuditEvent(SQLModel, table=True):
    """One thing someone did (or tried to do).

    No foreign keys on purpose: the record must outlive the user, token or resource it names, and a
    failed constraint must never be the reason an event goes unrecorded.
    """

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_org_id_at", "org_id", "at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    # None when no organization can be named (e.g. a failed login for an unknown email)
    org_id: str | None = Field(default=None, max_length=ID_LENGTH)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    actor_user_id: str | None = Field(default=None, max_length=ID_LENGTH)
    token_id: str | None = Field(default=None, max_length=ID_LENGTH)
    action: str = Field(max_length=64)  # the route's name (`restore_run`) or `login`, `login_failed`…
    target_type: str | None = Field(default=None, max_length=64)
    target_id: str | None = Field(default=None, max_length=200)
    method: str = Field(max_length=8)
    path: str = Field(max_length=300)  # the route template, e.g. /v1/databases/{database_id}
    status_code: int
    client_ip: str | None = Field(default=None, max_length=64)
    user_agent: str | None = Field(default=None, max_length=300)
    # field NAMES of the request body, never their values (`{"fields": ["password"]}`)
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)


class AuditEventPublic(BaseModel):
    id: str
    at: datetime
    actor_user_id: str | None
    actor_email: str | None
    token_id: str | None
    action: str
    target_type: str | None
    target_id: str | None
    method: str
    path: str
    status_code: int
    client_ip: str | None
    user_agent: str | None
    details: dict[str, Any]


class AuditPage(BaseModel):
    items: list[AuditEventPublic]
    total: int
    limit: int
    offset: int
