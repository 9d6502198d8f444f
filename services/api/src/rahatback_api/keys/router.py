from __future__ import annotations

from fastapi import APIRouter

from rahatback_api.auth.deps import CurrentPrincipal, OperatorPrincipal
from rahatback_api.backups.models import BackupJobPublic
from rahatback_api.backups.service import job_public
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep
from rahatback_api.keys import service
from rahatback_api.keys.models import BackupKeyPublic, RotateKey

router = APIRouter(tags=["keys"])


@router.get("/v1/keys", response_model=list[BackupKeyPublic])
async def list_keys(principal: CurrentPrincipal, session: SessionDep) -> list[BackupKeyPublic]:
    """Managed and customer-held backup keys of the organization: ids, fingerprints, holders; never
    key material."""
    return await service.list_keys(session, principal.org_id)


@router.post("/v1/backups/jobs/{job_id}/rotate-key", response_model=BackupJobPublic)
async def rotate_key(
    job_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    body: RotateKey | None = None,
) -> BackupJobPublic:
    """New backups of the job use a new key; backups made before keep their key id and stay
    restorable. Managed: a new generation. Customer: `customer_key_id` names the new key."""
    return job_public(await service.rotate_key(session, box, principal.org_id, job_id, body or RotateKey()))
