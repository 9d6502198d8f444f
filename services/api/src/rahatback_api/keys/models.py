"""Customer-held backup keys as the control plane knows them: ids and fingerprints that agents
report, never key material (docs/backup-keys.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict
from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from rahatback_api.columns import ID_LENGTH, UTCDateTime, new_id, utcnow

KeyCustody = Literal["managed", "customer"]


class CustomerKey(SQLModel, table=True):
    """A customer key id in an organization, pinned to the fingerprint first reported for it:
    commands name both, so an agent holding another key under the same id refuses."""

    __tablename__ = "customer_keys"
    __table_args__ = (UniqueConstraint("org_id", "key_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    key_id: str = Field(max_length=80)
    fingerprint: str = Field(max_length=64)
    first_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class CustomerKeyHolder(SQLModel, table=True):
    """One agent reporting one key id (with the fingerprint it reports); removed once the agent has
    not reported it for `custody.HOLDER_GRACE` (a missed heartbeat or two does not remove it)."""

    __tablename__ = "customer_key_holders"
    __table_args__ = (UniqueConstraint("agent_id", "key_id"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=ID_LENGTH)
    org_id: str = Field(foreign_key="organizations.id", index=True, max_length=ID_LENGTH)
    agent_id: str = Field(index=True, max_length=ID_LENGTH)  # no FK: agents are revoked, not deleted
    key_id: str = Field(max_length=80)
    fingerprint: str = Field(max_length=64)
    first_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --- HTTP schemas -------------------------------------------------------------------------------


class KeyHolderPublic(BaseModel):
    agent_id: str
    agent_name: str
    fingerprint: str
    # False: the agent holds a different key under this id (its commands would be refused)
    fingerprint_matches: bool
    first_seen_at: datetime
    last_seen_at: datetime


class BackupKeyPublic(BaseModel):
    """A backup key without its material. Managed: kept by the control plane under its master key,
    one per job generation. Customer: kept only by the agents in `holders`."""

    key_id: str
    custody: KeyCustody
    fingerprint: str | None  # customer keys only
    job_id: str | None  # managed keys: the job it was made for
    used_by_job_ids: list[str]  # jobs whose new backups use this key now
    created_at: datetime  # managed: generated; customer: first reported
    last_seen_at: datetime | None  # customer keys: last reported by a holder
    holders: list[KeyHolderPublic]


class RotateKey(BaseModel):
    """Managed: no body needed, a new generation is made. Customer: name the new key (held by the
    job's agent). `key_custody` switches the job between the modes."""

    model_config = ConfigDict(extra="forbid")

    key_custody: KeyCustody | None = None  # default: the job's current custody
    customer_key_id: str | None = None
