"""The API's side of the flows: run now, agent reports (untrusted, idempotent), the stall watchdog.

Runs against the real app (SQLite and PostgreSQL) and the real nats-server of the session.
"""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import Agent, BackupJob, BackupRun, OutboxMessage
from rahatback_api.operations import reports, service
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant, TenantFactory, create_database, create_job

OFFLINE = timedelta(seconds=30)


def public_key() -> str:
    raw = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


async def add_agent(tenant: Tenant, *, online: bool = True) -> Agent:
    async with session_scope(tenant.sessionmaker) as session:
        agent = Agent(
            org_id=tenant.org_id,
            name=f"agent-{uuid.uuid4().hex[:6]}",
            x25519_public_key=public_key(),
            last_seen_at=utcnow() if online else utcnow() - timedelta(hours=1),
        )
        session.add(agent)
    return agent


async def run_now(client: httpx.AsyncClient, tenant: Tenant, name: str = "nightly") -> dict[str, Any]:
    job = await create_job(client, tenant, name=name)
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 202, r.text
    body: dict[str, Any] = r.json()
    return body


def completed(agent_id: str, run_id: str, **fields: Any) -> m.BackupCompleted:
    now = utcnow()
    values: dict[str, Any] = {
        "agent_id": agent_id,
        "occurred_at": now,
        "run_id": run_id,
        "started_at": now - timedelta(seconds=3),
        "finished_at": now,
        "storage_key": "shop/x.sql.zst.rbk",
        "manifest_key": "shop/x.sql.zst.rbk.manifest.json",
        "dump_size": 1000,
        "artifact_size": 300,
        "dump_sha256": "a" * 64,
        "artifact_sha256": "b" * 64,
        "dump_format": "postgresql-plain-sql",
        "agent_version": "0.1.0",
    }
    return m.BackupCompleted(**{**values, **fields})


async def apply(
    sessions: async_sessionmaker[AsyncSession], subject: str, report: m.Report, msg_id: str
) -> bool:
    agent_id, _, parsed = reports.parse_report(subject, report.to_bytes())
    async with session_scope(sessions) as session:
        return await reports.apply_report(session, agent_id, msg_id, parsed)


async def test_run_now_queues_a_sealed_command_and_refuses_a_second_run(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    db = await create_database(client, tenant, password="db-secret-password")
    job = await create_job(client, tenant, database_id=db["id"])
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["agent_id"] == agent.id
    again = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert again.status_code == 409 and "already running" in again.json()["detail"]

    async with session_scope(sessionmaker) as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
    commands = [row for row in rows if row.subject == subjects.agent_command(agent.id, "job.execute")]
    assert len(commands) == 1
    command = m.BackupCommand.model_validate_json(commands[0].payload)
    assert command.run_id == r.json()["id"] and command.database.secrets is not None
    assert command.database.secrets.info == m.seal_info("run", command.run_id)
    assert "db-secret-password" not in commands[0].payload


async def test_run_now_without_an_online_agent_is_409(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await add_agent(tenant, online=False)
    job = await create_job(client, tenant)
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 409 and "no agent" in r.json()["detail"]


async def test_operations_on_another_tenants_resources_are_404(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: TenantFactory
) -> None:
    await add_agent(tenant)
    run = await run_now(client, tenant)
    other = await make_tenant()
    await add_agent(other)
    for path in (
        f"/v1/backups/jobs/{run['job_id']}/run",
        f"/v1/backups/history/{run['id']}/restore",
        f"/v1/databases/{run['database_id']}/test",
        f"/v1/storages/{run['storage_id']}/test",
    ):
        r = await client.post(path, headers=other.headers)
        assert r.status_code == 404, (path, r.text)


async def test_reports_are_checked_applied_once_and_announced_once(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant)
    intruder = await add_agent(tenant)

    # another agent cannot report on this run, nor claim to be this agent in the body
    with pytest.raises(reports.UntrustedReport):
        await apply(
            sessionmaker,
            subjects.agent_report(intruder.id, "backup", "completed"),
            completed(intruder.id, run["id"]),
            "x:1",
        )
    with pytest.raises(reports.UntrustedReport):
        await apply(
            sessionmaker,
            subjects.agent_report(intruder.id, "backup", "completed"),
            completed(agent.id, run["id"]),
            "x:2",
        )

    subject = subjects.agent_report(agent.id, "backup", "completed")
    assert (
        await apply(sessionmaker, subject, completed(agent.id, run["id"]), f"{run['id']}:completed") is True
    )
    # the same message again, and a later contradicting one, change nothing
    assert (
        await apply(sessionmaker, subject, completed(agent.id, run["id"]), f"{run['id']}:completed") is False
    )
    failed = m.BackupFailed(agent_id=agent.id, occurred_at=utcnow(), run_id=run["id"], error="late")
    assert (
        await apply(sessionmaker, subjects.agent_report(agent.id, "backup", "failed"), failed, "other")
        is False
    )

    r = await client.get(f"/v1/backups/history/{run['id']}", headers=tenant.headers)
    body = r.json()
    assert body["status"] == "completed" and body["dump_size"] == 1000 and body["duration_ms"] == 3000
    assert body["error"] is None
    async with session_scope(sessionmaker) as session:
        job = await session.get(BackupJob, run["job_id"])
        events = (
            (await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.completed")))
            .scalars()
            .all()
        )
    assert job is not None and job.last_run_status == "completed"
    assert len(events) == 1 and m.BackupEvent.model_validate_json(events[0].payload).run_id == run["id"]


async def test_watchdog_fails_runs_of_silent_agents_and_stalled_runs(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    silent = await run_now(client, tenant)
    channel = {"name": "oncall", "kind": "email", "recipients": ["oncall@example.com"]}
    assert (
        await client.post("/v1/notifications/channels", json=channel, headers=tenant.headers)
    ).status_code == 201
    async with session_scope(sessionmaker) as session:
        run = await session.get(BackupRun, silent["id"])
        stored_agent = await session.get(Agent, agent.id)
        assert run is not None and stored_agent is not None
        run.status, run.started_at, run.last_progress_at = "running", utcnow(), utcnow()
        stored_agent.last_seen_at = utcnow() - timedelta(minutes=5)
    async with session_scope(sessionmaker) as session:
        assert (
            await service.sweep_stalled(session, stall_after=timedelta(minutes=5), offline_after=OFFLINE) == 1
        )

    r = await client.get(f"/v1/backups/history/{silent['id']}", headers=tenant.headers)
    assert r.json()["status"] == "failed" and "stopped heartbeating" in r.json()["error"]
    # a hung run failed by the watchdog notifies like any failure
    async with session_scope(sessionmaker) as session:
        failed = (
            await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.failed"))
        ).scalar_one()
    event = m.parse_event(failed.payload.encode())
    assert [t.recipients for t in event.notify] == [["oncall@example.com"]]

    # an agent that heartbeats but whose run makes no progress
    await add_agent(tenant)  # the newest online agent takes the next run
    stalled = await run_now(client, tenant, name="hourly")
    async with session_scope(sessionmaker) as session:
        run = await session.get(BackupRun, stalled["id"])
        assert run is not None
        run.status, run.last_progress_at = "running", utcnow() - timedelta(minutes=10)
    async with session_scope(sessionmaker) as session:
        assert (
            await service.sweep_stalled(session, stall_after=timedelta(minutes=5), offline_after=OFFLINE) == 1
        )
        assert (
            await service.sweep_stalled(session, stall_after=timedelta(minutes=5), offline_after=OFFLINE) == 0
        )
    r = await client.get(f"/v1/backups/history/{stalled['id']}", headers=tenant.headers)
    assert r.json()["status"] == "failed" and "no progress" in r.json()["error"]


async def test_a_late_agent_result_overrides_a_watchdog_failure(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant)
    async with session_scope(sessionmaker) as session:
        stored = await session.get(BackupRun, run["id"])
        assert stored is not None
        service.fail_run(stored, "agent 'x' stopped heartbeating for more than 30 s")
    subject = subjects.agent_report(agent.id, "backup", "completed")
    assert (
        await apply(sessionmaker, subject, completed(agent.id, run["id"]), f"{run['id']}:completed") is True
    )
    body = (await client.get(f"/v1/backups/history/{run['id']}", headers=tenant.headers)).json()
    assert body["status"] == "completed" and body["error"] is None and body["storage_key"]


async def test_heartbeats_keep_listed_runs_alive_and_unlisted_ones_go_stale(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    listed = await run_now(client, tenant, name="listed")
    forgotten = await run_now(client, tenant, name="forgotten")
    long_ago = utcnow() - timedelta(minutes=10)
    async with session_scope(sessionmaker) as session:
        for run_id in (listed["id"], forgotten["id"]):
            run = await session.get(BackupRun, run_id)
            assert run is not None
            run.status, run.last_progress_at = "running", long_ago
    heartbeat = m.Heartbeat(agent_id=agent.id, version="0.1.0", running=[listed["id"]], at=utcnow())
    async with session_scope(sessionmaker) as session:
        await service.record_heartbeat(session, heartbeat, agent.id, OFFLINE)
    async with session_scope(sessionmaker) as session:
        assert (
            await service.sweep_stalled(session, stall_after=timedelta(minutes=2), offline_after=OFFLINE) == 1
        )
    statuses = {
        run_id: (await client.get(f"/v1/backups/history/{run_id}", headers=tenant.headers)).json()["status"]
        for run_id in (listed["id"], forgotten["id"])
    }
    assert statuses == {listed["id"]: "running", forgotten["id"]: "failed"}


async def test_restore_reports_update_the_restore_and_its_backup(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant)
    await apply(
        sessionmaker,
        subjects.agent_report(agent.id, "backup", "completed"),
        completed(agent.id, run["id"]),
        "done",
    )
    # no body: restore into the database that was backed up
    r = await client.post(f"/v1/backups/history/{run['id']}/restore", headers=tenant.headers)
    assert r.status_code == 202, r.text
    restore = r.json()
    assert restore["database_id"] == run["database_id"] and restore["status"] == "queued"
    busy = await client.post(f"/v1/backups/history/{run['id']}/restore", headers=tenant.headers)
    assert busy.status_code == 409

    now = utcnow()
    started = m.RestoreStarted(agent_id=agent.id, occurred_at=now, restore_id=restore["id"])
    failed = m.RestoreFailed(
        agent_id=agent.id,
        occurred_at=now,
        restore_id=restore["id"],
        stage="restoring",
        error="artifact chunk 3 failed authentication",
    )
    intruder = await add_agent(tenant)
    with pytest.raises(reports.UntrustedReport):
        await apply(
            sessionmaker,
            subjects.agent_report(intruder.id, "restore", "failed"),
            m.RestoreFailed(**{**failed.model_dump(), "agent_id": intruder.id}),
            "i",
        )
    assert (
        await apply(sessionmaker, subjects.agent_report(agent.id, "restore", "started"), started, "s") is True
    )
    assert (
        await apply(sessionmaker, subjects.agent_report(agent.id, "restore", "failed"), failed, "f") is True
    )
    assert (
        await apply(sessionmaker, subjects.agent_report(agent.id, "restore", "failed"), failed, "f") is False
    )

    body = (await client.get(f"/v1/backups/restores/{restore['id']}", headers=tenant.headers)).json()
    assert body["status"] == "failed" and "authentication" in body["error"]
    backup = (await client.get(f"/v1/backups/history/{run['id']}", headers=tenant.headers)).json()
    assert backup["last_restore_status"] == "failed"
