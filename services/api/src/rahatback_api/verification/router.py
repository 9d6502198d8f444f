from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field

from rahatback_api.auth.deps import CurrentPrincipal, OperatorPrincipal
from rahatback_api.backups.models import Page, VerifyLevel, VerifyRunPublic
from rahatback_api.backups.service import get_run
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep, SettingsDep
from rahatback_api.models import VerifyRun
from rahatback_api.verification import service

router = APIRouter(prefix="/v1/backups", tags=["verification"])


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: VerifyLevel = Field(
        default="integrity",
        description="integrity: checksums of artifact and dump; test_restore: also restore into a scratch "
        "database on the source server and compare row counts with the manifest",
    )
    storage_id: str | None = Field(default=None, description="the copy to verify; default as for restore")


def verify_public(verify: VerifyRun) -> VerifyRunPublic:
    return VerifyRunPublic.model_validate(verify, from_attributes=True)


@router.post("/history/{run_id}/verify", status_code=status.HTTP_202_ACCEPTED, response_model=VerifyRunPublic)
async def verify_backup(
    run_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
    body: VerifyRequest | None = None,
) -> VerifyRunPublic:
    """Prove that a backup restores: the agent downloads and checks it (and, for a test restore,
    restores it into a scratch database it drops afterwards). Never touches the source database."""
    body = body or VerifyRequest()
    run = await get_run(session, principal.org_id, run_id)
    verify = await service.start_verify(
        session,
        box,
        run,
        level=body.level,
        storage_id=body.storage_id,
        offline_after=timedelta(seconds=settings.agent_offline_seconds),
    )
    return verify_public(verify)


@router.get("/verifications", response_model=Page[VerifyRunPublic])
async def list_verifications(
    principal: CurrentPrincipal,
    session: SessionDep,
    backup_run_id: str | None = None,
    job_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,  # beyond: a database error
) -> Page[VerifyRunPublic]:
    rows, total = await service.list_verifies(session, principal.org_id, backup_run_id, job_id, limit, offset)
    items = [verify_public(v) for v in rows]
    return Page[VerifyRunPublic](items=items, total=total, limit=limit, offset=offset)


@router.get("/verifications/{verify_id}", response_model=VerifyRunPublic)
async def get_verification(
    verify_id: str, principal: CurrentPrincipal, session: SessionDep
) -> VerifyRunPublic:
    return verify_public(await service.get_verify(session, principal.org_id, verify_id))
