from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, status

from rahatback_api.auth import service
from rahatback_api.auth.deps import CurrentPrincipal
from rahatback_api.auth.models import (
    ApiToken,
    ApiTokenCreate,
    ApiTokenCreated,
    ApiTokenPublic,
    LoginRequest,
    LoginResponse,
    MePublic,
    OrganizationPublic,
)
from rahatback_api.db import SessionDep
from rahatback_api.deps import SettingsDep

router = APIRouter(prefix="/v1", tags=["auth"])


def _public(token: ApiToken) -> ApiTokenPublic:
    return ApiTokenPublic.model_validate(token, from_attributes=True)


@router.post("/auth/login", response_model=LoginResponse)
async def login(body: LoginRequest, session: SessionDep, settings: SettingsDep) -> LoginResponse:
    token, plaintext = await service.login(
        session, body.email, body.password, body.org_id, timedelta(hours=settings.login_token_hours)
    )
    assert token.expires_at is not None
    return LoginResponse(token=plaintext, expires_at=token.expires_at)


@router.get("/me", response_model=MePublic)
async def me(principal: CurrentPrincipal, session: SessionDep) -> MePublic:
    org = await service.get_organization(session, principal.org_id)
    return MePublic(
        user_id=principal.user.id,
        email=principal.user.email,
        org=OrganizationPublic(id=org.id, name=org.name),
        role=principal.role,
        scopes=list(principal.scopes),
    )


@router.post("/tokens", response_model=ApiTokenCreated, status_code=status.HTTP_201_CREATED)
async def create_token(
    body: ApiTokenCreate, principal: CurrentPrincipal, session: SessionDep
) -> ApiTokenCreated:
    token, plaintext = await service.create_personal_token(
        session, principal, body.name, list(body.scopes), body.expires_in_days
    )
    return ApiTokenCreated(**_public(token).model_dump(), token=plaintext)


@router.get("/tokens", response_model=list[ApiTokenPublic])
async def list_tokens(principal: CurrentPrincipal, session: SessionDep) -> list[ApiTokenPublic]:
    return [_public(t) for t in await service.list_personal_tokens(session, principal)]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_token(token_id: str, principal: CurrentPrincipal, session: SessionDep) -> None:
    await service.revoke_token(session, principal, token_id)
