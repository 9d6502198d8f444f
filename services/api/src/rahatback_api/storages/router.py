from __future__ import annotations

from fastapi import APIRouter, status

from rahatback_api.auth.deps import AdminPrincipal, CurrentPrincipal
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep
from rahatback_api.storages import service
from rahatback_api.storages.models import StorageCreate, StoragePublic, StorageUpdate

router = APIRouter(prefix="/v1/storages", tags=["storages"])


@router.post("", response_model=StoragePublic, status_code=status.HTTP_201_CREATED)
async def create_storage(
    body: StorageCreate, principal: AdminPrincipal, session: SessionDep, box: SecretBoxDep
) -> StoragePublic:
    return service.storage_public(await service.create_storage(session, box, principal.org_id, body))


@router.get("", response_model=list[StoragePublic])
async def list_storages(principal: CurrentPrincipal, session: SessionDep) -> list[StoragePublic]:
    return [service.storage_public(s) for s in await service.list_storages(session, principal.org_id)]


@router.get("/{storage_id}", response_model=StoragePublic)
async def get_storage(storage_id: str, principal: CurrentPrincipal, session: SessionDep) -> StoragePublic:
    return service.storage_public(await service.get_storage(session, principal.org_id, storage_id))


@router.patch("/{storage_id}", response_model=StoragePublic)
async def update_storage(
    storage_id: str, body: StorageUpdate, principal: AdminPrincipal, session: SessionDep, box: SecretBoxDep
) -> StoragePublic:
    return service.storage_public(
        await service.update_storage(session, box, principal.org_id, storage_id, body)
    )


@router.delete("/{storage_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_storage(storage_id: str, principal: AdminPrincipal, session: SessionDep) -> None:
    await service.delete_storage(session, principal.org_id, storage_id)
