"""One dump, several copies: job validation, the command, partial runs, restore from a chosen copy,
retention storage by storage."""

from __future__ import annotations

from typing import Any

import httpx
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import OutboxMessage
from rahatback_api.operations import reports
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select

from tests.api.conftest import Tenant, create_database, create_job, create_storage
from tests.api.test_operations import add_agent, completed


async def storages(client: httpx.AsyncClient, tenant: Tenant, *names: str) -> list[str]:
    return [str((await create_storage(client, tenant, name=name))["id"]) for name in names]


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
    kind = {m.BackupCompleted: "backup.completed", m.PruneCompleted: "prune.completed"}[type(report)]
    async with session_scope(sessionmaker) as session:
        _, _, parsed = reports.parse_report(f"agent.{agent_id}.report.{kind}", report.to_bytes())
        return await reports.apply_report(session, agent_id, key, parsed)


def copies_of(run_id: str, *results: tuple[str, bool]) -> dict[str, Any]:
    copies = [
        m.CopyResult(
            storage_id=s, ok=True, storage_key=f"{s}/{run_id}.rbk", manifest_key=f"{s}/{run_id}.rbk.m"
        )
        if ok
        else m.CopyResult(storage_id=s, ok=False, error=f"{s} refused the upload")
        for s, ok in results
    ]
    first = next(c for c in copies if c.ok)
    return {"copies": copies, "storage_key": first.storage_key, "manifest_key": first.manifest_key}


async def test_extra_storages_are_validated(client: httpx.AsyncClient, tenant: Tenant) -> None:
    primary, extra = await storages(client, tenant, "primary", "offsite")
    database = await create_database(client, tenant)
    for extras, needle in (
        (["nope"], "no such storage 'nope'"),
        ([extra, extra], "only one copy"),
        ([primary], "only one copy"),
        ([extra] * 5, "at most 4"),
    ):
        body = {
            "name": "j",
            "database_id": database["id"],
            "storage_id": primary,
            "extra_storage_ids": extras,
        }
        r = await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)
        assert r.status_code == 422, (extras, r.text)
        assert needle in r.text and "extra_storage_ids" in r.text
    job = await create_job(client, tenant, name="copies", storage_id=primary, extra_storage_ids=[extra])
    assert job["extra_storage_ids"] == [extra]
    r = await client.delete(f"/v1/storages/{extra}", headers=tenant.headers)
    assert r.status_code == 409 and "use this storage" in r.json()["detail"]
    r = await client.patch(
        f"/v1/backups/jobs/{job['id']}", json={"extra_storage_ids": []}, headers=tenant.headers
    )
    assert r.status_code == 200 and r.json()["extra_storage_ids"] == []
    assert (await client.delete(f"/v1/storages/{extra}", headers=tenant.headers)).status_code == 204


async def test_a_partial_run_records_each_copy_and_restores_from_a_healthy_one(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    primary, offsite, cloud = await storages(client, tenant, "primary", "offsite", "cloud")
    job = await create_job(client, tenant, name="321", storage_id=primary, extra_storage_ids=[offsite, cloud])
    run = (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)).json()

    (payload,) = await outbox(sessionmaker, subjects.agent_command(agent.id, "job.execute"))
    command = m.BackupCommand.model_validate_json(payload)
    assert command.storage.storage_id == primary
    assert [s.storage_id for s in command.extra_storages] == [offsite, cloud]

    # the primary copy failed; a storage the run was never sent to is ignored
    result = copies_of(run["id"], (primary, False), (offsite, True), (cloud, True), ("intruder", True))
    assert await apply(sessionmaker, agent.id, completed(agent.id, run["id"], **result), "c1")
    body = (await client.get(f"/v1/backups/history/{run['id']}", headers=tenant.headers)).json()
    assert body["status"] == "partial"
    assert body["error"] == f"the copy in 'primary' failed: {primary} refused the upload"
    by_storage = {c["storage_id"]: c for c in body["copies"]}
    assert set(by_storage) == {primary, offsite, cloud}
    assert by_storage[primary]["status"] == "failed" and by_storage[offsite]["status"] == "completed"
    (event,) = await outbox(sessionmaker, "backup.partial")
    assert m.BackupEvent.model_validate_json(event).status == "partial"

    target = (
        await client.post(f"/v1/backups/history/{run['id']}/restore", json={}, headers=tenant.headers)
    ).json()
    assert target["storage_id"] == offsite  # the first healthy copy, since the primary one failed
    restore_cmd = m.RestoreCommand.model_validate_json(
        (await outbox(sessionmaker, subjects.agent_command(agent.id, "restore.execute")))[-1]
    )
    assert (
        restore_cmd.storage.storage_id == offsite and restore_cmd.storage_key == f"{offsite}/{run['id']}.rbk"
    )

    other = await client.post(
        f"/v1/backups/history/{run['id']}/restore", json={"storage_id": "elsewhere"}, headers=tenant.headers
    )
    assert other.status_code == 422 and other.json()["field"] == "storage_id"
    assert "has no copy in storage elsewhere" in other.json()["detail"]


async def test_retention_prunes_each_storage_and_a_run_is_gone_only_when_every_copy_is(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    near, far = await storages(client, tenant, "near", "far")
    job = await create_job(
        client, tenant, name="kept", storage_id=near, extra_storage_ids=[far], retention={"keep_last": 1}
    )
    runs = []
    for _ in range(2):
        run = (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)).json()
        report = completed(agent.id, run["id"], **copies_of(run["id"], (near, True), (far, True)))
        assert await apply(sessionmaker, agent.id, report, f"{run['id']}:c")
        runs.append(run["id"])
    prunes = [
        m.PruneCommand.model_validate_json(p)
        for p in await outbox(sessionmaker, subjects.agent_command(agent.id, "prune.execute"))
    ]
    assert sorted(p.storage.storage_id or "" for p in prunes) == sorted([near, far])
    assert all([i.run_id for i in p.items] == [runs[0]] for p in prunes)
    near_prune = next(p for p in prunes if p.storage.storage_id == near)
    assert near_prune.items[0].storage_key == f"{near}/{runs[0]}.rbk"

    done = m.PruneCompleted(
        agent_id=agent.id, occurred_at=utcnow(), prune_id=near_prune.prune_id, deleted=[runs[0]]
    )
    assert await apply(sessionmaker, agent.id, done, "p1")
    first = (await client.get(f"/v1/backups/history/{runs[0]}", headers=tenant.headers)).json()
    assert first["pruned_at"] is None  # still one copy, in "far"
    far_prune = next(p for p in prunes if p.storage.storage_id == far)
    restore = await client.post(f"/v1/backups/history/{runs[0]}/restore", json={}, headers=tenant.headers)
    assert (
        restore.status_code == 409 and "retention" in restore.json()["detail"]
    )  # far's copy is being deleted

    done = m.PruneCompleted(
        agent_id=agent.id, occurred_at=utcnow(), prune_id=far_prune.prune_id, deleted=[runs[0]]
    )
    assert await apply(sessionmaker, agent.id, done, "p2")
    first = (await client.get(f"/v1/backups/history/{runs[0]}", headers=tenant.headers)).json()
    assert first["pruned_at"] is not None
    assert all(c["pruned_at"] is not None for c in first["copies"])
    second = (await client.get(f"/v1/backups/history/{runs[1]}", headers=tenant.headers)).json()
    assert second["pruned_at"] is None and all(c["pruned_at"] is None for c in second["copies"])


async def test_copies_on_folders_of_two_different_agents_are_refused(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    bound = []
    for name, agent in (("here", await add_agent(tenant)), ("there", await add_agent(tenant))):
        body = {"name": name, "kind": "local", "agent_id": agent.id, "settings": {"path": f"/srv/{name}"}}
        bound.append((await client.post("/v1/storages", json=body, headers=tenant.headers)).json()["id"])
    database = await create_database(client, tenant)
    body = {
        "name": "split",
        "database_id": database["id"],
        "storage_id": bound[0],
        "extra_storage_ids": bound[1:],
    }
    r = await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)
    assert r.status_code == 422 and r.json()["field"] == "extra_storage_ids"
    assert "different agents" in r.json()["detail"]
