from __future__ import annotations

from datetime import timedelta

import httpx
from rahatback_api.auth.service import bootstrap_admin
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.errors import AppError
from rahatback_api.models import ApiToken
from rahatback_api.security.tokens import hash_token
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from tests.api.conftest import PASSWORD, Tenant, pg_settings

NEW_DB = {"name": "orders", "engine": "postgresql", "settings": pg_settings()}


async def test_login_then_me(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post("/v1/auth/login", json={"email": tenant.email.upper(), "password": PASSWORD})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token"].startswith("rbt_")
    assert body["expires_at"]

    me = await client.get("/v1/me", headers={"Authorization": f"Bearer {body['token']}"})
    assert me.status_code == 200
    assert me.json()["email"] == tenant.email
    assert me.json()["role"] == "owner"
    assert me.json()["org"]["id"] == tenant.org_id
    assert me.json()["scopes"] == ["*"]


async def test_bad_credentials_get_one_generic_401(client: httpx.AsyncClient, tenant: Tenant) -> None:
    wrong_password = await client.post("/v1/auth/login", json={"email": tenant.email, "password": "nope"})
    unknown_user = await client.post(
        "/v1/auth/login", json={"email": "ghost@example.com", "password": "nope"}
    )
    assert wrong_password.status_code == unknown_user.status_code == 401
    assert wrong_password.json() == unknown_user.json() == {"detail": "invalid email or password"}


async def test_requests_without_a_valid_token_are_401(client: httpx.AsyncClient, tenant: Tenant) -> None:
    assert (await client.get("/v1/databases")).status_code == 401
    r = await client.get("/v1/databases", headers={"Authorization": "Bearer rbt_not-a-real-token"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert (await client.get("/v1/databases", headers={"Authorization": "Basic abc"})).status_code == 401


async def test_personal_token_is_shown_once_and_scoped(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post(
        "/v1/tokens",
        json={"name": "ci read", "scopes": ["read"], "expires_in_days": 7},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    created = r.json()
    token = created["token"]
    assert created["prefix"] == token[:8]
    assert created["scopes"] == ["read"]

    listed = await client.get("/v1/tokens", headers=tenant.headers)
    mine = [t for t in listed.json() if t["id"] == created["id"]]
    assert len(mine) == 1
    assert token not in listed.text
    assert "token" not in mine[0]

    read_headers = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/v1/databases", headers=read_headers)).status_code == 200
    denied = await client.post("/v1/databases", json=NEW_DB, headers=read_headers)
    assert denied.status_code == 403
    assert "write" in denied.json()["detail"]


async def test_a_token_cannot_grant_more_than_it_has(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post("/v1/tokens", json={"name": "w", "scopes": ["write"]}, headers=tenant.headers)
    write_headers = {"Authorization": f"Bearer {r.json()['token']}"}
    escalate = await client.post("/v1/tokens", json={"name": "x", "scopes": ["*"]}, headers=write_headers)
    assert escalate.status_code == 403
    assert escalate.json()["field"] == "scopes"
    ok = await client.post("/v1/tokens", json={"name": "r", "scopes": ["read"]}, headers=write_headers)
    assert ok.status_code == 201


async def test_revoked_token_is_401(client: httpx.AsyncClient, tenant: Tenant) -> None:
    created = (
        await client.post("/v1/tokens", json={"name": "tmp", "scopes": ["*"]}, headers=tenant.headers)
    ).json()
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert (await client.get("/v1/me", headers=headers)).status_code == 200

    assert (await client.delete(f"/v1/tokens/{created['id']}", headers=tenant.headers)).status_code == 204
    assert (await client.get("/v1/me", headers=headers)).status_code == 401
    listed = (await client.get("/v1/tokens", headers=tenant.headers)).json()
    assert [t["revoked_at"] is not None for t in listed if t["id"] == created["id"]] == [True]


async def test_expired_token_is_401(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    created = (
        await client.post("/v1/tokens", json={"name": "old", "scopes": ["*"]}, headers=tenant.headers)
    ).json()
    async with session_scope(sessionmaker) as session:
        row = (await session.execute(select(ApiToken).where(ApiToken.id == created["id"]))).scalar_one()
        row.expires_at = utcnow() - timedelta(seconds=1)
    r = await client.get("/v1/me", headers={"Authorization": f"Bearer {created['token']}"})
    assert r.status_code == 401


async def test_tokens_are_stored_hashed(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    created = (await client.post("/v1/tokens", json={"name": "h"}, headers=tenant.headers)).json()
    async with session_scope(sessionmaker) as session:
        row = (await session.execute(select(ApiToken).where(ApiToken.id == created["id"]))).scalar_one()
    assert row.token_hash == hash_token(created["token"])
    assert created["token"] not in row.model_dump_json()


async def test_cannot_revoke_someone_elses_token(client: httpx.AsyncClient, tenant: Tenant) -> None:
    created = (await client.post("/v1/tokens", json={"name": "mine"}, headers=tenant.headers)).json()
    other = await tenant.member("admin")
    assert (await client.delete(f"/v1/tokens/{created['id']}", headers=other)).status_code == 404


async def test_roles_viewer_reads_admin_configures_and_deletes(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    viewer = await tenant.member("viewer")
    operator = await tenant.member("operator")
    admin = await tenant.member("admin")

    assert (await client.get("/v1/databases", headers=viewer)).status_code == 200
    denied = await client.post("/v1/databases", json=NEW_DB, headers=viewer)
    assert denied.status_code == 403
    assert denied.json() == {"detail": "this needs the admin role or higher; you are viewer"}
    # database credentials are secrets: operators run and restore, admins configure
    denied = await client.post("/v1/databases", json=NEW_DB, headers=operator)
    assert denied.json() == {"detail": "this needs the admin role or higher; you are operator"}

    created = await client.post("/v1/databases", json=NEW_DB, headers=admin)
    assert created.status_code == 201
    db_id = created.json()["id"]
    assert (
        await client.patch(f"/v1/databases/{db_id}", json={"name": "o2"}, headers=viewer)
    ).status_code == 403
    assert (await client.delete(f"/v1/databases/{db_id}", headers=operator)).status_code == 403
    assert (await client.delete(f"/v1/databases/{db_id}", headers=admin)).status_code == 204
    assert (await client.get(f"/v1/databases/{db_id}", headers=viewer)).status_code == 404


async def test_enrollment_tokens_need_admin(client: httpx.AsyncClient, tenant: Tenant) -> None:
    operator = await tenant.member("operator")
    assert (await client.post("/v1/agents/enrollment-tokens", json={}, headers=operator)).status_code == 403


async def test_bootstrap_admin_refuses_duplicate_email(
    tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    try:
        async with session_scope(sessionmaker) as session:
            await bootstrap_admin(session, tenant.email, PASSWORD, "Another")
    except AppError as exc:
        assert exc.status_code == 409
        assert exc.field == "email"
    else:
        raise AssertionError("a second user with the same email was created")
