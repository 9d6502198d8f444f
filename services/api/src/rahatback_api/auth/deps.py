"""Who is calling: bearer token → `Principal`; role and scope checks as dependencies."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import select

from rahatback_api.auth.models import ROLE_RANK, ApiToken, Membership, Role, User
from rahatback_api.columns import utcnow
from rahatback_api.db import SessionDep
from rahatback_api.errors import AppError
from rahatback_api.security.tokens import hash_token

_bearer = HTTPBearer(auto_error=False, description="A login token or a personal access token")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Each scope includes the ones after it.
_SCOPE_RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2, "*": 3}
_LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write a row on every request


@dataclass(frozen=True)
class Principal:
    user: User
    org_id: str
    role: Role
    scopes: tuple[str, ...]
    token_id: str

    def has_scope(self, needed: str) -> bool:
        return any(_SCOPE_RANK.get(s, -1) >= _SCOPE_RANK[needed] for s in self.scopes)

    def has_role(self, needed: Role) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[needed]


def _unauthorized() -> AppError:
    # One message for every failure: don't tell a caller whether a token exists, expired or was revoked.
    return AppError("missing, invalid, expired or revoked token", 401)


async def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized()
    row = (
        await session.execute(
            select(ApiToken, User, Membership)
            .join(User, User.id == ApiToken.user_id)  # type: ignore[arg-type]
            .join(
                Membership,
                (Membership.user_id == ApiToken.user_id) & (Membership.org_id == ApiToken.org_id),  # type: ignore[arg-type]
            )
            .where(ApiToken.token_hash == hash_token(credentials.credentials))
        )
    ).one_or_none()
    if row is None:
        raise _unauthorized()
    token, user, membership = row
    # the row was found through the hash's unique index; confirm in constant time, so that accepting a
    # token never depends on how the database happened to compare strings
    if not hmac.compare_digest(token.token_hash, hash_token(credentials.credentials)):
        raise _unauthorized()
    now = utcnow()
    if token.revoked_at is not None or (token.expires_at is not None and token.expires_at <= now):
        raise _unauthorized()
    if token.last_used_at is None or now - token.last_used_at > _LAST_USED_RESOLUTION:
        token.last_used_at = now
    principal = Principal(
        user=user,
        org_id=token.org_id,
        role=membership.role,  # type: ignore[arg-type]
        scopes=tuple(token.scopes),
        token_id=token.id,
    )
    # plain strings for the audit middleware, which runs after this request's session has closed
    request.state.audit_actor = {"org_id": token.org_id, "user_id": user.id, "token_id": token.id}
    needed = "read" if request.method in _SAFE_METHODS else "write"
    if not principal.has_scope(needed):
        raise AppError(f"this token lacks the {needed!r} scope", 403)
    return principal


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_role(role: Role) -> Callable[[Principal], Coroutine[Any, Any, Principal]]:
    """A dependency: the caller's role in this organization must be at least `role`."""

    async def check(principal: CurrentPrincipal) -> Principal:
        if not principal.has_role(role):
            raise AppError(f"this needs the {role} role or higher; you are {principal.role}", 403)
        return principal

    return check


OperatorPrincipal = Annotated[Principal, Depends(require_role("operator"))]
AdminPrincipal = Annotated[Principal, Depends(require_role("admin"))]
OwnerPrincipal = Annotated[Principal, Depends(require_role("owner"))]
