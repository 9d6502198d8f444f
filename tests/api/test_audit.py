"""The audit log: who did what, when and from where, for every mutating request, readable by admins."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import AuditEvent
from rahatback_contracts import subjects
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select
from structlog.testing import capture_logs

from tests.api.conftest import PASSWORD, Tenant, TenantFactory, create_database, create_job
from tests.api.test_operations import add_agent, apply, completed, public_key

DB_PASSWORD = "db-secret-never-in-the-audit-log"
USER_AGENT = "rahatback-tests/1.0"


async def events(client: httpx.AsyncClient, tenant: Tenant, **params: Any) -> list[dict[str, Any]]:
    r = await client.get("/v1/audit", params=params, headers=tenant.headers)
    assert r.status_code == 200, r.text
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def only(items: list[dict[str, Any]], action: str) -> dict[str, Any]:
    found = [e for e in items if e["action"] == action]
    assert len(found) == 1, (action, [e["action"] for e in items])
    return found[0]


@pytest.fixture
async def client(app: FastAPI) -> Any:
    # a fixed peer address and user agent, to see them come back as "from where"
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 51000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api.test", headers={"User-Agent": USER_AGENT}
    ) as c:
        yield c


async def test_each_audited_action_says_who_what_when_and_from_where(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    started = utcnow()
    me = (await client.get("/v1/me", headers=tenant.headers)).json()

    # logins: success and failure (lockout: test_login_throttle)
    assert (
        await client.post("/v1/auth/login", json={"email": tenant.email, "password": PASSWORD})
    ).status_code == 200
    assert (
        await client.post("/v1/auth/login", json={"email": tenant.email, "password": "wrong!"})
    ).status_code == 401
    # token changes
    token = (await client.post("/v1/tokens", json={"name": "ci"}, headers=tenant.headers)).json()
    assert (await client.delete(f"/v1/tokens/{token['id']}", headers=tenant.headers)).status_code == 204
    # a secret change
    database = await create_database(client, tenant, name="shop")
    r = await client.patch(
        f"/v1/databases/{database['id']}",
        json={"settings": {"password": DB_PASSWORD}},
        headers=tenant.headers,
    )
    assert r.status_code == 200, r.text
    # a run and a restore
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, database_id=database["id"])
    run = (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)).json()
    await apply(
        sessionmaker,
        subjects.agent_report(agent.id, "backup", "completed"),
        completed(agent.id, run["id"]),
        "c",
    )
    restore = (await client.post(f"/v1/backups/history/{run['id']}/restore", headers=tenant.headers)).json()
    # enrollment of an agent (no principal: the organization comes from the enrollment token)
    enrollment = (await client.post("/v1/agents/enrollment-tokens", json={}, headers=tenant.headers)).json()
    enrolled = await client.post(
        "/v1/agents/enroll",
        json={"token": enrollment["token"], "name": "host-1", "x25519_public_key": public_key()},
    )
    assert enrolled.status_code == 201, enrolled.text
    # a deletion, refused, then done
    storage = await create_database(client, tenant, name="scratch")
    viewer = await tenant.member("viewer")
    assert (await client.delete(f"/v1/databases/{storage['id']}", headers=viewer)).status_code == 403
    assert (await client.delete(f"/v1/databases/{storage['id']}", headers=tenant.headers)).status_code == 204

    items = await events(client, tenant, limit=200)
    assert [e["at"] for e in items] == sorted((e["at"] for e in items), reverse=True)  # newest first
    for event in items:
        assert event["client_ip"] == "198.51.100.7"
        assert event["user_agent"] == USER_AGENT
        assert event["at"] >= started.isoformat()[:19]

    login = only(items, "login")
    assert (login["actor_user_id"], login["actor_email"], login["status_code"]) == (
        me["user_id"],
        tenant.email,
        200,
    )
    assert login["details"]["email"] == tenant.email and login["token_id"]
    failed = only(items, "login_failed")
    assert (failed["status_code"], failed["details"]["email"], failed["actor_user_id"]) == (
        401,
        tenant.email,
        None,
    )
    assert sorted(failed["details"]["fields"]) == ["email", "password"]

    created = only(items, "create_token")
    assert (created["target_type"], created["target_id"], created["status_code"]) == (
        "token",
        token["id"],
        201,
    )
    assert (created["actor_user_id"], created["method"], created["path"]) == (
        me["user_id"],
        "POST",
        "/v1/tokens",
    )
    revoked = only(items, "revoke_token")
    assert (revoked["target_id"], revoked["path"], revoked["status_code"]) == (
        token["id"],
        "/v1/tokens/{token_id}",
        204,
    )

    secret = only(items, "update_database")
    assert (secret["target_type"], secret["target_id"]) == ("database", database["id"])
    assert secret["details"]["fields"] == ["settings", "settings.password"]

    ran = only(items, "run_job_now")
    assert (ran["target_type"], ran["target_id"], ran["details"]["result_id"], ran["status_code"]) == (
        "job",
        job["id"],
        run["id"],
        202,
    )
    restored = only(items, "restore_run")
    assert (restored["target_id"], restored["details"]["result_id"]) == (run["id"], restore["id"])

    enroll = only(items, "enroll")
    assert (enroll["actor_user_id"], enroll["target_type"], enroll["target_id"]) == (
        None,
        "agent",
        enrolled.json()["agent_id"],
    )
    assert "token" in enroll["details"]["fields"] and enrollment["token"] not in str(enroll)

    deletes = [e for e in items if e["action"] == "delete_database"]
    assert [(e["status_code"], e["target_id"]) for e in deletes] == [
        (204, storage["id"]),
        (403, storage["id"]),
    ]
    assert deletes[1]["actor_user_id"] != me["user_id"]  # the viewer, named

    # filters
    assert {e["action"] for e in await events(client, tenant, action="delete_database")} == {
        "delete_database"
    }
    assert await events(client, tenant, since=(utcnow() + timedelta(minutes=1)).isoformat()) == []
    by_owner = await events(client, tenant, actor=me["user_id"], limit=200)
    assert by_owner and {e["actor_user_id"] for e in by_owner} == {me["user_id"]}
    page = (await client.get("/v1/audit?limit=2&offset=1", headers=tenant.headers)).json()
    assert (len(page["items"]), page["total"], page["items"][0]["id"]) == (2, len(items), items[1]["id"])

    # no secret value anywhere in the table, whatever the column
    async with session_scope(sessionmaker) as session:
        rows = (await session.execute(select(AuditEvent))).scalars().all()
    dump = " ".join(row.model_dump_json() for row in rows)
    for secret_value in (DB_PASSWORD, PASSWORD, "wrong!", enrollment["token"], token["token"]):
        assert secret_value not in dump


async def test_only_owners_and_admins_read_their_own_organizations_log(
    client: httpx.AsyncClient, make_tenant: TenantFactory
) -> None:
    x, y = await make_tenant(), await make_tenant()
    await create_database(client, y, name="y-only")
    assert (
        await client.post("/v1/auth/login", json={"email": y.email, "password": "nope"})
    ).status_code == 401

    for role in ("viewer", "operator"):
        r = await client.get("/v1/audit", headers=await x.member(role))
        assert (r.status_code, r.json()["detail"]) == (
            403,
            f"this needs the admin role or higher; you are {role}",
        )
    admin = await x.member("admin")
    r = await client.get("/v1/audit", headers=admin)
    assert (r.status_code, r.json()["items"]) == (200, [])  # Y's events are not X's
    assert {e["action"] for e in await events(client, y)} == {"create_database", "login_failed"}


async def test_a_failure_to_write_the_event_does_not_fail_the_request(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with session_scope(sessionmaker) as session:
        await session.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    try:
        with capture_logs() as logs:
            database = await create_database(client, tenant, name="still-works")
    finally:
        async with session_scope(sessionmaker) as session:
            await session.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    assert (await client.get(f"/v1/databases/{database['id']}", headers=tenant.headers)).status_code == 200
    lost = [entry for entry in logs if entry["event"] == "audit event not recorded"]
    assert [(e["method"], e["path"], e["log_level"]) for e in lost] == [("POST", "/v1/databases", "warning")]


async def test_unauthenticated_requests_are_not_recorded(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    assert (await client.post("/v1/databases", json={"name": "x"})).status_code == 401
    assert (
        await client.delete("/v1/databases/abc", headers={"Authorization": "Bearer rbt_nope"})
    ).status_code == 401
    # the public routes, with whatever an anonymous caller may send: nothing lands in the table
    anonymous = [
        ("/v1/auth/login", {"email": "x@example.com"}, 422),
        ("/v1/auth/login", {"password": ["not", "a", "string"]}, 422),
        ("/v1/agents/nats-credentials", {"agent_id": "a"}, 422),
        ("/v1/agents/nats-credentials", {"agent_id": "0" * 32, "issued_at": 0, "signature": "AA=="}, 409),
        ("/v1/agents/enroll", {"name": "no-token"}, 422),
    ]
    for path, body, expected in anonymous:
        for _ in range(3):
            assert (await client.post(path, json=body)).status_code == expected, (path, body)
    assert (
        await client.post(
            "/v1/agents/enroll", json={"token": "rbe_forged", "name": "h", "x25519_public_key": public_key()}
        )
    ).status_code in (401, 403)
    assert await events(client, tenant) == []
    async with session_scope(sessionmaker) as session:
        recorded = (await session.execute(select(AuditEvent))).scalars().all()
    assert [(e.action, e.status_code, e.org_id) for e in recorded] == []

    # a login still notes itself, even for an email with no account (unreadable but kept)
    assert (
        await client.post("/v1/auth/login", json={"email": "nobody@example.com", "password": "nope"})
    ).status_code == 401
    async with session_scope(sessionmaker) as session:
        recorded = (await session.execute(select(AuditEvent))).scalars().all()
    assert [(e.action, e.status_code, e.org_id) for e in recorded] == [("login_failed", 401, None)]
