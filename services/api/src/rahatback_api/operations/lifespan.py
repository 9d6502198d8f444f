"""Wires the NATS side of the API into the app's lifespan: bus, outbox relay, live hub, workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog
from fastapi import FastAPI
from rahatback_api.db import session_scope
from rahatback_api.messaging.bus import Bus
from rahatback_api.messaging.live import LiveHub
from rahatback_api.messaging.outbox import OutboxRelay
from rahatback_api.models import Agent
from rahatback_api.scheduling.kv import reconcile_schedules
from rahatback_api.settings import Settings

from .workers import Workers

log = structlog.get_logger(__name__)


@asynccontextmanager
async def nats_lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    sessions = app.state.sessionmaker
    bus = await Bus.connect(settings.nats_url, replicas=settings.stream_replicas, creds=settings.nats_creds)
    bus.command_signer = app.state.command_signer  # RPC requests to agents are signed too

    async def org_of_agent(agent_id: str) -> str | None:
        async with sessions() as session:
            agent = await session.get(Agent, agent_id)
            return agent.org_id if agent is not None else None

    async with session_scope(sessions) as session:
        changed = await reconcile_schedules(session, bus)
    log.info("schedules.reconciled", changed=changed)
    relay = OutboxRelay(sessions, bus)
    hub = LiveHub(org_of_agent)
    await hub.start(bus)
    workers = Workers(
        sessions,
        bus,
        relay,
        hub,
        box=app.state.secretbox,
        stall_after=timedelta(seconds=settings.agent_stall_seconds),
        offline_after=timedelta(seconds=settings.agent_offline_seconds),
        overdue_grace=timedelta(seconds=settings.overdue_grace_seconds),
    )
    app.state.bus = bus
    app.state.live_hub = hub
    app.state.outbox_wakeup = relay.wakeup
    await workers.start()
    try:
        yield
    finally:
        await workers.stop()
        await bus.close()
