"""Storages: settings validated per kind, secrets encrypted with the row id as AAD."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.agents.service import get_usable_agent
from rahatback_api.backups.models import BackupJob
from rahatback_api.columns import utcnow
from rahatback_api.errors import Conflict, NotFound
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.storages.kinds import KINDS
from rahatback_api.storages.models import Storage, StorageCreate, StoragePublic, StorageUpdate


def _aad(storage_id: str) -> bytes:
    return f"storage:{storage_id}".encode()


def _seal(box: SecretBox, storage: Storage, secrets: dict[str, Any]) -> None:
    storage.secrets_encrypted = (
        box.encrypt(json.dumps(secrets).encode(), _aad(storage.id)) if secrets else None
    )


def storage_secrets(box: SecretBox, storage: Storage) -> dict[str, Any]:
    if storage.secrets_encrypted is None:
        return {}
    secrets: dict[str, Any] = json.loads(box.decrypt(storage.secrets_encrypted, _aad(storage.id)))
    return secrets


def storage_public(storage: Storage) -> StoragePublic:
    return StoragePublic(
        id=storage.id,
        name=storage.name,
        kind=storage.kind,
        agent_id=storage.agent_id,
        settings=dict(storage.settings),
        has_secrets=storage.secrets_encrypted is not None,
        created_at=storage.created_at,
        updated_at=storage.updated_at,
    )


async def _check_name_free(
    session: AsyncSession, org_id: str, name: str, exclude_id: str | None = None
) -> None:
    query = select(Storage.id).where(Storage.org_id == org_id, Storage.name == name)
    if exclude_id is not None:
        query = query.where(Storage.id != exclude_id)
    if (await session.execute(query)).first() is not None:
        raise Conflict(f"a storage named {name!r} already exists", field="name")


async def create_storage(session: AsyncSession, box: SecretBox, org_id: str, data: StorageCreate) -> Storage:
    settings, secrets = KINDS[data.kind].split(data.settings)
    await _check_name_free(session, org_id, data.name)
    if data.agent_id is not None:
        await get_usable_agent(session, org_id, data.agent_id, "agent_id")
    storage = Storage(
        org_id=org_id, name=data.name, kind=data.kind, agent_id=data.agent_id, settings=settings
    )
    _seal(box, storage, secrets)
    session.add(storage)
    await session.flush()
    return storage


async def list_storages(session: AsyncSession, org_id: str) -> list[Storage]:
    result = await session.execute(
        select(Storage).where(Storage.org_id == org_id).order_by(col(Storage.name))
    )
    return list(result.scalars())


async def get_storage(session: AsyncSession, org_id: str, storage_id: str) -> Storage:
    storage = (
        await session.execute(select(Storage).where(Storage.id == storage_id, Storage.org_id == org_id))
    ).scalar_one_or_none()
    if storage is None:
        raise NotFound("storage")
    return storage


async def update_storage(
    session: AsyncSession, box: SecretBox, org_id: str, storage_id: str, data: StorageUpdate
) -> Storage:
    storage = await get_storage(session, org_id, storage_id)
    fields = data.model_fields_set
    if "name" in fields and data.name is not None and data.name != storage.name:
        await _check_name_free(session, org_id, data.name, exclude_id=storage.id)
        storage.name = data.name
    if "agent_id" in fields:
        if data.agent_id is not None:
            await get_usable_agent(session, org_id, data.agent_id, "agent_id")
        storage.agent_id = data.agent_id
    if data.settings is not None:
        settings, secrets = KINDS[storage.kind].merge(
            storage.settings, storage_secrets(box, storage), data.settings
        )
        storage.settings = settings
        _seal(box, storage, secrets)
    storage.updated_at = utcnow()
    await session.flush()
    return storage


async def delete_storage(session: AsyncSession, org_id: str, storage_id: str) -> None:
    storage = await get_storage(session, org_id, storage_id)
    org_jobs = (await session.execute(select(BackupJob).where(BackupJob.org_id == org_id))).scalars()
    jobs = sum(1 for j in org_jobs if storage.id == j.storage_id or storage.id in j.extra_storage_ids)
    if jobs:
        raise Conflict(f"{jobs} backup job(s) use this storage; delete or change them first")
    await session.delete(storage)
    await session.flush()
