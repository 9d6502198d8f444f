"""Where backups go. Same shape as databases: settings in clear, secrets encrypted, write-only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic import Field as PydanticField
from sqlalchemy import JSON, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow
from rahatback_api.storages.kinds import StorageKindName


class Storage(SQLModel, table=True):
    __tablename__ = "storages"
    __table_args__ = (UniqueConstraint("org_id", "name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    agent_id: str | None = Field(default=None, foreign_key="agents.id", index=True, max_length=ID_LENGTH)
    name: str = Field(max_length=200)
    kind: str = Field(max_length=32)
    settings: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)
    # SecretBox ciphertext (AAD f"storage:{id}") of a JSON object of the kind's secret fields
    secrets_encrypted: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class StorageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str = PydanticField(min_length=1, max_length=200)
    kind: StorageKindName
    agent_id: str | None = None
    settings: dict[str, Any] = PydanticField(default_factory=dict)


class StorageUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt or read-only field is a 422

    name: str | None = PydanticField(default=None, min_length=1, max_length=200)
    agent_id: str | None = None
    settings: dict[str, Any] | None = None


class StoragePublic(BaseModel):
    id: str
    name: str
    kind: str
    agent_id: str | None
    settings: dict[str, Any]
    has_secrets: bool
    created_at: datetime
    updated_at: datetime
