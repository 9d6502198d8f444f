"""Verification through the API: commands, records, job status, events, scheduled verification."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import OutboxMessage
from rahatback_api.operations import reports
from rahatback_contracts import messages as m
from rahatback_contracts import streams, subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select

from tests.api.conftest import Tenant, create_database, create_job
from tests.api.test_operations import add_agent, completed
from tests.servers import NatsServer


async def outbox(sessionmaker: async_sessionmaker[AsyncSession], subject: str) -> list[str]:
    async with session_scope(sessionmaker) as session:
        rows = await session.execute(
            select(OutboxMessage.payload)
            .where(OutboxMessage.subject == subject)
            .order_by(col(OutboxMessage.created_at))
        )
        return list(rows.scalars())


async def apply(
    sessionmaker: async_sessionmaker[AsyncSession], agent_id: str, report: m.Report, key: str
) -> bool:
    kind = {
        m.BackupCompleted: "backup.completed",
        m.VerifyStarted: "verify.started",
        m.VerifyCompleted: "verify.completed",
        m.VerifyFailed: "verify.failed",
    }[type(report)]
    async with session_scope(sessionmaker) as session:
        _, _, parsed = reports.parse_report(f"agent.{agent_id}.report.{kind}", report.to_bytes())
        return await reports.apply_report(session, agent_id, key, parsed)


async def backed_up(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    agent_id: str,
    **job: object,
) -> tuple[dict[str, object], str]:
    name = f"job-{utcnow().timestamp()}"
    database = await create_database(client, tenant, name=f"db-{name}", password="verify-db-password")
    created = await create_job(client, tenant, name=name, database_id=database["id"], **job)
    run = (await client.post(f"/v1/backups/jobs/{created['id']}/run", headers=tenant.headers)).json()
    assert await apply(sessionmaker, agent_id, completed(agent_id, run["id"]), f"{run['id']}:c")
    return created, str(run["id"])


async def test_a_verification_is_sent_recorded_and_announced(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    await client.post(
        "/v1/notifications/channels",
        json={"name": "dba", "kind": "email", "recipients": ["dba@example.com"]},  # failures by default
        headers=tenant.headers,
    )
    job, run_id = await backed_up(client, tenant, sessionmaker, agent.id)

    r = await client.post(
        f"/v1/backups/history/{run_id}/verify", json={"level": "test_restore"}, headers=tenant.headers
    )
    assert r.status_code == 202, r.text
    verify = r.json()
    assert verify["status"] == "queued" and verify["level"] == "test_restore"
    again = await client.post(f"/v1/backups/history/{run_id}/verify", json={}, headers=tenant.headers)
    assert again.status_code == 409 and "already being verified" in again.json()["detail"]

    (payload,) = await outbox(sessionmaker, subjects.agent_command(agent.id, "verify.execute"))
    command = m.VerifyCommand.model_validate_json(payload)
    assert command.verify_id == verify["id"] and command.level == "test_restore"
    assert (
        command.storage_key == "shop/x.sql.zst.rbk"
        and command.manifest_key == "shop/x.sql.zst.rbk.manifest.json"
    )
    assert command.database is not None and command.database.secrets is not None
    assert command.database.secrets.info == m.seal_info("verify", verify["id"])
    assert "verify-db-password" not in payload
    assert command.encryption is not None and command.encryption.job_key is not None

    started = m.VerifyStarted(agent_id=agent.id, occurred_at=utcnow(), verify_id=verify["id"])
    assert await apply(sessionmaker, agent.id, started, "v:s")
    now = utcnow()
    result = m.VerifyCompleted(
        agent_id=agent.id,
        occurred_at=now,
        verify_id=verify["id"],
        level="test_restore",
        ok=False,
        started_at=now,
        finished_at=now,
        artifact_sha256_ok=True,
        dump_sha256_ok=True,
        tables_compared=3,
        mismatches=[m.TableCheck(table="public.orders", expected=1000, found=640)],
    )
    assert await apply(sessionmaker, agent.id, result, "v:c")
    assert not await apply(sessionmaker, agent.id, result, "v:c")

    body = (await client.get(f"/v1/backups/verifications/{verify['id']}", headers=tenant.headers)).json()
    assert body["status"] == "failed" and body["tables_compared"] == 3
    assert body["mismatches"] == [{"table": "public.orders", "expected": 1000, "found": 640}]
    assert "public.orders expected 1000 rows, found 640" in body["error"]
    job_now = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert job_now["last_verify_status"] == "failed" and job_now["last_verify_id"] == verify["id"]
    assert job_now["last_verify_ok_at"] is None
    listed = (
        await client.get(
            "/v1/backups/verifications", params={"backup_run_id": run_id}, headers=tenant.headers
        )
    ).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == verify["id"]

    (event,) = await outbox(sessionmaker, "verify.failed")
    parsed = m.parse_event(event.encode())
    assert isinstance(parsed, m.VerifyEvent) and parsed.mismatches[0].table == "public.orders"
    assert [t.recipients for t in parsed.notify] == [["dba@example.com"]]

    # an integrity check that passes clears the job's status
    r = await client.post(f"/v1/backups/history/{run_id}/verify", json={}, headers=tenant.headers)
    ok = m.VerifyCompleted(
        agent_id=agent.id,
        occurred_at=now,
        verify_id=r.json()["id"],
        level="integrity",
        ok=True,
        started_at=now,
        finished_at=now,
        artifact_sha256_ok=True,
        dump_sha256_ok=True,
    )
    assert await apply(sessionmaker, agent.id, ok, "v2:c")
    job_now = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert job_now["last_verify_status"] == "completed" and job_now["last_verify_ok_at"] is not None
    (command2,) = [
        c
        for c in map(
            m.VerifyCommand.model_validate_json,
            await outbox(sessionmaker, subjects.agent_command(agent.id, "verify.execute")),
        )
        if c.verify_id == r.json()["id"]
    ]
    assert command2.database is None  # integrity never touches a database


async def test_only_the_assigned_agent_reports_and_unverifiable_runs_are_refused(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name="never-ran")
    run = (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)).json()
    r = await client.post(f"/v1/backups/history/{run['id']}/verify", json={}, headers=tenant.headers)
    assert r.status_code == 409 and "no artifact" in r.json()["detail"]
    bad = await client.post(
        f"/v1/backups/history/{run['id']}/verify", json={"level": "deep"}, headers=tenant.headers
    )
    assert bad.status_code == 422

    _, run_id = await backed_up(client, tenant, sessionmaker, agent.id)
    verify = (
        await client.post(f"/v1/backups/history/{run_id}/verify", json={}, headers=tenant.headers)
    ).json()
    intruder = await add_agent(tenant, online=False)
    failed = m.VerifyFailed(agent_id=intruder.id, occurred_at=utcnow(), verify_id=verify["id"], error="x")
    with pytest.raises(reports.UntrustedReport):
        await apply(sessionmaker, intruder.id, failed, "i:f")


async def test_a_scheduled_verification_fires_through_control(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    nats_server: NatsServer,
) -> None:
    agent = await add_agent(tenant)
    job, run_id = await backed_up(
        client, tenant, sessionmaker, agent.id, verify_cron="0 4 * * *", verify_level="integrity"
    )
    assert job["verify_cron"] == "0 4 * * *"
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(streams.SCHEDULES.bucket)
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            try:
                entry = m.ScheduleEntry.from_bytes(
                    (await kv.get(m.schedule_key("verify", str(job["id"])))).value or b""
                )
                break
            except KeyNotFoundError:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
        assert entry.kind == "verify" and entry.cron == "0 4 * * *"
        fire = datetime(2026, 11, 27, 4, 0, tzinfo=UTC)
        request = m.VerifyRequested(job_id=str(job["id"]), org_id=tenant.org_id, fire_time=fire)
        await nc.jetstream().publish(
            subjects.VERIFY_REQUESTED,
            request.to_bytes(),
            headers={"Nats-Msg-Id": m.scheduled_msg_id("verify", str(job["id"]), fire)},
        )
        deadline = asyncio.get_running_loop().time() + 15
        while not (
            items := (
                await client.get(
                    "/v1/backups/verifications", params={"job_id": job["id"]}, headers=tenant.headers
                )
            ).json()["items"]
        ):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert items[0]["trigger"] == "schedule" and items[0]["backup_run_id"] == run_id
