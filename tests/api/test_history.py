from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
from rahatback_api.db import session_scope
from rahatback_api.models import BackupRun, RestoreRun
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
JOB_A, JOB_B = "a" * 32, "b" * 32
DB_A, DB_B = "c" * 32, "d" * 32


async def _seed(sessionmaker: async_sessionmaker[AsyncSession], org_id: str) -> list[BackupRun]:
    statuses = ["completed", "failed", "completed", "running", "completed", "partial", "completed"]
    runs = [
        BackupRun(
            org_id=org_id,
            job_id=JOB_A if i % 2 == 0 else JOB_B,
            database_id=DB_A if i % 2 == 0 else DB_B,
            storage_id="e" * 32,
            status=status,
            queued_at=T0 + timedelta(hours=i),
        )
        for i, status in enumerate(statuses)
    ]
    async with session_scope(sessionmaker) as session:
        session.add_all(runs)
    return runs


async def test_history_is_newest_first_and_paginated(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runs = await _seed(sessionmaker, tenant.org_id)
    newest_first = [r.id for r in reversed(runs)]

    page = (await client.get("/v1/backups/history", headers=tenant.headers)).json()
    assert (page["total"], page["limit"], page["offset"]) == (7, 50, 0)
    assert [r["id"] for r in page["items"]] == newest_first

    page = (await client.get("/v1/backups/history?limit=3&offset=3", headers=tenant.headers)).json()
    assert page["total"] == 7
    assert [r["id"] for r in page["items"]] == newest_first[3:6]
    page = (await client.get("/v1/backups/history?limit=3&offset=6", headers=tenant.headers)).json()
    assert [r["id"] for r in page["items"]] == newest_first[6:]


async def test_history_filters(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runs = await _seed(sessionmaker, tenant.org_id)

    async def ids(query: str) -> list[str]:
        r = await client.get(f"/v1/backups/history?{query}", headers=tenant.headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == len(body["items"])
        return [item["id"] for item in body["items"]]

    assert await ids(f"job_id={JOB_B}") == [runs[5].id, runs[3].id, runs[1].id]
    assert await ids(f"database_id={DB_A}&status=completed") == [
        runs[6].id,
        runs[4].id,
        runs[2].id,
        runs[0].id,
    ]
    assert await ids("status=failed") == [runs[1].id]
    since = (T0 + timedelta(hours=2)).isoformat()
    until = (T0 + timedelta(hours=4)).isoformat()
    assert await ids(f"since={since.replace('+', '%2B')}&until={until.replace('+', '%2B')}") == [
        runs[3].id,
        runs[2].id,
    ]
    # a naive timestamp is read as UTC
    assert await ids("since=2026-03-01T18:00:00") == [runs[6].id]
    r = await client.get(
        f"/v1/backups/history?since={until.replace('+', '%2B')}&until={since.replace('+', '%2B')}",
        headers=tenant.headers,
    )
    assert (r.status_code, r.json()["field"]) == (422, "since")


async def test_run_detail_has_every_field(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    run = BackupRun(
        org_id=tenant.org_id,
        job_id=JOB_A,
        database_id=DB_A,
        storage_id="e" * 32,
        agent_id="f" * 32,
        status="completed",
        queued_at=T0,
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=61),
        duration_ms=60_000,
        dump_size=5 * 2**30,
        artifact_size=2**30,
        dump_sha256="1" * 64,
        artifact_sha256="2" * 64,
        storage_key="shop/2026/03/01/shop_20260301T120000Z_x.sql.zst.rbk",
        compression="zstd",
        last_restore_status="completed",
    )
    async with session_scope(sessionmaker) as session:
        session.add(run)
    body = (await client.get(f"/v1/backups/history/{run.id}", headers=tenant.headers)).json()
    assert body["status"] == "completed"
    assert body["started_at"] == "2026-03-01T12:00:01Z"
    assert body["finished_at"] == "2026-03-01T12:01:01Z"
    assert body["duration_ms"] == 60_000
    assert (body["dump_size"], body["artifact_size"]) == (5 * 2**30, 2**30)  # beyond 32-bit
    assert (body["dump_sha256"], body["artifact_sha256"]) == ("1" * 64, "2" * 64)
    assert body["storage_key"] == run.storage_key
    assert body["error"] is None
    assert body["last_restore_status"] == "completed"
    assert (await client.get(f"/v1/backups/history/{'0' * 32}", headers=tenant.headers)).status_code == 404


async def test_restores_list_and_detail(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    runs = await _seed(sessionmaker, tenant.org_id)
    restores = [
        RestoreRun(
            org_id=tenant.org_id, backup_run_id=runs[0].id, database_id=DB_A, status="completed", queued_at=T0
        ),
        RestoreRun(
            org_id=tenant.org_id,
            backup_run_id=runs[2].id,
            database_id=DB_B,
            status="failed",
            error="pg_restore: relation exists",
            queued_at=T0 + timedelta(hours=1),
        ),
    ]
    async with session_scope(sessionmaker) as session:
        session.add_all(restores)
    page = (await client.get("/v1/backups/restores", headers=tenant.headers)).json()
    assert [r["id"] for r in page["items"]] == [restores[1].id, restores[0].id]
    page = (
        await client.get(f"/v1/backups/restores?backup_run_id={runs[0].id}", headers=tenant.headers)
    ).json()
    assert [r["id"] for r in page["items"]] == [restores[0].id]
    page = (await client.get(f"/v1/backups/restores?database_id={DB_B}", headers=tenant.headers)).json()
    assert [r["id"] for r in page["items"]] == [restores[1].id]
    detail = (await client.get(f"/v1/backups/restores/{restores[1].id}", headers=tenant.headers)).json()
    assert (detail["status"], detail["error"]) == ("failed", "pg_restore: relation exists")
