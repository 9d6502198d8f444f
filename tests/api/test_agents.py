from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from rahatback_api.agents.service import consume_enrollment_token
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.errors import AppError
from rahatback_api.models import Agent, EnrollmentToken
from rahatback_api.security.tokens import hash_token
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant


async def test_enrollment_token_is_one_time(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    r = await client.post("/v1/agents/enrollment-tokens", json={"ttl_minutes": 30}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert token.startswith("rbe_")

    async with session_scope(sessionmaker) as session:
        used = await consume_enrollment_token(session, token)
    assert used.org_id == tenant.org_id
    assert used.token_hash == hash_token(token)

    with pytest.raises(AppError) as again:
        async with session_scope(sessionmaker) as session:
            await consume_enrollment_token(session, token)
    assert again.value.status_code == 410

    with pytest.raises(AppError) as unknown:
        async with session_scope(sessionmaker) as session:
            await consume_enrollment_token(session, "rbe_nope")
    assert unknown.value.status_code == 401


async def test_expired_enrollment_token_is_410(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    r = await client.post("/v1/agents/enrollment-tokens", headers=tenant.headers)
    assert r.status_code == 201
    token = r.json()["token"]
    async with session_scope(sessionmaker) as session:
        row = await session.get(EnrollmentToken, r.json()["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
    with pytest.raises(AppError) as expired:
        async with session_scope(sessionmaker) as session:
            await consume_enrollment_token(session, token)
    assert expired.value.status_code == 410
    assert "expired" in expired.value.message


async def test_agent_list_shows_presence(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with session_scope(sessionmaker) as session:
        fresh = Agent(
            org_id=tenant.org_id,
            name="db-1",
            hostname="db-1.lan",
            version="0.1.0",
            x25519_public_key="AAAA",
            engines=["postgresql"],
            storages=["local"],
            last_seen_at=utcnow(),
        )
        stale = Agent(
            org_id=tenant.org_id,
            name="db-2",
            x25519_public_key="BBBB",
            last_seen_at=utcnow() - timedelta(hours=1),
        )
        revoked = Agent(
            org_id=tenant.org_id,
            name="db-3",
            x25519_public_key="CCCC",
            last_seen_at=utcnow(),
            revoked_at=utcnow(),
        )
        session.add_all([fresh, stale, revoked])
    agents = {a["name"]: a for a in (await client.get("/v1/agents", headers=tenant.headers)).json()}
    assert agents["db-1"]["online"] is True
    assert agents["db-1"]["engines"] == ["postgresql"]
    assert agents["db-1"]["hostname"] == "db-1.lan"
    assert agents["db-2"]["online"] is False
    assert (agents["db-3"]["online"], agents["db-3"]["revoked"]) == (False, True)
    one = (await client.get(f"/v1/agents/{fresh.id}", headers=tenant.headers)).json()
    assert one["id"] == fresh.id and len(fresh.id) == 32
    assert "x25519_public_key" not in one
