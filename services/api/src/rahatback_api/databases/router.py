from __future__ import annotations

from fastapi import APIRouter, status

from rahatback_api.auth.deps import AdminPrincipal, CurrentPrincipal
from rahatback_api.databases import service
from rahatback_api.databases.models import DatabaseCreate, DatabasePublic, DatabaseUpdate
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep

router = APIRouter(prefix="/v1/databases", tags=["databases"])


@router.post("", response_model=DatabasePublic, status_code=status.HTTP_201_CREATED)
async def create_database(
    body: DatabaseCreate, principal: AdminPrincipal, session: SessionDep, box: SecretBoxDep
) -> DatabasePublic:
    return service.database_public(await service.create_database(session, box, principal.org_id, body))


@router.get("", response_model=list[DatabasePublic])
async def list_databases(principal: CurrentPrincipal, session: SessionDep) -> list[DatabasePublic]:
    return [service.database_public(d) for d in await service.list_databases(session, principal.org_id)]


@router.get("/{database_id}", response_model=DatabasePublic)
async def get_database(database_id: str, principal: CurrentPrincipal, session: SessionDep) -> DatabasePublic:
    return service.database_public(await service.get_database(session, principal.org_id, database_id))


@router.patch("/{database_id}", response_model=DatabasePublic)
async def update_database(
    database_id: str,
    body: DatabaseUpdate,
    principal: AdminPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
) -> DatabasePublic:
    db = await service.update_database(session, box, principal.org_id, database_id, body)
    return service.database_public(db)


@router.delete("/{database_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_database(database_id: str, principal: AdminPrincipal, session: SessionDep) -> None:
    await service.delete_database(session, principal.org_id, database_id)
