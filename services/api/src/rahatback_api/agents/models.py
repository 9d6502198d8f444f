"""Agents on customer hosts and the one-time tokens that enroll them."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import JSON
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow

ENROLLMENT_TTL_MAX_MINUTES = 7 * 24 * 60


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_tokens"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    token_hash: str = Field(max_length=64, unique=True)  # SHA-256 hex, see security/tokens.py
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_by_user_id: str = Field(foreign_key="users.id", max_length=ID_LENGTH)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Agent(SQLModel, table=True):
    __tablename__ = "agents"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    hostname: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=64)
    x25519_public_key: str = Field(max_length=128)  # base64 of the raw 32-byte public key
    engines: list[str] = Field(default_factory=list, sa_type=JSON)
    storages: list[str] = Field(default_factory=list, sa_type=JSON)
    tools: dict[str, str] = Field(default_factory=dict, sa_type=JSON)  # dump tool → version
    last_seen_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    enrolled_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # operator/JWT mode (docs/nats-security.md): the agent's NATS user public key (`U…`, its seed
    # never leaves the agent) and when the last user JWT minted for it expires
    # unique: revocations are keyed by it, so one key must never stand for two agents
    nats_public_key: str | None = Field(default=None, max_length=56, unique=True, index=True)
    nats_jwt_expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class EnrollmentTokenCreate(BaseModel):
    ttl_minutes: int = PydanticField(default=60, ge=1, le=ENROLLMENT_TTL_MAX_MINUTES)


class EnrollmentTokenCreated(BaseModel):
    id: str
    token: str  # shown once
    expires_at: datetime


class AgentPublic(BaseModel):
    id: str
    name: str
    hostname: str
    version: str
    online: bool
    last_seen_at: datetime | None
    engines: list[str]
    storages: list[str]
    tools: dict[str, str]
    enrolled_at: datetime
    revoked: bool
    revoked_at: datetime | None
