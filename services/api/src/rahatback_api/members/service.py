"""Adding people to an organization, changing their role, removing them.

Nobody grants a role above their own (so only owners make owners) or changes someone whose role is
above theirs, and an organization always keeps at least one owner.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.auth import service as auth_service
from rahatback_api.auth.deps import Principal
from rahatback_api.auth.models import ROLE_RANK, ApiToken, Membership, Role, User
from rahatback_api.columns import utcnow
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.members.models import MemberCreate
from rahatback_api.security.passwords import hash_password


async def list_members(session: AsyncSession, org_id: str) -> list[tuple[Membership, User]]:
    rows = await session.execute(
        select(Membership, User)
        .join(User, User.id == Membership.user_id)  # type: ignore[arg-type]
        .where(Membership.org_id == org_id)
        .order_by(col(Membership.created_at), col(User.email))
    )
    return [(membership, user) for membership, user in rows]


async def get_member(session: AsyncSession, org_id: str, user_id: str) -> tuple[Membership, User]:
    row = (
        await session.execute(
            select(Membership, User)
            .join(User, User.id == Membership.user_id)  # type: ignore[arg-type]
            .where(Membership.org_id == org_id, Membership.user_id == user_id)
            .with_for_update(of=Membership)
        )
    ).one_or_none()
    if row is None:
        raise NotFound("member")
    return row[0], row[1]


def _check_can_grant(principal: Principal, role: Role) -> None:
    if not principal.has_role(role):
        raise AppError(
            f"you cannot grant the {role} role: it is above your own ({principal.role})", 403, field="role"
        )


def _check_can_manage(principal: Principal, membership: Membership) -> None:
    if ROLE_RANK[membership.role] > ROLE_RANK[principal.role]:
        raise AppError(
            f"you cannot change a member whose role ({membership.role}) is above yours ({principal.role})",
            403,
        )


async def _keep_an_owner(session: AsyncSession, org_id: str, leaving_user_id: str) -> None:
    # the owners' rows are locked, so two owners demoting each other at once cannot both succeed
    owners = await session.execute(
        select(Membership.user_id)
        .where(Membership.org_id == org_id, Membership.role == "owner")
        .with_for_update()
    )
    if not [user_id for user_id in owners.scalars() if user_id != leaving_user_id]:
        raise Conflict("this is the organization's last owner: make another member owner first", field="role")


async def add_member(
    session: AsyncSession, principal: Principal, body: MemberCreate
) -> tuple[Membership, User]:
    """Adds the person with this email, creating their account if there is none.

    The answer is the same whether the account existed or not (the password is always required and
    checked, and hashed either way so the timing matches): an admin must not learn who has an account
    on this server. An existing account keeps its own password; `body.password` is then discarded.
    """
    _check_can_grant(principal, body.role)
    email = auth_service.normalize_email(body.email)
    if body.password is None or len(body.password) < auth_service.MIN_PASSWORD_LENGTH:
        raise AppError(
            f"give an initial password of at least {auth_service.MIN_PASSWORD_LENGTH} characters: it is "
            "used only if this email has no account yet",
            422,
            field="password",
        )
    user = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
    if user is None:
        user = await auth_service.create_user(session, email, body.password)
    else:
        hash_password(body.password)  # the work create_user would have done, so the timing matches
        existing = await session.execute(
            select(Membership.id).where(Membership.org_id == principal.org_id, Membership.user_id == user.id)
        )
        if existing.first() is not None:
            raise Conflict(
                "this user is already a member: change their role with PATCH /v1/members/{user_id}",
                field="email",
            )
    membership = Membership(org_id=principal.org_id, user_id=user.id, role=body.role)
    session.add(membership)
    await session.flush()
    return membership, user


async def change_role(
    session: AsyncSession, principal: Principal, user_id: str, role: Role
) -> tuple[Membership, User]:
    membership, user = await get_member(session, principal.org_id, user_id)
    _check_can_manage(principal, membership)
    _check_can_grant(principal, role)
    if membership.role == "owner" and role != "owner":
        await _keep_an_owner(session, principal.org_id, user_id)
    membership.role = role
    await session.flush()
    return membership, user


async def remove_member(session: AsyncSession, principal: Principal, user_id: str) -> None:
    """The user keeps their account (and other organizations); their tokens for this one are revoked."""
    membership, _ = await get_member(session, principal.org_id, user_id)
    _check_can_manage(principal, membership)
    if membership.role == "owner":
        await _keep_an_owner(session, principal.org_id, user_id)
    await session.delete(membership)
    await session.execute(
        update(ApiToken)
        .where(
            col(ApiToken.org_id) == principal.org_id,
            col(ApiToken.user_id) == user_id,
            col(ApiToken.revoked_at).is_(None),
        )
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    await session.flush()
