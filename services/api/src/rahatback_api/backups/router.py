from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Query, status

from rahatback_api.auth.deps import AdminPrincipal, CurrentPrincipal, OperatorPrincipal
from rahatback_api.backups import service
from rahatback_api.backups.models import (
    BackupJobCreate,
    BackupJobPublic,
    BackupJobUpdate,
    BackupKey,
    BackupKeyExport,
    BackupRunPublic,
    Page,
    RestoreRunPublic,
    RunStatus,
)
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep
from rahatback_api.errors import NotFound
from rahatback_api.keys.service import refuse_customer_export

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/backups", tags=["backups"])

Limit = Annotated[int, Query(ge=1, le=200)]
# beyond this a database refuses the OFFSET (a 500); no history is that long anyway
Offset = Annotated[int, Query(ge=0, le=1_000_000_000)]


@router.post("/jobs", response_model=BackupJobPublic, status_code=status.HTTP_201_CREATED)
async def create_job(
    body: BackupJobCreate, principal: OperatorPrincipal, session: SessionDep, box: SecretBoxDep
) -> BackupJobPublic:
    return service.job_public(await service.create_job(session, box, principal.org_id, body))


@router.get("/jobs", response_model=list[BackupJobPublic])
async def list_jobs(principal: CurrentPrincipal, session: SessionDep) -> list[BackupJobPublic]:
    return [service.job_public(j) for j in await service.list_jobs(session, principal.org_id)]


@router.get("/jobs/{job_id}", response_model=BackupJobPublic)
async def get_job(job_id: str, principal: CurrentPrincipal, session: SessionDep) -> BackupJobPublic:
    return service.job_public(await service.get_job(session, principal.org_id, job_id))


@router.patch("/jobs/{job_id}", response_model=BackupJobPublic)
async def update_job(
    job_id: str, body: BackupJobUpdate, principal: OperatorPrincipal, session: SessionDep
) -> BackupJobPublic:
    return service.job_public(await service.update_job(session, principal.org_id, job_id, body))


@router.delete("/jobs/{job_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_job(job_id: str, principal: AdminPrincipal, session: SessionDep) -> None:
    await service.delete_job(session, principal.org_id, job_id)


@router.get("/history", response_model=Page[BackupRunPublic])
async def list_history(
    principal: CurrentPrincipal,
    session: SessionDep,
    job_id: str | None = None,
    database_id: str | None = None,
    batch_id: Annotated[
        str | None, Query(description="the runs one start of a whole-server job made")
    ] = None,
    status: RunStatus | None = None,
    since: Annotated[datetime | None, Query(description="queued at or after (ISO 8601)")] = None,
    until: Annotated[datetime | None, Query(description="queued before (ISO 8601)")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[BackupRunPublic]:
    filters = service.HistoryFilter(
        job_id=job_id, database_id=database_id, batch_id=batch_id, status=status, since=since, until=until
    )
    runs, total = await service.list_runs(session, principal.org_id, filters, limit, offset)
    items = await service.runs_public(session, runs)
    return Page[BackupRunPublic](items=items, total=total, limit=limit, offset=offset)


@router.get("/history/{run_id}", response_model=BackupRunPublic)
async def get_history_run(run_id: str, principal: CurrentPrincipal, session: SessionDep) -> BackupRunPublic:
    run = await service.get_run(session, principal.org_id, run_id)
    return (await service.runs_public(session, [run]))[0]


@router.get("/restores", response_model=Page[RestoreRunPublic])
async def list_restores(
    principal: CurrentPrincipal,
    session: SessionDep,
    backup_run_id: str | None = None,
    database_id: str | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[RestoreRunPublic]:
    restores, total = await service.list_restores(
        session, principal.org_id, backup_run_id, database_id, limit, offset
    )
    items = [service.restore_public(r) for r in restores]
    return Page[RestoreRunPublic](items=items, total=total, limit=limit, offset=offset)


@router.get("/restores/{restore_id}", response_model=RestoreRunPublic)
async def get_restore(restore_id: str, principal: CurrentPrincipal, session: SessionDep) -> RestoreRunPublic:
    return service.restore_public(await service.get_restore(session, principal.org_id, restore_id))


@router.post("/keys/{key_id}/export", response_model=BackupKeyExport)
async def export_key(
    key_id: str, principal: AdminPrincipal, session: SessionDep, box: SecretBoxDep
) -> BackupKeyExport:
    """The raw backup key, for recovery without RahatBack (`rahatback-agent decrypt --key`).

    Admins only, on purpose with POST: whoever holds this key can read every backup made with it.
    """
    await refuse_customer_export(session, principal.org_id, key_id)
    stored = await session.get(BackupKey, key_id)
    if stored is None or stored.org_id != principal.org_id:
        raise NotFound("backup key")  # another organization's key is as absent as an unknown one
    key = await service.load_backup_key(session, box, principal.org_id, key_id)
    log.warning("backup key exported", key_id=key_id, user_id=principal.user.id, org_id=principal.org_id)
    return BackupKeyExport(key_id=key_id, key_b64=base64.b64encode(key).decode())
