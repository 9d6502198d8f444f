"""Users, organizations, logins and API tokens."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.auth.deps import Principal
from rahatback_api.auth.models import ApiToken, Membership, Organization, Role, User
from rahatback_api.columns import utcnow
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.security.passwords import hash_password, needs_rehash, verify_password
from rahatback_api.security.tokens import API_TOKEN_PREFIX, DISPLAY_PREFIX_CHARS, hash_token, new_token

MIN_PASSWORD_LENGTH = 12


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if "@" not in email or email.startswith("@") or email.endswith("@"):
        raise AppError("email must look like name@example.com", 422, field="email")
    return email


async def create_organization(session: AsyncSession, name: str) -> Organization:
    org = Organization(name=name)
    session.add(org)
    await session.flush()
    return org


async def create_user(session: AsyncSession, email: str, password: str) -> User:
    email = normalize_email(email)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AppError(f"password must be at least {MIN_PASSWORD_LENGTH} characters", 422, field="password")
    existing = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
    if existing is not None:
        raise Conflict("a user with this email already exists", field="email")
    user = User(email=email, password_hash=hash_password(password))
    session.add(user)
    await session.flush()
    return user


async def add_member(session: AsyncSession, org: Organization, user: User, role: Role) -> Membership:
    membership = Membership(org_id=org.id, user_id=user.id, role=role)
    session.add(membership)
    await session.flush()
    return membership


async def issue_token(
    session: AsyncSession,
    *,
    org_id: str,
    user_id: str,
    name: str,
    scopes: list[str],
    ttl: timedelta | None,
    kind: str = "personal",
) -> tuple[ApiToken, str]:
    """Create a token row; returns it with the plaintext token, which is not stored anywhere."""
    plaintext = new_token(API_TOKEN_PREFIX)
    token = ApiToken(
        org_id=org_id,
        user_id=user_id,
        name=name,
        token_hash=hash_token(plaintext),
        prefix=plaintext[:DISPLAY_PREFIX_CHARS],
        scopes=list(scopes),
        kind=kind,
        expires_at=utcnow() + ttl if ttl is not None else None,
    )
    session.add(token)
    await session.flush()
    return token, plaintext


async def login(
    session: AsyncSession, email: str, password: str, org_id: str | None, ttl: timedelta
) -> tuple[ApiToken, str]:
    bad = AppError("invalid email or password", 401)
    try:
        email = normalize_email(email)
    except AppError:
        raise bad from None
    user = (await session.execute(select(User).where(User.email == email))).scalar_one_or_none()
    # verify even for unknown users, so timing does not reveal which emails exist
    if not verify_password(user.password_hash if user else None, password) or user is None:
        raise bad
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    query = select(Membership).where(Membership.user_id == user.id)
    if org_id is not None:
        query = query.where(Membership.org_id == org_id)
    membership = (
        (await session.execute(query.order_by(col(Membership.created_at)).limit(1))).scalars().first()
    )
    if membership is None:
        raise AppError(
            "you are not a member of this organization" if org_id else "you belong to no organization", 403
        )
    return await issue_token(
        session,
        org_id=membership.org_id,
        user_id=user.id,
        name="login",
        scopes=["*"],
        ttl=ttl,
        kind="session",
    )


async def organization_of(session: AsyncSession, email: str, org_id: str | None) -> str | None:
    """The organization a login attempt for `email` concerns (for the audit log), if any."""
    query = (
        select(Membership.org_id)
        .join(User, User.id == Membership.user_id)  # type: ignore[arg-type]
        .where(User.email == email.strip().lower())
    )
    if org_id is not None:
        query = query.where(Membership.org_id == org_id)
    return (await session.execute(query.order_by(col(Membership.created_at)).limit(1))).scalar_one_or_none()


async def create_personal_token(
    session: AsyncSession, principal: Principal, name: str, scopes: list[str], expires_in_days: int
) -> tuple[ApiToken, str]:
    # A token can never grant more than the token that created it.
    for scope in scopes:
        if not principal.has_scope(scope if scope != "*" else "*"):
            raise AppError(f"cannot grant scope {scope!r}: your token does not have it", 403, field="scopes")
    return await issue_token(
        session,
        org_id=principal.org_id,
        user_id=principal.user.id,
        name=name,
        scopes=sorted(set(scopes)),
        ttl=timedelta(days=expires_in_days),
    )


async def list_personal_tokens(session: AsyncSession, principal: Principal) -> list[ApiToken]:
    result = await session.execute(
        select(ApiToken)
        .where(
            ApiToken.org_id == principal.org_id,
            ApiToken.user_id == principal.user.id,
            ApiToken.kind == "personal",
        )
        .order_by(col(ApiToken.created_at).desc())
    )
    return list(result.scalars())


async def revoke_token(session: AsyncSession, principal: Principal, token_id: str) -> ApiToken:
    token = (
        await session.execute(
            select(ApiToken).where(
                ApiToken.id == token_id,
                ApiToken.org_id == principal.org_id,
                ApiToken.user_id == principal.user.id,
            )
        )
    ).scalar_one_or_none()
    if token is None:
        raise NotFound("token")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


async def get_organization(session: AsyncSession, org_id: str) -> Organization:
    org = await session.get(Organization, org_id)
    if org is None:
        raise NotFound("organization")
    return org


async def bootstrap_admin(
    session: AsyncSession, email: str, password: str, org_name: str
) -> tuple[User, Organization, str]:
    """First user of a new organization, as owner, with a full-scope token valid for 30 days.

    Used by `rahatback-api create-admin` and by the dev stack on first start (it prints the token).
    """
    user = await create_user(session, email, password)
    org = await create_organization(session, org_name)
    await add_member(session, org, user, "owner")
    _, token = await issue_token(
        session, org_id=org.id, user_id=user.id, name="bootstrap", scopes=["*"], ttl=timedelta(days=30)
    )
    return user, org, token
