"""Tenants, people and their tokens."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import JSON, UniqueConstraint
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow

Role = Literal["owner", "admin", "operator", "viewer"]
ROLE_RANK: dict[str, int] = {"viewer": 0, "operator": 1, "admin": 2, "owner": 3}
Scope = Literal["read", "write", "admin", "*"]


class Organization(SQLModel, table=True):
    __tablename__ = "organizations"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class User(SQLModel, table=True):
    __tablename__ = "users"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    email: str = Field(max_length=320, unique=True)  # stored lowercased
    password_hash: str = Field(max_length=255)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class Membership(SQLModel, table=True):
    __tablename__ = "memberships"
    __table_args__ = (UniqueConstraint("org_id", "user_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=ID_LENGTH)
    role: str = Field(max_length=16)  # Role
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ApiToken(SQLModel, table=True):
    __tablename__ = "api_tokens"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    user_id: str = Field(foreign_key="users.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    # SHA-256 hex of the token. Not a password hash on purpose: tokens are 32 random bytes, so there
    # is nothing to brute-force, and a deterministic hash lets us find the row by a unique index.
    token_hash: str = Field(max_length=64, unique=True)
    prefix: str = Field(max_length=16)  # first characters, so users can tell their tokens apart
    scopes: list[str] = Field(default_factory=list, sa_type=JSON)
    kind: str = Field(default="personal", max_length=16)  # personal | session (login)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class LoginThrottle(SQLModel, table=True):
    """Failed logins counted per email and per client address, shared by every API replica."""

    __tablename__ = "login_throttles"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    scope: str = Field(max_length=8)  # "email" | "ip"
    key: str = Field(max_length=320)  # the lowercased email, or the client address
    failures: int = 0  # within the window that started at `window_started_at`
    window_started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    locked_until: datetime | None = Field(default=None, sa_type=UTCDateTime)


# --- HTTP schemas -------------------------------------------------------------------------------


class LoginRequest(BaseModel):
    email: str = PydanticField(min_length=3, max_length=320)
    password: str = PydanticField(min_length=1, max_length=1024)
    org_id: str | None = None  # which organization to act in, when the user belongs to several


class LoginResponse(BaseModel):
    token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth token type name, not a secret
    expires_at: datetime


class OrganizationPublic(BaseModel):
    id: str
    name: str


class MePublic(BaseModel):
    user_id: str
    email: str
    org: OrganizationPublic
    role: Role
    scopes: list[str]


class ApiTokenCreate(BaseModel):
    name: str = PydanticField(min_length=1, max_length=200)
    scopes: list[Scope] = PydanticField(default=["read"], min_length=1)
    expires_in_days: int = PydanticField(default=90, ge=1, le=365)


class ApiTokenPublic(BaseModel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


class ApiTokenCreated(ApiTokenPublic):
    token: str  # shown once, never again
