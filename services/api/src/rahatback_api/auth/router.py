from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, HTTPException, Request, status

from rahatback_api.audit.client import client_address
from rahatback_api.audit.middleware import note_audit
from rahatback_api.auth import service, throttle
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
from rahatback_api.db import SessionDep, session_scope
from rahatback_api.deps import SettingsDep
from rahatback_api.errors import AppError

router = APIRouter(prefix="/v1", tags=["auth"])


def _public(token: ApiToken) -> ApiTokenPublic:
    return ApiTokenPublic.model_validate(token, from_attributes=True)


@router.post(
    "/auth/login",
    response_model=LoginResponse,
    responses={
        401: {"description": "wrong email or password"},
        429: {"description": "too many failed logins: the `Retry-After` header says when to try again"},
    },
)
async def login(
    body: LoginRequest, request: Request, session: SessionDep, settings: SettingsDep
) -> LoginResponse:
    email = body.email.strip().lower()
    ip = client_address(request.scope, request.app.state.trusted_proxies)
    note_audit(request, details={"email": email})  # the email tried, never the password
    policy = throttle.ThrottlePolicy.from_settings(settings)
    try:
        # counted in a transaction of its own, committed before the password is checked: parallel
        # attempts queue on the count instead of all reading "not locked" at once
        async with session_scope(request.app.state.sessionmaker) as own:
            reservation = await throttle.reserve_attempt(own, email, ip, policy)
    except throttle.LockedOut as locked:
        # refused before the password is even checked: a locked-out guesser learns nothing
        note_audit(
            request, action="login_locked", org_id=await service.organization_of(session, email, body.org_id)
        )
        seconds = throttle.retry_after_seconds(locked.until)
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"too many failed logins: try again after {locked.until:%Y-%m-%d %H:%M:%S} UTC "
            f"(in {max(1, round(seconds / 60))} min)",
            headers={"Retry-After": str(seconds)},
        ) from None
    try:
        token, plaintext = await service.login(
            session, body.email, body.password, body.org_id, timedelta(hours=settings.login_token_hours)
        )
    except AppError as exc:
        note_audit(
            request, action="login_failed", org_id=await service.organization_of(session, email, body.org_id)
        )
        if exc.status_code != status.HTTP_401_UNAUTHORIZED:
            # the password was right (e.g. 403, no membership): not a guess, take the count back
            async with session_scope(request.app.state.sessionmaker) as own:
                await throttle.password_accepted(own, reservation)
        raise
    await throttle.password_accepted(session, reservation)
    note_audit(request, action="login", org_id=token.org_id, actor_user_id=token.user_id, token_id=token.id)
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
