"""Live events for browsers (SSE): progress and committed domain events, per organization.

Lossy on purpose: a slow client gets its oldest events dropped rather than holding memory; history
stays available through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.msg import Msg
from rahatback_contracts import messages as m
from rahatback_contracts import streams

from .bus import Bus

log = structlog.get_logger(__name__)

CLIENT_QUEUE = 256

OrgLookup = Callable[[str], Awaitable[str | None]]


class LiveHub:
    def __init__(self, org_of_agent: OrgLookup) -> None:
        self._org_of_agent = org_of_agent
        self._agent_org: dict[str, str] = {}
        self._clients: dict[str, set[asyncio.Queue[tuple[str, dict[str, Any]]]]] = defaultdict(set)

    async def start(self, bus: Bus) -> None:
        # Core subscriptions see JetStream-published messages too; `backup.requested` lives on
        # another stream and is not an event, so subscribe to exactly the event types.
        for event_type in streams.EVENT_TYPES:
            await bus.nc.subscribe(event_type, cb=self._on_event)

    def subscribe(self, org_id: str) -> asyncio.Queue[tuple[str, dict[str, Any]]]:
        queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue(CLIENT_QUEUE)
        self._clients[org_id].add(queue)
        return queue

    def unsubscribe(self, org_id: str, queue: asyncio.Queue[tuple[str, dict[str, Any]]]) -> None:
        self._clients[org_id].discard(queue)

    def _deliver(self, org_id: str, name: str, payload: dict[str, Any]) -> None:
        for queue in self._clients.get(org_id, ()):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((name, payload))

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = m.DomainEvent.model_validate_json(msg.data)
        except ValueError:
            log.warning("live.malformed_event", subject=msg.subject)
            return
        self._deliver(event.org_id, event.type, json.loads(msg.data))

    async def publish_progress(self, agent_id: str, progress: m.Progress) -> str | None:
        """Forward progress to the agent's organization; returns that org id (None if unknown)."""
        org_id = self._agent_org.get(agent_id)
        if org_id is None:
            org_id = await self._org_of_agent(agent_id)
            if org_id is None:
                return None
            self._agent_org[agent_id] = org_id
        self._deliver(org_id, "progress", progress.model_dump(mode="json"))
        return org_id


def sse_frame(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
