from __future__ import annotations

from fastapi import APIRouter, status

from rahatback_api.agents import service
from rahatback_api.agents.models import AgentPublic, EnrollmentTokenCreate, EnrollmentTokenCreated
from rahatback_api.auth.deps import AdminPrincipal, CurrentPrincipal
from rahatback_api.db import SessionDep
from rahatback_api.deps import SettingsDep

router = APIRouter(prefix="/v1/agents", tags=["agents"])


@router.post("/enrollment-tokens", response_model=EnrollmentTokenCreated, status_code=status.HTTP_201_CREATED)
async def create_enrollment_token(
    principal: AdminPrincipal, session: SessionDep, body: EnrollmentTokenCreate | None = None
) -> EnrollmentTokenCreated:
    body = body or EnrollmentTokenCreate()
    token, plaintext = await service.create_enrollment_token(session, principal, body.ttl_minutes)
    return EnrollmentTokenCreated(id=token.id, token=plaintext, expires_at=token.expires_at)


@router.get("", response_model=list[AgentPublic])
async def list_agents(
    principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> list[AgentPublic]:
    agents = await service.list_agents(session, principal.org_id)
    return [service.agent_public(a, settings.agent_offline_seconds) for a in agents]


@router.get("/{agent_id}", response_model=AgentPublic)
async def get_agent(
    agent_id: str, principal: CurrentPrincipal, session: SessionDep, settings: SettingsDep
) -> AgentPublic:
    agent = await service.get_agent(session, principal.org_id, agent_id)
    return service.agent_public(agent, settings.agent_offline_seconds)
