"""The API's side of signed commands (docs/security.md "Signed commands").

Against the real app and the real nats-server: enrollment hands out the command-signing public
key; every command the API publishes to an agent (backup, restore, verify, prune) and every RPC
request carries a signature that verifies with that key over its subject and body; a refusal
report fails the queued run with the agent's reason (only for a command the API really issued).
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from fastapi import FastAPI
from nats.aio.msg import Msg
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.main import create_app
from rahatback_api.main import main as api_main
from rahatback_api.messaging.bus import Bus
from rahatback_api.models import Agent, OutboxMessage
from rahatback_api.operations import reports
from rahatback_api.settings import ConfigurationError, Settings
from rahatback_contracts import messages as m
from rahatback_contracts import signing, streams, subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from tests.api.conftest import Tenant, create_database, create_job, create_storage, pg_settings
from tests.servers import NatsServer


def x25519_public() -> str:
    return base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()


async def enroll(client: httpx.AsyncClient, tenant: Tenant) -> tuple[str, dict[str, Ed25519PublicKey]]:
    """Enroll an agent over HTTP as `rahatback-agent enroll` does and mark it online; returns its id
    and the key it would pin."""
    r = await client.post("/v1/agents/enrollment-tokens", json={"ttl_minutes": 30}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    r = await client.post(
        "/v1/agents/enroll",
        json={
            "token": r.json()["token"],
            "name": f"a-{uuid.uuid4().hex[:6]}",
            "x25519_public_key": x25519_public(),
        },
    )
    assert r.status_code == 201, r.text
    body = r.json()
    pinned = {body["command_signing_key_id"]: signing.decode_public_key(body["command_signing_public_key"])}
    async with session_scope(tenant.sessionmaker) as session:
        agent = await session.get(Agent, body["agent_id"])
        assert agent is not None
        agent.last_seen_at = utcnow()
    return body["agent_id"], pinned


async def apply(
    sessions: async_sessionmaker[AsyncSession], subject: str, report: m.Report, msg_id: str
) -> bool:
    agent_id, _, parsed = reports.parse_report(subject, report.to_bytes())
    async with session_scope(sessions) as session:
        return await reports.apply_report(session, agent_id, msg_id, parsed)


def completed(agent_id: str, run_id: str, storage_id: str) -> m.BackupCompleted:
    now = utcnow()
    key = f"shop/{run_id}.sql.zst.rbk"
    return m.BackupCompleted(
        agent_id=agent_id,
        occurred_at=now,
        run_id=run_id,
        started_at=now - timedelta(seconds=2),
        finished_at=now,
        storage_key=key,
        manifest_key=f"{key}.manifest.json",
        dump_size=100,
        artifact_size=50,
        dump_sha256="a" * 64,
        artifact_sha256="b" * 64,
        dump_format="postgresql-plain-sql",
        agent_version="0.1.0",
        copies=[
            m.CopyResult(storage_id=storage_id, ok=True, storage_key=key, manifest_key=f"{key}.manifest.json")
        ],
    )


async def fetch_commands(bus: Bus, agent_id: str, count: int, within: float = 30.0) -> list[Msg]:
    """What the agent would receive: bound to its own durable consumer, exactly as the agent binds."""
    spec = streams.agent_commands_consumer(agent_id)
    psub = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    got: list[Msg] = []
    deadline = asyncio.get_running_loop().time() + within
    try:
        while len(got) < count and asyncio.get_running_loop().time() < deadline:
            try:
                batch = await psub.fetch(count - len(got), timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in batch:
                await msg.ack()
            got.extend(batch)
    finally:
        await psub.unsubscribe()
    assert len(got) == count, [msg.subject for msg in got]
    return got


async def test_every_command_to_an_agent_is_signed_with_the_key_given_at_enrollment(
    app: FastAPI, client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent_id, pinned = await enroll(client, tenant)
    db = await create_database(client, tenant)
    storage = await create_storage(client, tenant)
    job = await create_job(
        client, tenant, database_id=db["id"], storage_id=storage["id"], retention={"keep_last": 1}
    )
    runs = []
    for n in range(2):  # the second success expires the first: a prune command
        r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
        assert r.status_code == 202, r.text
        runs.append(r.json()["id"])
        report = completed(agent_id, runs[-1], str(storage["id"]))
        assert await apply(
            sessionmaker, subjects.agent_report(agent_id, "backup", "completed"), report, f"c{n}"
        )
    r = await client.post(f"/v1/backups/history/{runs[1]}/restore", json={}, headers=tenant.headers)
    assert r.status_code == 202, r.text
    r = await client.post(f"/v1/backups/history/{runs[1]}/verify", json={}, headers=tenant.headers)
    assert r.status_code == 202, r.text

    msgs = await fetch_commands(app.state.bus, agent_id, 5)
    kinds = sorted(msg.subject.split(".", 2)[2] for msg in msgs)
    assert kinds == ["job.execute", "job.execute", "prune.execute", "restore.execute", "verify.execute"]
    for msg in msgs:
        header = (msg.headers or {}).get("Rahatback-Signature")
        assert signing.verify(pinned, msg.subject, msg.data, header) in pinned
        # bound to its subject: the same bytes on another command subject do not verify
        elsewhere = subjects.agent_command(agent_id, "job.cancel")
        with pytest.raises(signing.SignatureError):
            signing.verify(pinned, elsewhere, msg.data, header)
        body = json.loads(msg.data)
        assert body["expires_at"] > body["issued_at"]


async def test_rpc_requests_are_signed_and_carry_an_expiry(
    app: FastAPI, client: httpx.AsyncClient, tenant: Tenant, nats_server: NatsServer
) -> None:
    agent_id, pinned = await enroll(client, tenant)
    seen: list[Msg] = []
    nc = await nats.connect(nats_server.url)
    try:

        async def answer(msg: Msg) -> None:
            seen.append(msg)
            await msg.respond(m.DbTestReply(ok=True, server_version="15").to_bytes())

        for rpc in ("db.test", "storage.test"):
            await nc.subscribe(subjects.agent_rpc(agent_id, rpc), cb=answer)  # type: ignore[arg-type]
        await nc.flush()
        r = await client.post(
            "/v1/databases/test-connection",
            json={"engine": "postgresql", "agent_id": agent_id, "settings": pg_settings(password="pw-1")},
            headers=tenant.headers,
        )
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        r = await client.post(
            "/v1/storages/test-connection",
            json={"kind": "local", "agent_id": agent_id, "settings": {"path": "/srv/x"}},
            headers=tenant.headers,
        )
        assert r.status_code == 200, r.text
    finally:
        await nc.drain()
    assert [msg.subject for msg in seen] == [
        subjects.agent_rpc(agent_id, "db.test"),
        subjects.agent_rpc(agent_id, "storage.test"),
    ]
    for msg in seen:
        assert signing.verify(pinned, msg.subject, msg.data, (msg.headers or {}).get("Rahatback-Signature"))
        request = m.RpcRequest.model_validate_json(msg.data)
        assert request.issued_at is not None and request.expires_at is not None
        # long enough for the agent to answer, short enough that a captured request soon dies
        assert timedelta(seconds=20) < request.expires_at - request.issued_at <= timedelta(minutes=2)


async def test_a_refusal_report_fails_the_queued_run_with_the_agents_reason(
    app: FastAPI, client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent_id, _ = await enroll(client, tenant)
    job = await create_job(client, tenant)
    r = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    run_id = r.json()["id"]
    async with session_scope(sessionmaker) as session:
        row = (
            await session.execute(select(OutboxMessage).where(OutboxMessage.msg_id == f"{run_id}:command"))
        ).scalar_one()
    command_id = json.loads(row.payload)["command_id"]
    refused_on = subjects.agent_command_refused(agent_id)

    def refusal(**fields: Any) -> m.CommandRefused:
        values: dict[str, Any] = {
            "agent_id": agent_id,
            "occurred_at": utcnow(),
            "subject": subjects.agent_command(agent_id, "job.execute"),
            "reason": "unknown_key",
            "detail": "signed with key id 'c1', which this agent does not trust (pinned: c0)",
            "command_id": command_id,
            "run_kind": "backup",
            "run_id": run_id,
        }
        return m.CommandRefused(**{**values, **fields})

    # a refused forgery naming this run, or a refused replay of its command, leaves the run alone
    assert not await apply(sessionmaker, refused_on, refusal(command_id=uuid.uuid4().hex), "f1")
    assert not await apply(sessionmaker, refused_on, refusal(reason="replayed"), "f2")
    assert (await client.get(f"/v1/backups/history/{run_id}", headers=tenant.headers)).json()[
        "status"
    ] == "queued"

    # the agent's real refusal, through AGENT_REPORTS and the API's own consumer
    bus: Bus = app.state.bus
    await bus.publish_durable(refused_on, refusal().to_bytes(), f"refused:{uuid.uuid4().hex}")
    for _ in range(200):
        run = (await client.get(f"/v1/backups/history/{run_id}", headers=tenant.headers)).json()
        if run["status"] != "queued":
            break
        await asyncio.sleep(0.1)
    assert run["status"] == "failed"
    assert run["error"] == (
        "the agent refused the command: signed with key id 'c1', which this agent does not trust (pinned: c0)"
    )
    job_now = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert job_now["last_run_status"] == "failed"
    async with session_scope(sessionmaker) as session:
        events = (
            (await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.failed")))
            .scalars()
            .all()
        )
    assert [json.loads(e.payload)["run_id"] for e in events] == [run_id]  # people are told why
    scraped = (await client.get("/metrics")).text
    assert 'rahatback_agent_command_refusals_total{reason="unknown_key"}' in scraped


# ------------------------------------------------------------------------------ the key setting


def test_refuses_to_start_without_a_command_signing_key_outside_dev(tmp_path: Path) -> None:
    settings = Settings(
        database_url="sqlite+aiosqlite:///x.db",
        master_key=base64.b64encode(b"k" * 32).decode(),
        dev_mode=False,
        var_dir=tmp_path,
    )
    with pytest.raises(ConfigurationError, match="RAHATBACK_COMMAND_SIGNING_KEY is not set"):
        create_app(settings)
    assert not (tmp_path / "command-signing.key").exists()


@pytest.mark.parametrize("bad", ["not base64!!", base64.b64encode(b"short").decode()])
def test_refuses_a_malformed_command_signing_key_without_echoing_it(tmp_path: Path, bad: str) -> None:
    settings = Settings(command_signing_key=bad, dev_mode=True, var_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="RAHATBACK_COMMAND_SIGNING_KEY") as caught:
        settings.command_signer()
    assert bad not in str(caught.value)


def test_refuses_a_key_id_the_signature_header_cannot_carry(tmp_path: Path) -> None:
    settings = Settings(command_signing_key_id="a:b", dev_mode=True, var_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="key id"):
        settings.command_signer()


def test_dev_mode_generates_the_key_once_and_keeps_it_private(tmp_path: Path) -> None:
    settings = Settings(dev_mode=True, var_dir=tmp_path / "var")
    first = settings.command_signer()
    path = tmp_path / "var" / "command-signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # the next start signs with the same key, so an enrolled dev agent keeps obeying
    assert (
        Settings(dev_mode=True, var_dir=tmp_path / "var").command_signer().public_key_b64
        == first.public_key_b64
    )
    assert path.read_text().strip() not in repr(first)


def test_the_keygen_command_prints_a_usable_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    api_main(["command-signing-keygen"])
    out, err = capsys.readouterr()
    key = out.strip()
    signer = Settings(command_signing_key=key, var_dir=tmp_path).command_signer()
    assert signer.public_key_b64 in err  # the public half, for the record
    assert key not in err


async def test_a_refused_prune_fails_that_retention_pass_and_its_files_wait_for_the_next(
    app: FastAPI, client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent_id, _ = await enroll(client, tenant)
    storage = await create_storage(client, tenant)
    job = await create_job(client, tenant, storage_id=storage["id"], retention={"keep_last": 1})
    runs = []
    for n in range(2):
        run_id = (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)).json()["id"]
        report = completed(agent_id, run_id, str(storage["id"]))
        assert await apply(
            sessionmaker, subjects.agent_report(agent_id, "backup", "completed"), report, f"c{n}"
        )
        runs.append(run_id)
    async with session_scope(sessionmaker) as session:
        row = (
            await session.execute(
                select(OutboxMessage).where(
                    OutboxMessage.subject == subjects.agent_command(agent_id, "prune.execute")
                )
            )
        ).scalar_one()
    prune = m.PruneCommand.model_validate_json(row.payload)
    refused = m.CommandRefused(
        agent_id=agent_id,
        occurred_at=utcnow(),
        subject=row.subject,
        reason="expired",
        detail="expired at 2026-01-01T00:00:00+00:00 (3 h ago)",
        command_id=prune.command_id,
        run_kind="prune",
        run_id=prune.prune_id,
    )
    assert await apply(sessionmaker, subjects.agent_command_refused(agent_id), refused, "r1")
    first = (await client.get(f"/v1/backups/history/{runs[0]}", headers=tenant.headers)).json()
    assert first["pruned_at"] is None
    assert (
        first["prune_error"]
        == "the agent refused the command: expired at 2026-01-01T00:00:00+00:00 (3 h ago)"
    )
    job_now = (await client.get(f"/v1/backups/jobs/{job['id']}", headers=tenant.headers)).json()
    assert "the agent refused the command" in job_now["last_prune_error"]
