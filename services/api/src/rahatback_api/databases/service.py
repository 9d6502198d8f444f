"""Databases: engine settings validated per engine, secrets encrypted with the row id as AAD."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.service import get_usable_agent
from rahatback_api.backups.models import BackupJob
from rahatback_api.columns import utcnow
from rahatback_api.databases.engines import ENGINES
from rahatback_api.databases.models import Database, DatabaseCreate, DatabasePublic, DatabaseUpdate
from rahatback_api.errors import Conflict, NotFound
from rahatback_api.security.secretbox import SecretBox


def _aad(database_id: str) -> bytes:
    return f"database:{database_id}".encode()


def _seal(box: SecretBox, db: Database, secrets: dict[str, Any]) -> None:
    db.secrets_encrypted = box.encrypt(json.dumps(secrets).encode(), _aad(db.id)) if secrets else None


def database_secrets(box: SecretBox, db: Database) -> dict[str, Any]:
    if db.secrets_encrypted is None:
        return {}
    secrets: dict[str, Any] = json.loads(box.decrypt(db.secrets_encrypted, _aad(db.id)))
    return secrets


def database_public(db: Database) -> DatabasePublic:
    return DatabasePublic(
        id=db.id,
        name=db.name,
        engine=db.engine,
        agent_id=db.agent_id,
        settings=dict(db.settings),
        has_password=db.secrets_encrypted is not None,
        created_at=db.created_at,
        updated_at=db.updated_at,
    )


async def _check_name_free(
    session: AsyncSession, org_id: str, name: str, exclude_id: str | None = None
) -> None:
    query = select(Database.id).where(Database.org_id == org_id, Database.name == name)
    if exclude_id is not None:
        query = query.where(Database.id != exclude_id)
    if (await session.execute(query)).first() is not None:
        raise Conflict(f"a database named {name!r} already exists", field="name")


async def create_database(
    session: AsyncSession, box: SecretBox, org_id: str, data: DatabaseCreate
) -> Database:
    settings, secrets = ENGINES[data.engine].split(data.settings)
    await _check_name_free(session, org_id, data.name)
    if data.agent_id is not None:
        await get_usable_agent(session, org_id, data.agent_id, "agent_id")
    db = Database(
        org_id=org_id, name=data.name, engine=data.engine, agent_id=data.agent_id, settings=settings
    )
    _seal(box, db, secrets)
    session.add(db)
    await session.flush()
    return db


async def list_databases(session: AsyncSession, org_id: str) -> list[Database]:
    result = await session.execute(
        select(Database).where(Database.org_id == org_id).order_by(col(Database.name))
    )
    return list(result.scalars())


async def get_database(session: AsyncSession, org_id: str, database_id: str) -> Database:
    db = (
        await session.execute(select(Database).where(Database.id == database_id, Database.org_id == org_id))
    ).scalar_one_or_none()
    if db is None:
        raise NotFound("database")
    return db


async def update_database(
    session: AsyncSession, box: SecretBox, org_id: str, database_id: str, data: DatabaseUpdate
) -> Database:
    db = await get_database(session, org_id, database_id)
    fields = data.model_fields_set
    if "name" in fields and data.name is not None and data.name != db.name:
        await _check_name_free(session, org_id, data.name, exclude_id=db.id)
        db.name = data.name
    if "agent_id" in fields:
        if data.agent_id is not None:
            await get_usable_agent(session, org_id, data.agent_id, "agent_id")
        db.agent_id = data.agent_id
    if data.settings is not None:
        settings, secrets = ENGINES[db.engine].merge(db.settings, database_secrets(box, db), data.settings)
        db.settings = settings
        _seal(box, db, secrets)
    db.updated_at = utcnow()
    await session.flush()
    return db


async def delete_database(session: AsyncSession, org_id: str, database_id: str) -> None:
    db = await get_database(session, org_id, database_id)
    jobs = (
        await session.execute(
            select(func.count()).select_from(BackupJob).where(BackupJob.database_id == db.id)
        )
    ).scalar_one()
    if jobs:
        raise Conflict(f"{jobs} backup job(s) use this database; delete or change them first")
    await session.delete(db)
    await session.flush()
