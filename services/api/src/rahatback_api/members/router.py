from __future__ import annotations

from fastapi import APIRouter, status

from rahatback_api.auth.deps import AdminPrincipal
from rahatback_api.auth.models import Membership, User
from rahatback_api.db import SessionDep
from rahatback_api.members import service
from rahatback_api.members.models import MemberCreate, MemberPublic, MemberUpdate

router = APIRouter(prefix="/v1/members", tags=["members"])


def _public(membership: Membership, user: User) -> MemberPublic:
    return MemberPublic(
        user_id=user.id,
        email=user.email,
        role=membership.role,
        created_at=membership.created_at,
    )


@router.get("", response_model=list[MemberPublic])
async def list_members(principal: AdminPrincipal, session: SessionDep) -> list[MemberPublic]:
    return [_public(m, u) for m, u in await service.list_members(session, principal.org_id)]


@router.post("", response_model=MemberPublic, status_code=status.HTTP_201_CREATED)
async def add_member(body: MemberCreate, principal: AdminPrincipal, session: SessionDep) -> MemberPublic:
    """Add a person by email with this role, creating their account (with `password`) if there is none.

    The answer does not say which: an existing account is added as it is, keeping its own password."""
    return _public(*await service.add_member(session, principal, body))


@router.patch("/{user_id}", response_model=MemberPublic)
async def change_member_role(
    user_id: str, body: MemberUpdate, principal: AdminPrincipal, session: SessionDep
) -> MemberPublic:
    """409 if this would leave the organization without an owner."""
    return _public(*await service.change_role(session, principal, user_id, body.role))


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def remove_member(user_id: str, principal: AdminPrincipal, session: SessionDep) -> None:
    """409 for the last owner. The user's tokens for this organization stop working."""
    await service.remove_member(session, principal, user_id)
