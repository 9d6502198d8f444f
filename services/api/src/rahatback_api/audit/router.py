from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from rahatback_api.audit import service
from rahatback_api.audit.models import AuditPage
from rahatback_api.auth.deps import AdminPrincipal
from rahatback_api.db import SessionDep

router = APIRouter(prefix="/v1", tags=["audit"])


@router.get("/audit", response_model=AuditPage)
async def list_audit_events(
    principal: AdminPrincipal,
    session: SessionDep,
    action: Annotated[str | None, Query(max_length=64, description="e.g. login_failed, restore_run")] = None,
    actor: Annotated[str | None, Query(max_length=32, description="the acting user's id")] = None,
    since: Annotated[datetime | None, Query(description="at or after (ISO 8601; UTC if no offset)")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,
) -> AuditPage:
    """Who did what, when and from where in this organization, newest first (owners and admins)."""
    filters = service.AuditFilter(action=action, actor_user_id=actor, since=since)
    items, total = await service.list_events(session, principal.org_id, filters, limit, offset)
    return AuditPage(items=items, total=total, limit=limit, offset=offset)
