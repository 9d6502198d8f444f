"""Schedules reach the scheduler through KV; scheduled requests run jobs; retention; dead-man alerts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import BackupJob, OutboxMessage
from rahatback_api.operations import reports
from rahatback_api.scheduling.service import sweep_overdue
from rahatback_contracts import messages as m
from rahatback_contracts import streams, subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from tests.api.conftest import Tenant, create_job
from tests.api.test_operations import add_agent, completed
from tests.servers import NatsServer


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


async def _entry(kv: KeyValue, job_id: str) -> m.ScheduleEntry | None:
    try:
        value = (await kv.get(m.schedule_key("backup", job_id))).value
    except KeyNotFoundError:
        return None
    return m.ScheduleEntry.from_bytes(value or b"")


async def wait_for_entry(kv: KeyValue, job_id: str, check: object) -> m.ScheduleEntry | None:
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        entry = await _entry(kv, job_id)
        if callable(check) and check(entry):
            return entry
        assert asyncio.get_running_loop().time() < deadline, f"KV entry never matched, last: {entry}"
        await asyncio.sleep(0.1)


async def test_job_schedules_are_mirrored_into_the_schedules_bucket(
    client: httpx.AsyncClient, tenant: Tenant, nc: nats.NATS
) -> None:
    kv = await nc.jetstream().key_value(streams.SCHEDULES.bucket)
    job = await create_job(client, tenant, name="nightly", cron="0 3 * * *", timezone="Europe/Istanbul")
    entry = await wait_for_entry(kv, str(job["id"]), lambda e: e is not None)
    assert entry is not None and entry.cron == "0 3 * * *" and entry.timezone == "Europe/Istanbul"
    assert entry.org_id == tenant.org_id and entry.enabled

    path = f"/v1/backups/jobs/{job['id']}"
    r = await client.patch(path, json={"cron": "*/15 * * * *"}, headers=tenant.headers)
    assert r.status_code == 200
    await wait_for_entry(kv, str(job["id"]), lambda e: e is not None and e.cron == "*/15 * * * *")
    await client.patch(path, json={"enabled": False}, headers=tenant.headers)
    await wait_for_entry(kv, str(job["id"]), lambda e: e is not None and not e.enabled)
    await client.patch(path, json={"cron": None}, headers=tenant.headers)
    await wait_for_entry(kv, str(job["id"]), lambda e: e is None)

    again = await create_job(client, tenant, name="hourly", cron="0 * * * *")
    await wait_for_entry(kv, str(again["id"]), lambda e: e is not None)
    assert (await client.delete(f"/v1/backups/jobs/{again['id']}", headers=tenant.headers)).status_code == 204
    await wait_for_entry(kv, str(again["id"]), lambda e: e is None)


@pytest.mark.parametrize(
    ("field", "value"), [("cron", "61 * * * *"), ("cron", "every day"), ("timezone", "Mars/Olympus")]
)
async def test_bad_schedules_are_422_naming_the_field(
    client: httpx.AsyncClient, tenant: Tenant, field: str, value: str
) -> None:
    job = await create_job(client, tenant, name="j")
    r = await client.patch(f"/v1/backups/jobs/{job['id']}", json={field: value}, headers=tenant.headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field


async def _runs(client: httpx.AsyncClient, tenant: Tenant, job_id: str) -> list[dict[str, object]]:
    r = await client.get("/v1/backups/history", params={"job_id": job_id}, headers=tenant.headers)
    items: list[dict[str, object]] = r.json()["items"]
    return items


async def _wait_runs(
    client: httpx.AsyncClient, tenant: Tenant, job_id: str, count: int
) -> list[dict[str, object]]:
    deadline = asyncio.get_running_loop().time() + 15
    while len(runs := await _runs(client, tenant, job_id)) < count:
        assert asyncio.get_running_loop().time() < deadline, runs
        await asyncio.sleep(0.1)
    return runs


async def _request(
    nc: nats.NATS, job: dict[str, object], org_id: str, fire: datetime, **extra: object
) -> None:
    request = m.BackupRequested(job_id=str(job["id"]), org_id=org_id, fire_time=fire, **extra)
    msg_id = m.scheduled_msg_id("backup", str(job["id"]), fire)
    await nc.jetstream().publish(
        subjects.BACKUP_REQUESTED, request.to_bytes(), headers={"Nats-Msg-Id": msg_id}
    )


async def test_scheduled_requests_run_the_job_once_and_record_skips_and_misses(
    client: httpx.AsyncClient, tenant: Tenant, nc: nats.NATS
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name="every-minute", cron="* * * * *")
    fire = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    await _request(nc, job, tenant.org_id, fire)
    await _request(nc, job, tenant.org_id, fire)  # a second scheduler replica: same Msg-Id
    runs = await _wait_runs(client, tenant, str(job["id"]), 1)
    assert runs[0]["trigger"] == "schedule" and runs[0]["status"] == "queued"
    assert runs[0]["agent_id"] == agent.id

    # the next fire while the first run is still queued: recorded as skipped, not queued behind it
    await _request(nc, job, tenant.org_id, fire + timedelta(minutes=1))
    runs = await _wait_runs(client, tenant, str(job["id"]), 2)
    skipped = [r for r in runs if r["status"] == "skipped"]
    assert len(skipped) == 1 and runs[0]["id"] in str(skipped[0]["error"])

    # the scheduler was down past the grace period: a visible missed run, nothing started
    await _request(nc, job, tenant.org_id, fire + timedelta(minutes=2), missed=True, missed_fires=42)
    runs = await _wait_runs(client, tenant, str(job["id"]), 3)
    missed = [r for r in runs if r["status"] == "missed"]
    assert len(missed) == 1 and "42 scheduled run(s) missed" in str(missed[0]["error"])
    r = await client.get("/v1/backups/history", params={"status": "missed"}, headers=tenant.headers)
    assert [run["id"] for run in r.json()["items"]] == [missed[0]["id"]]
    await asyncio.sleep(1)  # nothing else arrives (the duplicate was deduplicated)
    assert len(await _runs(client, tenant, str(job["id"]))) == 3


async def test_a_scheduled_run_with_no_agent_online_fails_visibly(
    client: httpx.AsyncClient, tenant: Tenant, nc: nats.NATS, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await add_agent(tenant, online=False)
    job = await create_job(client, tenant, name="orphan", cron="0 * * * *")
    await _request(nc, job, tenant.org_id, datetime(2026, 11, 26, 4, 0, tzinfo=UTC))
    runs = await _wait_runs(client, tenant, str(job["id"]), 1)
    assert runs[0]["status"] == "failed" and "no agent" in str(runs[0]["error"])
    async with session_scope(sessionmaker) as session:
        events = (
            (await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.failed")))
            .scalars()
            .all()
        )
    assert [m.BackupEvent.model_validate_json(e.payload).run_id for e in events] == [runs[0]["id"]]


async def _apply(
    sessionmaker: async_sessionmaker[AsyncSession], agent_id: str, report: m.Report, key: str
) -> bool:
    kind = {
        m.BackupCompleted: "backup.completed",
        m.PruneCompleted: "prune.completed",
        m.PruneFailed: "prune.failed",
    }[type(report)]
    subject = f"agent.{agent_id}.report.{kind}"
    async with session_scope(sessionmaker) as session:
        _, _, parsed = reports.parse_report(subject, report.to_bytes())
        return await reports.apply_report(session, agent_id, key, parsed)


async def _prune_commands(
    sessionmaker: async_sessionmaker[AsyncSession], agent_id: str
) -> list[m.PruneCommand]:
    async with session_scope(sessionmaker) as session:
        rows = (
            (
                await session.execute(
                    select(OutboxMessage)
                    .where(OutboxMessage.subject == subjects.agent_command(agent_id, "prune.execute"))
                    .order_by(OutboxMessage.created_at)  # type: ignore[arg-type]
                )
            )
            .scalars()
            .all()
        )
    return [m.PruneCommand.model_validate_json(row.payload) for row in rows]


async def _complete_a_run(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    agent_id: str,
    job_id: str,
) -> str:
    r = await client.post(f"/v1/backups/jobs/{job_id}/run", headers=tenant.headers)
    assert r.status_code == 202, r.text
    run_id = str(r.json()["id"])
    key = f"shop/{run_id}.sql.zst.rbk"
    report = completed(agent_id, run_id, storage_key=key, manifest_key=f"{key}.manifest.json")
    assert await _apply(sessionmaker, agent_id, report, f"{run_id}:completed")
    return run_id


async def test_retention_prunes_after_each_success_and_records_what_happened(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name="kept-short", retention={"keep_last": 1})
    assert job["retention"] == {
        "keep_last": 1,
        "keep_days": None,
        "keep_daily": None,
        "keep_weekly": None,
        "keep_monthly": None,
        "keep_yearly": None,
    }
    first = await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))
    assert await _prune_commands(sessionmaker, agent.id) == []  # the only backup is never pruned
    second = await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))

    (prune,) = await _prune_commands(sessionmaker, agent.id)
    assert [(i.run_id, i.storage_key) for i in prune.items] == [(first, f"shop/{first}.sql.zst.rbk")]
    assert prune.items[0].manifest_key == f"shop/{first}.sql.zst.rbk.manifest.json"
    assert prune.storage.kind == "local"

    # only the agent the prune went to may report on it
    intruder = await add_agent(tenant, online=False)
    done = m.PruneCompleted(
        agent_id=intruder.id, occurred_at=utcnow(), prune_id=prune.prune_id, deleted=[first]
    )
    with pytest.raises(reports.UntrustedReport):
        await _apply(sessionmaker, intruder.id, done, "p-x")
    done = m.PruneCompleted(agent_id=agent.id, occurred_at=utcnow(), prune_id=prune.prune_id, deleted=[first])
    assert await _apply(sessionmaker, agent.id, done, f"{prune.prune_id}:completed")
    assert not await _apply(sessionmaker, agent.id, done, f"{prune.prune_id}:completed")

    pruned = (await client.get(f"/v1/backups/history/{first}", headers=tenant.headers)).json()
    assert pruned["pruned_at"] is not None and pruned["status"] == "completed"
    kept = (await client.get(f"/v1/backups/history/{second}", headers=tenant.headers)).json()
    assert kept["pruned_at"] is None
    r = await client.post(f"/v1/backups/history/{first}/restore", json={}, headers=tenant.headers)
    assert r.status_code == 409 and "retention" in r.json()["detail"]

    # a failed delete is reported on the run and the job, and retried after the next success
    third = await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))
    prune2 = (await _prune_commands(sessionmaker, agent.id))[-1]
    assert [i.run_id for i in prune2.items] == [second]
    failed = m.PruneCompleted(
        agent_id=agent.id,
        occurred_at=utcnow(),
        prune_id=prune2.prune_id,
        failures=[m.PruneFailure(run_id=second, error="permission denied deleting the artifact")],
    )
    assert await _apply(sessionmaker, agent.id, failed, f"{prune2.prune_id}:completed")
    run2 = (await client.get(f"/v1/backups/history/{second}", headers=tenant.headers)).json()
    assert run2["pruned_at"] is None and "permission denied" in run2["prune_error"]
    job_now = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert "permission denied" in job_now["last_prune_error"]
    await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))
    prune3 = (await _prune_commands(sessionmaker, agent.id))[-1]
    assert sorted(i.run_id for i in prune3.items) == sorted([second, third])


async def test_a_failed_backup_never_triggers_retention(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name="fragile", retention={"keep_last": 1})
    await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    failed = m.BackupFailed(agent_id=agent.id, occurred_at=utcnow(), run_id=r.json()["id"], error="disk full")
    subject = subjects.agent_report(agent.id, "backup", "failed")
    async with session_scope(sessionmaker) as session:
        _, _, parsed = reports.parse_report(subject, failed.to_bytes())
        assert await reports.apply_report(session, agent.id, "f1", parsed)
    assert await _prune_commands(sessionmaker, agent.id) == []


async def test_overdue_is_raised_once_and_cleared_by_the_next_success(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name="watched", cron="*/5 * * * *")
    r = await client.post(
        "/v1/notifications/channels",
        json={"name": "oncall", "kind": "email", "recipients": ["oncall@example.com"]},
        headers=tenant.headers,
    )
    assert r.status_code == 201
    grace = timedelta(minutes=10)
    async with session_scope(sessionmaker) as session:
        assert await sweep_overdue(session, grace) == 0  # just scheduled: not overdue
        row = await session.get(BackupJob, job["id"])
        assert row is not None
        row.schedule_set_at = utcnow() - timedelta(hours=2)
    async with session_scope(sessionmaker) as session:
        assert await sweep_overdue(session, grace) == 1
    async with session_scope(sessionmaker) as session:
        assert await sweep_overdue(session, grace) == 0  # raised once per lapse
        rows = (
            (await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.overdue")))
            .scalars()
            .all()
        )
    assert len(rows) == 1
    event = m.parse_event(rows[0].payload.encode())
    assert isinstance(event, m.OverdueEvent) and event.job_name == "watched" and event.cron == "*/5 * * * *"
    assert [t.recipients for t in event.notify] == [["oncall@example.com"]]
    overdue = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert overdue["overdue_since"] is not None

    await _complete_a_run(client, tenant, sessionmaker, agent.id, str(job["id"]))
    cleared = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert cleared["overdue_since"] is None and cleared["last_success_at"] is not None
