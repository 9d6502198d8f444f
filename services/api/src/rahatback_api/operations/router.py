"""Endpoints that reach agents over NATS: enrollment, connection tests, run now, restore, live events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from rahatback_api.agents.nats_identity import NatsAuthorityDep
from rahatback_api.agents.service import consume_enrollment_token, get_usable_agent
from rahatback_api.auth.deps import CurrentPrincipal, OperatorPrincipal
from rahatback_api.backups.models import BackupRunPublic, RestoreRunPublic
from rahatback_api.backups.service import get_job, get_run, restore_public, run_public
from rahatback_api.columns import new_id
from rahatback_api.databases.engines import ENGINES, EngineName
from rahatback_api.databases.service import get_database
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep, SettingsDep
from rahatback_api.messaging.bus import Bus
from rahatback_api.messaging.live import LiveHub, sse_frame
from rahatback_api.models import Agent
from rahatback_api.storages.kinds import KINDS, StorageKindName
from rahatback_api.storages.service import get_storage
from rahatback_contracts import messages as m
from sqlalchemy import text

from . import service

router = APIRouter(tags=["operations"])

KEEPALIVE_SECONDS = 15.0


def _bus(request: Request) -> Bus:
    bus: Bus = request.app.state.bus
    return bus


BusDep = Annotated[Bus, Depends(_bus)]


def _offline_after(settings: Any) -> timedelta:
    return timedelta(seconds=settings.agent_offline_seconds)


# --------------------------------------------------------------------------------- enrollment


class EnrollRequest(BaseModel):
    token: str = Field(min_length=8, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    hostname: str = Field(default="", max_length=255)
    version: str = Field(default="", max_length=64)
    x25519_public_key: str = Field(min_length=40, max_length=64, description="base64 of the raw 32-byte key")
    engines: list[str] = Field(default_factory=list, max_length=20)
    storages: list[str] = Field(default_factory=list, max_length=20)
    # the public half of the NATS user nkey the agent generated (`U…`); needed in JWT mode
    nats_public_key: str | None = Field(default=None, max_length=56)


class EnrollResponse(BaseModel):
    agent_id: str
    org_id: str
    nats_url: str
    # the agent pins these and refuses any command or request not signed by that key
    command_signing_key_id: str
    command_signing_public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    # JWT mode only: the agent's NATS user JWT (renewed over `agent.<id>.credentials.renew`)
    nats_jwt: str | None = None
    nats_jwt_expires_at: datetime | None = None


@router.post("/v1/agents/enroll", status_code=status.HTTP_201_CREATED, response_model=EnrollResponse)
async def enroll(
    body: EnrollRequest, session: SessionDep, settings: SettingsDep, bus: BusDep, authority: NatsAuthorityDep
) -> EnrollResponse:
    """Exchange a one-time enrollment token for an agent identity (the agent keeps its private key)."""
    enrollment = await consume_enrollment_token(session, body.token)
    service.check_public_key(body.x25519_public_key)
    agent = Agent(
        id=new_id(),
        org_id=enrollment.org_id,
        name=body.name,
        hostname=body.hostname,
        version=body.version,
        x25519_public_key=body.x25519_public_key,
        engines=body.engines,
        storages=body.storages,
    )
    # JWT mode: a short-lived user JWT for the agent's own nkey (docs/nats-security.md)
    nats_credentials = await authority.enroll(session, agent, body.nats_public_key) if authority else None
    session.add(agent)
    await session.flush()
    # the agent may only bind to its consumer, never create one: make it before the agent asks
    await bus.ensure_agent_consumer(agent.id)
    signer = bus.command_signer
    assert signer is not None, "the lifespan gives the bus its command signer"
    return EnrollResponse(
        agent_id=agent.id,
        org_id=agent.org_id,
        nats_url=settings.nats_url,
        command_signing_key_id=signer.key_id,
        command_signing_public_key=signer.public_key_b64,
        nats_jwt=nats_credentials.jwt if nats_credentials else None,
        nats_jwt_expires_at=nats_credentials.expires_at if nats_credentials else None,
    )


# ---------------------------------------------------------------------------- connection test


class ConnectionTest(BaseModel):
    engine: EngineName
    agent_id: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


@router.post("/v1/databases/test-connection", response_model=m.DbTestReply)
async def test_unsaved_connection(
    body: ConnectionTest,
    principal: OperatorPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    bus: BusDep,
) -> m.DbTestReply:
    """Test credentials before saving them. A failed login is `ok: false` with the cause; 409 = no agent."""
    public, secrets = ENGINES[body.engine].split(body.settings)
    if body.agent_id is not None:
        await get_usable_agent(session, principal.org_id, body.agent_id, "agent_id")
    agent = await service.choose_agent(session, principal.org_id, body.agent_id, _offline_after(settings))

    def target(info: str) -> m.DatabaseTarget:
        return service.database_target(
            agent, info, engine=body.engine, name="(unsaved)", settings=public, secrets=secrets
        )

    return await service.test_connection(bus, agent, target)


@router.post("/v1/databases/{database_id}/test", response_model=m.DbTestReply)
async def test_saved_connection(
    database_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
    bus: BusDep,
) -> m.DbTestReply:
    db = await get_database(session, principal.org_id, database_id)
    agent = await service.choose_agent(session, principal.org_id, db.agent_id, _offline_after(settings))
    return await service.test_connection(
        bus, agent, lambda info: service.saved_database_target(box, db, agent, info)
    )


class StorageTest(BaseModel):
    kind: StorageKindName
    agent_id: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


@router.post("/v1/storages/test-connection", response_model=m.StorageTestReply)
async def test_unsaved_storage(
    body: StorageTest,
    principal: OperatorPrincipal,
    session: SessionDep,
    settings: SettingsDep,
    bus: BusDep,
) -> m.StorageTestReply:
    """Can the agent write, read back and delete in this storage? `ok: false` names what failed."""
    public, secrets = KINDS[body.kind].split(body.settings)
    if body.agent_id is not None:
        await get_usable_agent(session, principal.org_id, body.agent_id, "agent_id")
    agent = await service.choose_agent(session, principal.org_id, body.agent_id, _offline_after(settings))

    def target(info: str) -> m.StorageTarget:
        return service.storage_target(
            agent, info, kind=body.kind, name="(unsaved)", settings=public, secrets=secrets
        )

    return await service.test_storage(bus, agent, target)


@router.post("/v1/storages/{storage_id}/test", response_model=m.StorageTestReply)
async def test_saved_storage(
    storage_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
    bus: BusDep,
) -> m.StorageTestReply:
    storage = await get_storage(session, principal.org_id, storage_id)
    agent = await service.choose_agent(session, principal.org_id, storage.agent_id, _offline_after(settings))
    return await service.test_storage(
        bus, agent, lambda info: service.saved_storage_target(box, storage, agent, info)
    )


# -------------------------------------------------------------------------------- run, restore


@router.post(
    "/v1/backups/jobs/{job_id}/run", status_code=status.HTTP_202_ACCEPTED, response_model=BackupRunPublic
)
async def run_job_now(
    job_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
    bus: BusDep,
) -> BackupRunPublic:
    """Queue a backup now; 409 if this job is already queued or running."""
    job = await get_job(session, principal.org_id, job_id)
    runs = await service.start_backup(
        session, box, bus, job, trigger="manual", offline_after=_offline_after(settings)
    )
    return run_public(runs[0])  # a whole-server job's others share its batch_id


class RestoreRequest(BaseModel):
    database_id: str | None = Field(default=None, description="target database; default: the backed-up one")
    storage_id: str | None = Field(
        default=None,
        description="the copy to restore from; default: the primary storage's, else any other",
    )


@router.post(
    "/v1/backups/history/{run_id}/restore",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RestoreRunPublic,
)
async def restore_run(
    run_id: str,
    principal: OperatorPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
    body: RestoreRequest | None = None,
) -> RestoreRunPublic:
    """Restore a backup into its own database or another registered database of the same engine."""
    run = await get_run(session, principal.org_id, run_id)
    target_id = body.database_id if body and body.database_id else run.database_id
    target = await get_database(session, principal.org_id, target_id)
    restore = await service.start_restore(
        session,
        box,
        run,
        target,
        offline_after=_offline_after(settings),
        storage_id=body.storage_id if body else None,
    )
    return restore_public(restore)


# ------------------------------------------------------------------------------ live events


@router.get("/v1/events", response_class=StreamingResponse)
async def live_events(principal: CurrentPrincipal, request: Request) -> StreamingResponse:
    """Server-sent events of the caller's organization: `progress` and domain events (`backup.completed`…)."""
    hub: LiveHub = request.app.state.live_hub
    queue = hub.subscribe(principal.org_id)

    async def frames() -> AsyncIterator[bytes]:
        try:
            yield b": connected\n\n"
            while True:
                try:
                    name, payload = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                yield sse_frame(name, payload)
        finally:
            hub.unsubscribe(principal.org_id, queue)

    return StreamingResponse(
        frames(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ------------------------------------------------------------------------------------ health


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        async with request.app.state.sessionmaker() as session:
            await session.execute(text("select 1"))
        checks["database"] = "ok"
    except Exception as exc:  # readiness reports, never raises
        checks["database"] = f"error: {type(exc).__name__}"
    bus: Bus | None = getattr(request.app.state, "bus", None)
    checks["nats"] = "ok" if bus is not None and bus.connected else "error: not connected"
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready", "checks": checks}
    authority = getattr(request.app.state, "nats_authority", None)
    if authority is not None:  # JWT mode; informational: the API serves while the push is retried
        body["nats_revocations"] = authority.revocations_state
    return JSONResponse(body, status_code=200 if ready else 503)
