"""Notification channels: who hears about which events (per organization, optionally per job)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, HttpUrl, model_validator
from pydantic import Field as PydanticField
from rahatback_contracts.streams import EVENT_TYPES
from sqlalchemy import JSON, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow

ChannelKind = Literal["email", "webhook", "slack"]

# what a new channel hears about when the user does not say: everything that needs a person
DEFAULT_EVENTS = ("backup.failed", "backup.partial", "backup.overdue", "restore.failed", "verify.failed")


def _known_events(events: list[str]) -> list[str]:
    unknown = sorted(set(events) - set(EVENT_TYPES))
    if unknown:
        raise ValueError(f"unknown event types {unknown}; known: {', '.join(EVENT_TYPES)}")
    return sorted(set(events))


Events = Annotated[list[str], AfterValidator(_known_events)]


class NotificationChannel(SQLModel, table=True):
    __tablename__ = "notification_channels"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    kind: str = Field(max_length=16)
    enabled: bool = True
    events: list[str] = Field(default_factory=list, sa_type=JSON)
    # None: every job of the organization (and events without a job, e.g. agent offline)
    job_ids: list[str] | None = Field(default=None, sa_type=JSON)
    recipients: list[str] = Field(default_factory=list, sa_type=JSON)  # email channels
    # SecretBox ciphertext (AAD f"notification-channel:{id}") of {"url": ..., "secret": ...}
    secrets_encrypted: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class _ChannelFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    events: Events | None = None
    job_ids: list[str] | None = None
    recipients: list[EmailStr] | None = PydanticField(default=None, max_length=50)
    # webhook / slack: the endpoint (write-only: Slack's URL is itself a credential)
    url: HttpUrl | None = None
    # webhook: the HMAC-SHA256 signing secret (write-only)
    secret: str | None = PydanticField(default=None, min_length=16, max_length=512)


class NotificationChannelCreate(_ChannelFields):
    name: str = PydanticField(min_length=1, max_length=200)
    kind: ChannelKind

    @model_validator(mode="after")
    def _complete(self) -> NotificationChannelCreate:
        if self.kind == "email" and not self.recipients:
            raise ValueError("an email channel needs at least one address in `recipients`")
        if self.kind != "email" and self.url is None:
            raise ValueError(f"a {self.kind} channel needs its `url`")
        if self.kind != "webhook" and self.secret is not None:
            raise ValueError("only webhook channels take a signing `secret`")
        if self.kind != "email" and self.recipients:
            raise ValueError("`recipients` are for email channels")
        return self


class NotificationChannelUpdate(_ChannelFields):
    name: str | None = PydanticField(default=None, min_length=1, max_length=200)


class NotificationChannelPublic(BaseModel):
    id: str
    name: str
    kind: ChannelKind
    enabled: bool
    events: list[str]
    job_ids: list[str] | None
    recipients: list[str]
    has_url: bool
    has_secret: bool
    created_at: datetime
    updated_at: datetime
