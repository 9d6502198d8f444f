"""Whole-server jobs on the API's side: validation, one run per selected database at each start,
the listing asked of the agent over real NATS (a stand-in agent answers `rpc.db.list`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import nats
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rahatback_api.backups.selection import select_databases
from rahatback_api.db import session_scope
from rahatback_api.models import Agent, BackupCopy, BackupRun, OutboxMessage
from rahatback_api.scheduling import service as scheduling
from rahatback_api.security.secretbox import SecretBox
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant, create_database, create_job
from tests.api.test_operations import add_agent
from tests.servers import NatsServer

Answer = Callable[[m.DbListRequest], m.DbListReply]


def test_selection_by_include_and_exclude_globs() -> None:
    names = ["shop", "shop_eu", "shop_test", "crm", "Shop_big"]
    assert select_databases(names, [], []) == sorted(names)
    assert select_databases(names, ["shop*"], []) == ["shop", "shop_eu", "shop_test"]  # case-sensitive
    assert select_databases(names, ["shop*", "crm"], ["*_test"]) == ["crm", "shop", "shop_eu"]
    assert select_databases(names, [], ["*"]) == []
    assert select_databases(["a", "a"], ["[a-c]"], []) == ["a"]


@pytest.fixture
async def listing(nats_server: NatsServer) -> AsyncIterator[Callable[[Agent, Answer], Any]]:
    """Make an agent answer `rpc.db.list` with `answer(request)`; records the requests it got."""
    nc: NATS = await nats.connect(nats_server.url)

    async def serve(agent: Agent, answer: Answer) -> list[m.DbListRequest]:
        seen: list[m.DbListRequest] = []

        async def on_request(msg: Msg) -> None:
            request = m.DbListRequest.model_validate_json(msg.data)
            seen.append(request)
            await msg.respond(answer(request).to_bytes())

        await nc.subscribe(subjects.agent_rpc(agent.id, "db.list"), cb=on_request)
        await nc.flush()
        return seen

    yield serve
    await nc.drain()


async def commands(sessions: async_sessionmaker[AsyncSession], agent: Agent) -> list[m.BackupCommand]:
    async with session_scope(sessions) as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
    subject = subjects.agent_command(agent.id, "job.execute")
    return [m.BackupCommand.model_validate_json(row.payload) for row in rows if row.subject == subject]


async def test_whole_server_fields_are_validated(client: httpx.AsyncClient, tenant: Tenant) -> None:
    job = await create_job(client, tenant, all_databases=True, include_databases=["shop*"])
    assert (job["all_databases"], job["include_databases"], job["exclude_databases"]) == (True, ["shop*"], [])

    r = await client.post(
        "/v1/backups/jobs",
        json={
            "name": "patterns-alone",
            "database_id": job["database_id"],
            "storage_id": job["storage_id"],
            "exclude_databases": ["tmp_*"],
        },
        headers=tenant.headers,
    )
    assert r.status_code == 422 and r.json()["field"] == "exclude_databases"
    assert "all_databases" in r.json()["detail"]

    sqlite = await client.post(
        "/v1/databases",
        json={"name": "embedded", "engine": "sqlite", "settings": {"path": "/srv/app.db"}},
        headers=tenant.headers,
    )
    assert sqlite.status_code == 201, sqlite.text
    r = await client.patch(
        f"/v1/backups/jobs/{job['id']}", json={"database_id": sqlite.json()["id"]}, headers=tenant.headers
    )
    assert r.status_code == 422 and r.json()["field"] == "all_databases"
    assert "single database" in r.json()["detail"]

    r = await client.patch(
        f"/v1/backups/jobs/{job['id']}",
        json={"all_databases": False, "include_databases": []},
        headers=tenant.headers,
    )
    assert r.status_code == 200 and r.json()["all_databases"] is False
    for bad in ([""], ["x" * 129]):
        r = await client.patch(
            f"/v1/backups/jobs/{job['id']}", json={"include_databases": bad}, headers=tenant.headers
        )
        assert r.status_code == 422, r.text


async def test_each_start_lists_the_server_and_queues_one_run_per_selected_database(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    listing: Callable[[Agent, Answer], Any],
) -> None:
    agent = await add_agent(tenant)
    present = ["crm", "shop", "shop_eu", "shop_test"]
    requests = await listing(agent, lambda _request: m.DbListReply(ok=True, databases=present))
    db = await create_database(client, tenant, name="main-pg", database="postgres", password="pg-secret-pass")
    job = await create_job(
        client,
        tenant,
        database_id=db["id"],
        all_databases=True,
        include_databases=["shop*"],
        exclude_databases=["*_test"],
    )

    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 202, r.text
    first = r.json()
    assert first["batch_id"] and first["database_name"] == "shop"
    # the listing was asked with the server connection, its password sealed for that request only
    assert len(requests) == 1 and requests[0].database.settings["database"] == "postgres"
    assert requests[0].database.secrets is not None
    assert requests[0].database.secrets.info == m.seal_info("rpc", requests[0].request_id)

    batch = await client.get(f"/v1/backups/history?batch_id={first['batch_id']}", headers=tenant.headers)
    runs = batch.json()["items"]
    assert sorted(run["database_name"] for run in runs) == ["shop", "shop_eu"]
    assert {run["status"] for run in runs} == {"queued"} and {run["job_id"] for run in runs} == {job["id"]}

    sent = {c.run_id: c for c in await commands(sessionmaker, agent)}
    assert set(sent) == {run["id"] for run in runs}
    for run in runs:
        target = sent[run["id"]].database
        assert target.settings["database"] == run["database_name"]
        assert target.name == f"main-pg.{run['database_name']}"  # its own folder in the storage
        assert target.secrets is not None and target.secrets.info == m.seal_info("run", run["id"])

    again = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert again.status_code == 409 and "already running" in again.json()["detail"]

    # a restore of one of them goes back into the database it came from on that server
    eu = next(run for run in runs if run["database_name"] == "shop_eu")
    async with session_scope(sessionmaker) as session:
        row = await session.get(BackupRun, eu["id"])
        assert row is not None
        row.status = "completed"
        session.add(
            BackupCopy(
                org_id=tenant.org_id,
                run_id=eu["id"],
                job_id=job["id"],
                storage_id=eu["storage_id"],
                status="completed",
                storage_key="main-pg.shop_eu/x.sql.zst.rbk",
            )
        )
    r = await client.post(f"/v1/backups/history/{eu['id']}/restore", headers=tenant.headers)
    assert r.status_code == 202, r.text
    async with session_scope(sessionmaker) as session:
        rows = (await session.execute(select(OutboxMessage))).scalars().all()
    restore_subject = subjects.agent_command(agent.id, "restore.execute")
    restore = next(
        m.RestoreCommand.model_validate_json(row.payload) for row in rows if row.subject == restore_subject
    )
    assert restore.database.settings["database"] == "shop_eu"


async def test_a_server_that_cannot_be_listed_or_matches_nothing_is_a_clear_409(
    client: httpx.AsyncClient, tenant: Tenant, listing: Callable[[Agent, Answer], Any]
) -> None:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, all_databases=True, include_databases=["billing_*"])
    answer: dict[str, m.DbListReply] = {
        "reply": m.DbListReply(ok=False, error_code="auth_failed", error="password authentication failed")
    }
    await listing(agent, lambda _request: answer["reply"])

    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 409
    assert "could not list the databases" in r.json()["detail"]
    assert "password authentication failed" in r.json()["detail"]

    answer["reply"] = m.DbListReply(ok=True, databases=["crm", "shop"])
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 409
    assert "no database" in r.json()["detail"] and "crm, shop" in r.json()["detail"]
    history = await client.get(f"/v1/backups/history?job_id={job['id']}", headers=tenant.headers)
    assert history.json()["total"] == 0  # nothing was queued


async def test_an_offline_agent_cannot_list_its_server(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await add_agent(tenant)  # seen recently, but nobody answers on its subjects
    job = await create_job(client, tenant, all_databases=True)
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 409 and "offline" in r.json()["detail"]


async def test_a_scheduled_whole_server_run_whose_agent_answers_nonsense_is_a_failed_run(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    nats_server: NatsServer,
    app: FastAPI,
    box: SecretBox,
) -> None:
    """Not a 409 from start_backup, but the scheduled path must still record a failure someone hears of."""
    agent = await add_agent(tenant)
    nc: NATS = await nats.connect(nats_server.url)

    async def garbage(msg: Msg) -> None:
        await msg.respond(b'{"ok": "perhaps"')

    await nc.subscribe(subjects.agent_rpc(agent.id, "db.list"), cb=garbage)
    await nc.flush()
    job = await create_job(client, tenant, all_databases=True, cron="0 3 * * *")
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert r.status_code == 502 and "malformed db.list reply" in r.json()["detail"]

    fire = datetime(2026, 11, 26, 3, tzinfo=UTC)
    request = m.BackupRequested(job_id=str(job["id"]), org_id=tenant.org_id, fire_time=fire)
    async with session_scope(sessionmaker) as session:
        run = await scheduling.handle_backup_requested(
            session,
            box,
            app.state.bus,
            request,
            m.scheduled_msg_id("backup", str(job["id"]), fire),
            offline_after=timedelta(seconds=30),
        )
    await nc.drain()
    assert run is not None and run.status == "failed"
    assert "malformed db.list reply" in (run.error or "")
    async with session_scope(sessionmaker) as session:
        events = [
            row.subject
            for row in (await session.execute(select(OutboxMessage))).scalars()
            if row.subject.startswith("backup.")
        ]
    assert events == ["backup.failed"]


async def test_a_slow_listing_holds_no_write_lock_on_the_api_database(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    nats_server: NatsServer,
    app: FastAPI,
    box: SecretBox,
) -> None:
    """A scheduled whole-server start waits on its agent (here 7 s, past SQLite's 5 s busy timeout):
    meanwhile other writers (HTTP, reports, heartbeats) must go on."""
    agent = await add_agent(tenant)
    nc: NATS = await nats.connect(nats_server.url)

    async def slow(msg: Msg) -> None:
        await asyncio.sleep(7)
        await msg.respond(m.DbListReply(ok=True, databases=["shop"]).to_bytes())

    await nc.subscribe(subjects.agent_rpc(agent.id, "db.list"), cb=slow)
    await nc.flush()
    job = await create_job(client, tenant, all_databases=True, cron="0 3 * * *")
    fire = datetime(2026, 11, 26, 3, tzinfo=UTC)

    async def scheduled() -> BackupRun | None:
        async with session_scope(sessionmaker) as session:
            return await scheduling.handle_backup_requested(
                session,
                box,
                app.state.bus,
                m.BackupRequested(job_id=str(job["id"]), org_id=tenant.org_id, fire_time=fire),
                m.scheduled_msg_id("backup", str(job["id"]), fire),
                offline_after=timedelta(seconds=30),
            )

    starting = asyncio.create_task(scheduled())
    await asyncio.sleep(1)
    written = await client.post(
        "/v1/storages",
        json={"name": "while-listing", "kind": "local", "settings": {"path": "/srv/other"}},
        headers=tenant.headers,
    )
    assert written.status_code == 201, written.text
    run = await starting
    await nc.drain()
    assert run is not None and run.status == "queued" and run.database_name == "shop"
