"""Another organization's resources are invisible: 404 on every route, absent from every list."""

from __future__ import annotations

import httpx
from rahatback_api.db import session_scope
from rahatback_api.models import Agent, BackupRun, RestoreRun
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import TenantFactory, create_job


async def test_org_b_cannot_see_or_touch_org_a(
    client: httpx.AsyncClient, make_tenant: TenantFactory, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    a, b = await make_tenant(), await make_tenant()
    job = await create_job(client, a)
    async with session_scope(sessionmaker) as session:
        agent = Agent(org_id=a.org_id, name="a-host", x25519_public_key="AAAA")
        run = BackupRun(
            org_id=a.org_id,
            job_id=str(job["id"]),
            database_id=str(job["database_id"]),
            storage_id=str(job["storage_id"]),
            status="completed",
        )
        session.add_all([agent, run])
        await session.flush()
        restore = RestoreRun(org_id=a.org_id, backup_run_id=run.id, database_id=str(job["database_id"]))
        session.add(restore)

    for path in (
        f"/v1/databases/{job['database_id']}",
        f"/v1/storages/{job['storage_id']}",
        f"/v1/backups/jobs/{job['id']}",
        f"/v1/backups/history/{run.id}",
        f"/v1/backups/restores/{restore.id}",
        f"/v1/agents/{agent.id}",
    ):
        assert (await client.get(path, headers=a.headers)).status_code == 200, path
        r = await client.get(path, headers=b.headers)
        assert r.status_code == 404, path
        assert r.json()["detail"].endswith("not found")

    for path in (f"/v1/databases/{job['database_id']}", f"/v1/storages/{job['storage_id']}"):
        assert (await client.patch(path, json={"name": "mine"}, headers=b.headers)).status_code == 404
    assert (
        await client.patch(f"/v1/backups/jobs/{job['id']}", json={"name": "x"}, headers=b.headers)
    ).status_code == 404
    for path in (
        f"/v1/backups/jobs/{job['id']}",
        f"/v1/databases/{job['database_id']}",
        f"/v1/storages/{job['storage_id']}",
    ):
        assert (await client.delete(path, headers=b.headers)).status_code == 404

    for path in ("/v1/databases", "/v1/storages", "/v1/backups/jobs", "/v1/agents"):
        assert (await client.get(path, headers=b.headers)).json() == [], path
    for path in ("/v1/backups/history", "/v1/backups/restores"):
        assert (await client.get(path, headers=b.headers)).json()["total"] == 0
    filtered = await client.get(f"/v1/backups/history?job_id={job['id']}", headers=b.headers)
    assert filtered.json()["items"] == []

    # nor can B use A's resources as references
    stolen = {"name": "steal", "database_id": job["database_id"], "storage_id": job["storage_id"]}
    r = await client.post("/v1/backups/jobs", json=stolen, headers=b.headers)
    assert (r.status_code, r.json()["field"]) == (422, "database_id")
    r = await client.post(
        "/v1/databases",
        json={"name": "d", "engine": "sqlite", "settings": {"path": "/x.db"}, "agent_id": agent.id},
        headers=b.headers,
    )
    assert (r.status_code, r.json()["field"]) == (422, "agent_id")

    # and A still has everything
    assert (await client.get(f"/v1/backups/jobs/{job['id']}", headers=a.headers)).json()["name"] == job[
        "name"
    ]
