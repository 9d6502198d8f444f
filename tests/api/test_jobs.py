from __future__ import annotations

import httpx
from rahatback_api.backups.service import load_backup_key
from rahatback_api.db import session_scope
from rahatback_api.models import Agent, BackupKey, BackupRun
from rahatback_api.security.secretbox import SecretBox
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant, create_database, create_job, create_storage


async def test_job_crud_with_defaults(client: httpx.AsyncClient, tenant: Tenant) -> None:
    job = await create_job(client, tenant, cron="0 3 * * *", timezone="Europe/Istanbul")
    assert job["compression"] == "zstd"
    assert job["compression_level"] == 3
    assert job["encryption_enabled"] is True
    assert job["enabled"] is True
    assert job["cron"] == "0 3 * * *"
    assert job["timezone"] == "Europe/Istanbul"
    assert job["key_id"] == f"{job['id']}:1"
    assert job["last_run_at"] is None and job["last_run_status"] is None
    assert "job_key" not in str(job)

    job_id = job["id"]
    r = await client.patch(f"/v1/backups/jobs/{job_id}", json={"compression": "gzip"}, headers=tenant.headers)
    assert r.status_code == 200
    assert (r.json()["compression"], r.json()["compression_level"]) == ("gzip", 6)
    r = await client.patch(
        f"/v1/backups/jobs/{job_id}",
        json={"cron": None, "enabled": False, "compression_level": 9},
        headers=tenant.headers,
    )
    assert (r.json()["cron"], r.json()["enabled"], r.json()["compression_level"]) == (None, False, 9)

    assert [j["id"] for j in (await client.get("/v1/backups/jobs", headers=tenant.headers)).json()] == [
        job_id
    ]
    got = await client.get(f"/v1/backups/jobs/{job_id}", headers=tenant.headers)
    assert got.json()["compression_level"] == 9


async def test_duplicate_job_name_is_409(client: httpx.AsyncClient, tenant: Tenant) -> None:
    job = await create_job(client, tenant, name="nightly")
    body = {"name": "nightly", "database_id": job["database_id"], "storage_id": job["storage_id"]}
    r = await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)
    assert r.status_code == 409
    assert r.json()["field"] == "name"


async def test_job_key_is_random_and_encrypted(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    a = await create_job(client, tenant, name="a")
    b = await create_job(client, tenant, name="b")
    async with session_scope(sessionmaker) as session:
        key_a = await load_backup_key(session, box, tenant.org_id, a["key_id"])
        key_b = await load_backup_key(session, box, tenant.org_id, b["key_id"])
        stored = await session.get(BackupKey, a["key_id"])
    assert len(key_a) == len(key_b) == 32
    assert key_a != key_b
    assert stored is not None and key_a.hex() not in stored.key_encrypted


async def test_deleting_a_job_keeps_its_key_for_old_backups(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    job = await create_job(client, tenant)
    async with session_scope(sessionmaker) as session:
        before = await load_backup_key(session, box, tenant.org_id, job["key_id"])
    r = await client.delete(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)
    assert r.status_code == 204, r.text
    async with session_scope(sessionmaker) as session:
        assert await load_backup_key(session, box, tenant.org_id, job["key_id"]) == before


async def test_database_and_storage_in_use_cannot_be_deleted_but_history_survives_the_job(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    job = await create_job(client, tenant)
    r = await client.delete(f"/v1/databases/{job['database_id']}", headers=tenant.headers)
    assert r.status_code == 409
    assert "backup job" in r.json()["detail"]
    assert (
        await client.delete(f"/v1/storages/{job['storage_id']}", headers=tenant.headers)
    ).status_code == 409

    async with session_scope(sessionmaker) as session:
        run = BackupRun(
            org_id=tenant.org_id,
            job_id=str(job["id"]),
            database_id=str(job["database_id"]),
            storage_id=str(job["storage_id"]),
            status="completed",
        )
        session.add(run)

    assert (await client.delete(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).status_code == 204
    assert (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).status_code == 404
    kept = await client.get(f"/v1/backups/history/{run.id}", headers=tenant.headers)
    assert kept.status_code == 200
    assert kept.json()["job_id"] == job["id"]

    assert (
        await client.delete(f"/v1/databases/{job['database_id']}", headers=tenant.headers)
    ).status_code == 204
    assert (
        await client.delete(f"/v1/storages/{job['storage_id']}", headers=tenant.headers)
    ).status_code == 204


async def test_database_and_storage_must_share_an_agent(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with session_scope(sessionmaker) as session:
        one = Agent(org_id=tenant.org_id, name="one", x25519_public_key="AAAA")
        two = Agent(org_id=tenant.org_id, name="two", x25519_public_key="BBBB")
        session.add_all([one, two])
    db = await client.post(
        "/v1/databases",
        json={"name": "d", "engine": "sqlite", "settings": {"path": "/d.db"}, "agent_id": one.id},
        headers=tenant.headers,
    )
    assert db.status_code == 201, db.text
    assert db.json()["agent_id"] == one.id
    st = await client.post(
        "/v1/storages",
        json={"name": "s", "kind": "local", "settings": {"path": "/b"}, "agent_id": two.id},
        headers=tenant.headers,
    )
    body = {"name": "j", "database_id": db.json()["id"], "storage_id": st.json()["id"]}
    r = await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)
    assert r.status_code == 422
    assert r.json()["field"] == "storage_id"

    moved = await client.patch(
        f"/v1/storages/{st.json()['id']}", json={"agent_id": one.id}, headers=tenant.headers
    )
    assert moved.json()["agent_id"] == one.id
    assert (await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)).status_code == 201


async def test_job_needs_existing_database_and_storage(client: httpx.AsyncClient, tenant: Tenant) -> None:
    db = await create_database(client, tenant)
    st = await create_storage(client, tenant)
    r = await client.post(
        "/v1/backups/jobs",
        json={"name": "j", "database_id": "f" * 32, "storage_id": st["id"]},
        headers=tenant.headers,
    )
    assert (r.status_code, r.json()["field"]) == (422, "database_id")
    r = await client.post(
        "/v1/backups/jobs",
        json={"name": "j", "database_id": db["id"], "storage_id": "f" * 32},
        headers=tenant.headers,
    )
    assert (r.status_code, r.json()["field"]) == (422, "storage_id")
