"""Databases the agents back up. Secret settings are encrypted at rest and never returned."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow
from rahatback_api.databases.engines import EngineName


class Database(SQLModel, table=True):
    __tablename__ = "databases"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    agent_id: str | None = Field(default=None, foreign_key="agents.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    engine: str = Field(max_length=32)
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # non-secret fields only
    # SecretBox ciphertext (AAD f"database:{id}") of a JSON object of the engine's secret fields
    secrets_encrypted: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class DatabaseCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str = PydanticField(min_length=1, max_length=200)
    engine: EngineName
    agent_id: str | None = None
    # engine-specific; validated against the engine's schema in databases/engines.py
    settings: dict[str, Any] = PydanticField(default_factory=dict)


class DatabaseUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str | None = PydanticField(default=None, min_length=1, max_length=200)
    agent_id: str | None = None
    # merged over the stored settings; secret fields replace the stored secret
    settings: dict[str, Any] | None = None


class DatabasePublic(BaseModel):
    id: str
    name: str
    engine: str
    agent_id: str | None
    settings: dict[str, Any]
    has_password: bool
    created_at: datetime
    updated_at: datetime
