"""Customer-held backup keys and rotation, as the control plane sees them: the API knows key ids and
fingerprints (from heartbeats), never key material; commands for such keys name the key and go only
to an agent that holds it; rotation leaves old backups restorable."""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from rahatback_agent.keyring import fingerprint
from rahatback_agent.sealing import open_job_key
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.keys import custody
from rahatback_api.keys.models import CustomerKeyHolder
from rahatback_api.models import Agent, OutboxMessage
from rahatback_api.operations import service
from rahatback_api.scheduling import service as scheduling
from rahatback_api.security.secretbox import SecretBox
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant, pg_settings
from tests.api.test_operations import apply, completed

OFFLINE = timedelta(seconds=30)
KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))
S3_SETTINGS = {"bucket": "acme-backups", "access_key_id": "AKIAEXAMPLE0001", "secret_access_key": "s3-secret"}


async def add_agent(tenant: Tenant, name: str) -> tuple[Agent, X25519PrivateKey]:
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    async with session_scope(tenant.sessionmaker) as session:
        agent = Agent(
            org_id=tenant.org_id,
            name=name,
            x25519_public_key=base64.b64encode(public).decode(),
            last_seen_at=utcnow(),
        )
        session.add(agent)
    return agent, private


async def report_keys(tenant: Tenant, agent: Agent, keys: dict[str, bytes | str]) -> None:
    """One heartbeat of `agent` listing these keys (bytes: the real fingerprint; str: as given)."""
    held = [
        m.HeldKey(key_id=k, fingerprint=v if isinstance(v, str) else fingerprint(k, v))
        for k, v in keys.items()
    ]
    beat = m.Heartbeat(agent_id=agent.id, version="0.1.0", at=utcnow(), keys=held)
    async with session_scope(tenant.sessionmaker) as session:
        await service.record_heartbeat(session, beat, agent.id, OFFLINE)


async def stop_reporting(tenant: Tenant, agent: Agent, keys: dict[str, bytes | str]) -> None:
    """Heartbeats of `agent` listing only `keys` for longer than custody.HOLDER_GRACE (its other
    keys were last seen that long ago), then one more."""
    async with session_scope(tenant.sessionmaker) as session:
        rows = await session.execute(select(CustomerKeyHolder).where(CustomerKeyHolder.agent_id == agent.id))
        for row in rows.scalars():
            row.last_seen_at = utcnow() - custody.HOLDER_GRACE - timedelta(seconds=1)
    await report_keys(tenant, agent, keys)


async def bound_database(client: httpx.AsyncClient, tenant: Tenant, agent: Agent | None) -> str:
    r = await client.post(
        "/v1/databases",
        json={
            "name": f"shop-{uuid.uuid4().hex[:6]}",
            "engine": "postgresql",
            "settings": pg_settings(),
            "agent_id": agent.id if agent else None,
        },
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    ident: str = r.json()["id"]
    return ident


async def post_job(
    client: httpx.AsyncClient, tenant: Tenant, database_id: str, **fields: Any
) -> httpx.Response:
    # a bucket, not a local folder: any agent can read it, so the key decides where a restore runs
    storage = await client.post(
        "/v1/storages",
        json={"name": f"st-{uuid.uuid4().hex[:6]}", "kind": "s3", "settings": S3_SETTINGS},
        headers=tenant.headers,
    )
    assert storage.status_code == 201, storage.text
    body = {
        "name": f"job-{uuid.uuid4().hex[:6]}",
        "database_id": database_id,
        "storage_id": storage.json()["id"],
    }
    return await client.post("/v1/backups/jobs", json={**body, **fields}, headers=tenant.headers)


async def outbox(sessions: async_sessionmaker[AsyncSession], subject: str) -> list[OutboxMessage]:
    async with session_scope(sessions) as session:
        query = select(OutboxMessage).where(OutboxMessage.subject == subject)
        return list((await session.execute(query)).scalars())


async def run_to_completion(
    client: httpx.AsyncClient, tenant: Tenant, job_id: str, agent: Agent
) -> tuple[dict[str, Any], OutboxMessage]:
    """Run now, return the run and its command row, and let the agent report it completed."""
    r = await client.post(f"/v1/backups/jobs/{job_id}/run", headers=tenant.headers)
    assert r.status_code == 202, r.text
    run: dict[str, Any] = r.json()
    rows = await outbox(tenant.sessionmaker, subjects.agent_command(agent.id, "job.execute"))
    (row,) = [x for x in rows if m.BackupCommand.model_validate_json(x.payload).run_id == run["id"]]
    report = completed(agent.id, run["id"])
    await apply(
        tenant.sessionmaker, subjects.agent_report(agent.id, "backup", "completed"), report, run["id"]
    )
    return run, row


def field_error(response: httpx.Response) -> tuple[str | None, str]:
    assert response.status_code == 422, response.text
    body = response.json()
    return body.get("field"), str(body.get("detail"))


async def test_a_customer_key_job_needs_a_key_its_agent_reports(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    alpha, _ = await add_agent(tenant, "alpha")
    beta, _ = await add_agent(tenant, "beta")
    await report_keys(tenant, alpha, {"ck-alpha": KEY_A})
    on_alpha = await bound_database(client, tenant, alpha)
    on_beta = await bound_database(client, tenant, beta)
    unbound = await bound_database(client, tenant, None)

    missing = await post_job(client, tenant, on_alpha, key_custody="customer")
    assert field_error(missing)[0] == "customer_key_id"
    unknown = await post_job(client, tenant, on_alpha, key_custody="customer", customer_key_id="ck-nobody")
    assert field_error(unknown) == ("customer_key_id", field_error(unknown)[1])
    assert "no agent of this organization reports" in field_error(unknown)[1]
    elsewhere = await post_job(client, tenant, on_beta, key_custody="customer", customer_key_id="ck-alpha")
    assert field_error(elsewhere)[0] == "customer_key_id"
    assert "'beta' does not report holding backup key 'ck-alpha'" in field_error(elsewhere)[1]
    floating = await post_job(client, tenant, unbound, key_custody="customer", customer_key_id="ck-alpha")
    assert field_error(floating)[0] == "customer_key_id" and "bind" in field_error(floating)[1]
    mixed = await post_job(client, tenant, on_alpha, customer_key_id="ck-alpha")
    assert field_error(mixed)[0] == "customer_key_id"

    ok = await post_job(client, tenant, on_alpha, key_custody="customer", customer_key_id="ck-alpha")
    assert ok.status_code == 201, ok.text
    job = ok.json()
    assert (job["key_custody"], job["customer_key_id"], job["key_id"]) == ("customer", "ck-alpha", "ck-alpha")
    moved = await client.patch(
        f"/v1/backups/jobs/{job['id']}", json={"database_id": on_beta}, headers=tenant.headers
    )
    assert field_error(moved)[0] == "customer_key_id" and "'beta' does not report" in field_error(moved)[1]
    managed = await post_job(client, tenant, unbound)
    assert managed.status_code == 201
    assert managed.json()["key_custody"] == "managed" and managed.json()["customer_key_id"] is None


async def test_the_backup_command_names_the_key_and_carries_no_key_material(
    client: httpx.AsyncClient, tenant: Tenant, app: FastAPI, box: SecretBox
) -> None:
    alpha, _ = await add_agent(tenant, "alpha")
    await report_keys(tenant, alpha, {"ck-alpha": KEY_A})
    db = await bound_database(client, tenant, alpha)
    job = (
        await post_job(
            client, tenant, db, key_custody="customer", customer_key_id="ck-alpha", cron="0 3 * * *"
        )
    ).json()

    run, row = await run_to_completion(client, tenant, job["id"], alpha)
    command = m.BackupCommand.model_validate_json(row.payload)
    assert command.encryption == m.EncryptionSpec(
        enabled=True, key_id="ck-alpha", custody="customer", fingerprint=fingerprint("ck-alpha", KEY_A)
    )
    assert command.encryption.job_key is None
    for form in (KEY_A.hex(), base64.b64encode(KEY_A).decode()):
        assert form not in row.payload
    recorded = (await client.get(f"/v1/backups/history/{run['id']}", headers=tenant.headers)).json()
    assert (recorded["key_id"], recorded["key_custody"], recorded["status"]) == (
        "ck-alpha",
        "customer",
        "completed",
    )

    # the agent dropped the key from its keyring: the next run is refused before any command
    await stop_reporting(tenant, alpha, {})
    refused = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert refused.status_code == 409
    assert "agent 'alpha' does not hold backup key 'ck-alpha'" in refused.json()["detail"]
    assert "no agent reports holding it now" in refused.json()["detail"]

    # a scheduled fire records one failed run saying why, and leaves nothing queued behind
    fire = utcnow()
    request = m.BackupRequested(job_id=job["id"], org_id=tenant.org_id, fire_time=fire)
    async with session_scope(tenant.sessionmaker) as session:
        await scheduling.handle_backup_requested(
            session, box, app.state.bus, request, f"sched:{job['id']}:x", offline_after=OFFLINE
        )
    history = (await client.get(f"/v1/backups/history?job_id={job['id']}", headers=tenant.headers)).json()
    assert [(r["status"], r["trigger"]) for r in history["items"]] == [
        ("failed", "schedule"),
        ("completed", "manual"),
    ]
    assert "does not hold backup key 'ck-alpha'" in history["items"][0]["error"]
    assert len(await outbox(tenant.sessionmaker, subjects.agent_command(alpha.id, "job.execute"))) == 1


async def test_restore_goes_to_an_agent_holding_the_key_or_is_409(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    alpha, _ = await add_agent(tenant, "alpha")
    beta, _ = await add_agent(tenant, "beta")
    await report_keys(tenant, alpha, {"ck-alpha": KEY_A})
    await report_keys(tenant, beta, {"ck-alpha": KEY_B})  # another key under the same id
    db = await bound_database(client, tenant, alpha)
    job = (await post_job(client, tenant, db, key_custody="customer", customer_key_id="ck-alpha")).json()
    run, _ = await run_to_completion(client, tenant, job["id"], alpha)
    fp = fingerprint("ck-alpha", KEY_A)

    on_beta = await bound_database(client, tenant, beta)
    wrong = await client.post(
        f"/v1/backups/history/{run['id']}/restore", json={"database_id": on_beta}, headers=tenant.headers
    )
    assert wrong.status_code == 409, wrong.text
    assert wrong.json()["detail"] == (
        f"agent 'beta' does not hold backup key 'ck-alpha' (fingerprint {fp});"
        f" restore on an agent that holds it: 'alpha' ({alpha.id})"
    )
    verify = await client.post(
        f"/v1/backups/history/{run['id']}/verify", json={"level": "integrity"}, headers=tenant.headers
    )
    assert verify.status_code == 202, verify.text  # to the run's agent, which holds the key
    assert verify.json()["agent_id"] == alpha.id

    restored = await client.post(f"/v1/backups/history/{run['id']}/restore", headers=tenant.headers)
    assert restored.status_code == 202, restored.text
    assert restored.json()["agent_id"] == alpha.id
    (row,) = await outbox(tenant.sessionmaker, subjects.agent_command(alpha.id, "restore.execute"))
    command = m.RestoreCommand.model_validate_json(row.payload)
    assert command.encryption is not None and command.encryption.custody == "customer"
    assert (command.encryption.key_id, command.encryption.fingerprint, command.encryption.job_key) == (
        "ck-alpha",
        fp,
        None,
    )

    keys = (await client.get("/v1/keys", headers=tenant.headers)).json()
    (listed,) = [k for k in keys if k["key_id"] == "ck-alpha"]
    assert listed["custody"] == "customer" and listed["fingerprint"] == fp
    assert {(h["agent_name"], h["fingerprint_matches"]) for h in listed["holders"]} == {
        ("alpha", True),
        ("beta", False),
    }
    assert listed["used_by_job_ids"] == [job["id"]]
    assert "key_b64" not in str(keys)


async def test_rotation_keeps_old_runs_restorable_in_both_modes(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    alpha, alpha_key = await add_agent(tenant, "alpha")
    await report_keys(tenant, alpha, {"ck-one": KEY_A, "ck-two": KEY_B})
    db = await bound_database(client, tenant, alpha)

    # managed: a new generation; the first run's restore still gets generation 1, sealed to the agent
    managed = (await post_job(client, tenant, db)).json()
    first, _ = await run_to_completion(client, tenant, managed["id"], alpha)
    export_1 = await client.post(f"/v1/backups/keys/{managed['key_id']}/export", headers=tenant.headers)
    assert export_1.status_code == 200
    rotated = await client.post(f"/v1/backups/jobs/{managed['id']}/rotate-key", headers=tenant.headers)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["key_id"] == f"{managed['id']}:2" != managed["key_id"]
    second, second_row = await run_to_completion(client, tenant, managed["id"], alpha)
    assert m.BackupCommand.model_validate_json(second_row.payload).encryption.key_id == f"{managed['id']}:2"
    restore = await client.post(f"/v1/backups/history/{first['id']}/restore", headers=tenant.headers)
    assert restore.status_code == 202, restore.text
    (row,) = await outbox(tenant.sessionmaker, subjects.agent_command(alpha.id, "restore.execute"))
    command = m.RestoreCommand.model_validate_json(row.payload)
    assert command.encryption is not None and command.encryption.job_key is not None
    assert command.encryption.key_id == managed["key_id"]
    opened = open_job_key(alpha_key, command.encryption.job_key, m.seal_info("restore", restore.json()["id"]))
    assert base64.b64encode(opened).decode() == export_1.json()["key_b64"]
    history = (await client.get(f"/v1/backups/history/{second['id']}", headers=tenant.headers)).json()
    assert history["key_id"] == f"{managed['id']}:2"

    # customer: the body names the new key; a key the agent does not hold is refused
    job = (await post_job(client, tenant, db, key_custody="customer", customer_key_id="ck-one")).json()
    old, _ = await run_to_completion(client, tenant, job["id"], alpha)
    not_held = await client.post(
        f"/v1/backups/jobs/{job['id']}/rotate-key",
        json={"customer_key_id": "ck-three"},
        headers=tenant.headers,
    )
    assert field_error(not_held)[0] == "customer_key_id"
    to_two = await client.post(
        f"/v1/backups/jobs/{job['id']}/rotate-key", json={"customer_key_id": "ck-two"}, headers=tenant.headers
    )
    assert to_two.status_code == 200 and to_two.json()["customer_key_id"] == "ck-two"
    new, new_row = await run_to_completion(client, tenant, job["id"], alpha)
    assert m.BackupCommand.model_validate_json(new_row.payload).encryption.key_id == "ck-two"
    for run, key_id, key in ((old, "ck-one", KEY_A), (new, "ck-two", KEY_B)):
        db_restore = await bound_database(client, tenant, alpha)
        r = await client.post(
            f"/v1/backups/history/{run['id']}/restore",
            json={"database_id": db_restore},
            headers=tenant.headers,
        )
        assert r.status_code == 202, r.text
        rows = await outbox(tenant.sessionmaker, subjects.agent_command(alpha.id, "restore.execute"))
        (cmd,) = [
            c
            for c in (m.RestoreCommand.model_validate_json(x.payload) for x in rows)
            if c.restore_id == r.json()["id"]
        ]
        assert cmd.encryption is not None
        assert (cmd.encryption.key_id, cmd.encryption.fingerprint) == (key_id, fingerprint(key_id, key))

    # switching a customer job back to managed makes a fresh managed generation
    back = await client.post(
        f"/v1/backups/jobs/{job['id']}/rotate-key", json={"key_custody": "managed"}, headers=tenant.headers
    )
    assert back.status_code == 200 and back.json()["key_id"] == f"{job['id']}:1"
    assert back.json()["key_custody"] == "managed" and back.json()["customer_key_id"] is None


async def test_customer_keys_are_not_exported_by_the_api(client: httpx.AsyncClient, tenant: Tenant) -> None:
    alpha, _ = await add_agent(tenant, "alpha")
    await report_keys(tenant, alpha, {"ck-alpha": KEY_A})
    r = await client.post("/v1/backups/keys/ck-alpha/export", headers=tenant.headers)
    assert r.status_code == 409
    assert r.json()["detail"] == (
        "this key is held by the customer's agent; export it there with `rahatback-agent keys export`"
        " ck-alpha --out FILE"
    )
    assert (await client.post("/v1/backups/keys/ck-other/export", headers=tenant.headers)).status_code == 404


async def test_heartbeats_record_holders_and_drop_keys_no_longer_reported(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any
) -> None:
    alpha, _ = await add_agent(tenant, "alpha")
    await report_keys(tenant, alpha, {"ck-a": KEY_A, "ck-b": KEY_B, "bad:id": KEY_A, "ck-c": "not-hex"})
    listed = {k["key_id"]: k for k in (await client.get("/v1/keys", headers=tenant.headers)).json()}
    assert set(listed) == {"ck-a", "ck-b"}
    assert [h["agent_id"] for h in listed["ck-a"]["holders"]] == [alpha.id]

    async def holders() -> dict[str, list[str]]:
        listed = (await client.get("/v1/keys", headers=tenant.headers)).json()
        return {k["key_id"]: [h["agent_id"] for h in k["holders"]] for k in listed}

    # a heartbeat or two without a key (a vault call that failed, a keyring unreadable for a moment)
    # does not take it away from the agent
    await report_keys(tenant, alpha, {"ck-a": KEY_A})
    await report_keys(tenant, alpha, {})
    assert await holders() == {"ck-a": [alpha.id], "ck-b": [alpha.id]}

    # still not reported once it was last seen HOLDER_GRACE ago: the agent no longer holds it
    await stop_reporting(tenant, alpha, {"ck-a": KEY_A})
    assert await holders() == {"ck-a": [alpha.id], "ck-b": []}

    other = await make_tenant()
    assert (await client.get("/v1/keys", headers=other.headers)).json() == []
