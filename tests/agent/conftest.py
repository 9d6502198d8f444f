"""Helpers for the agent supervisor tests: the test plays the API's role with nats-py directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig
from nats.js.errors import BadRequestError, NotFoundError
from rahatback_agent.identity import AgentIdentity, generate_private_key, private_key_b64, save_identity
from rahatback_agent.settings import AgentSettings
from rahatback_agent.supervisor import Supervisor
from rahatback_contracts import signing, streams, subjects
from rahatback_contracts.messages import Message

from tests.servers import NatsServer


async def ensure_streams(js: JetStreamContext) -> None:
    """Create the four streams as the API does (tolerating ones another test already made)."""
    for spec in streams.ALL_STREAMS:
        config = StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            retention=RetentionPolicy.WORK_QUEUE if spec.retention == "workqueue" else RetentionPolicy.LIMITS,
            max_age=float(spec.max_age_seconds),
            duplicate_window=float(spec.duplicate_window_seconds),
            description=spec.description,
        )
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.stream_info(spec.name)  # exists already: fine, as long as it is there


async def create_agent_consumer(js: JetStreamContext, agent_id: str) -> None:
    spec = streams.agent_commands_consumer(agent_id)
    await js.add_consumer(
        spec.stream,
        ConsumerConfig(
            durable_name=spec.durable,
            filter_subjects=list(spec.filter_subjects),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=float(spec.ack_wait_seconds),
            max_deliver=spec.max_deliver,
        ),
    )


# the API's command-signing key in these tests: every identity pins its public half, and the
# harness signs what it sends like the API does (docs/security.md "Signed commands")
API_SIGNING_KEY = Ed25519PrivateKey.generate()
API_SIGNING_KEY_ID = "test-api-1"


def signed(subject: str, body: bytes) -> dict[str, str]:
    return signing.signature_headers(API_SIGNING_KEY, API_SIGNING_KEY_ID, subject, body)


def make_identity(nats_url: str) -> AgentIdentity:
    return AgentIdentity(
        agent_id=uuid.uuid4().hex,
        org_id=uuid.uuid4().hex,
        nats_url=nats_url,
        api_url="http://127.0.0.1:9",
        name="test-agent",
        x25519_private_key_b64=private_key_b64(generate_private_key()),
        command_key_id=API_SIGNING_KEY_ID,
        command_public_key_b64=signing.encode_public_key(API_SIGNING_KEY.public_key()),
    )


@dataclass
class Wiretap:
    """Everything published on `>` while a test runs, to prove no secret ever crosses NATS."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def contains(self, needle: str) -> list[str]:
        raw = needle.encode()
        return [subject for subject, data in self.messages if raw in data]


class Reports:
    """Reads this agent's reports back out of the AGENT_REPORTS stream (what the API consumes), by
    scanning stored messages in sequence order: exactly what JetStream holds, duplicates included."""

    def __init__(self, js: JetStreamContext, agent_id: str) -> None:
        self.js = js
        self.agent_id = agent_id
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._next_seq: int | None = None

    async def start(self) -> None:
        info = await self.js.stream_info(streams.AGENT_REPORTS.name)
        self._next_seq = info.state.last_seq + 1

    async def close(self) -> None:
        self._next_seq = None

    async def _poll(self) -> None:
        assert self._next_seq is not None, "Reports.start() first"
        info = await self.js.stream_info(streams.AGENT_REPORTS.name)
        prefix = f"agent.{self.agent_id}.report."
        while self._next_seq <= info.state.last_seq:
            try:
                msg = await self.js.get_msg(streams.AGENT_REPORTS.name, self._next_seq)
            except NotFoundError:
                msg = None
            self._next_seq += 1
            if msg is not None and msg.subject and msg.subject.startswith(prefix) and msg.data:
                self.received.append((msg.subject, json.loads(msg.data)))

    async def wait_for(
        self, predicate: Callable[[str, dict[str, Any]], bool], within: float = 60.0
    ) -> tuple[str, dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            await self._poll()
            for subject, body in self.received:
                if predicate(subject, body):
                    return subject, body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no matching report within {within} s; got {self.received!r}")
            await asyncio.sleep(0.1)

    async def outcome(
        self, kind: str, outcome: str, ident_field: str, ident: str, within: float = 60.0
    ) -> dict[str, Any]:
        subject = subjects.agent_report(self.agent_id, kind, outcome)  # type: ignore[arg-type]
        _, body = await self.wait_for(lambda s, b: s == subject and b.get(ident_field) == ident, within)
        return body


@dataclass
class AgentHarness:
    identity: AgentIdentity
    nc: NATS
    js: JetStreamContext
    reports: Reports
    wiretap: Wiretap
    storage_dir: Path
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shut_down(self) -> None:
        """What SIGTERM does in the real process: set the stop event and wait for the drain."""
        self.stop.set()
        await asyncio.wait_for(self.task, 60)

    @property
    def agent_id(self) -> str:
        return self.identity.agent_id

    @property
    def public_key_b64(self) -> str:
        return self.identity.public_key_b64

    async def send_command(self, kind: subjects.CommandKind, command: Message) -> None:
        """Publish a command signed like the API signs it."""
        subject, body = subjects.agent_command(self.agent_id, kind), command.to_bytes()
        await self.js.publish(subject, body, headers=signed(subject, body))

    async def request(self, name: str, request: Message, within: float = 30.0) -> dict[str, Any]:
        """An RPC signed like the API signs it, with an expiry if the request has none."""
        if getattr(request, "expires_at", "absent") is None:
            issued = datetime.now(UTC)
            request = request.model_copy(
                update={"issued_at": issued, "expires_at": issued + timedelta(seconds=within + 30)}
            )
        subject, body = subjects.agent_rpc(self.agent_id, name), request.to_bytes()  # type: ignore[arg-type]
        reply = await self.nc.request(subject, body, timeout=within, headers=signed(subject, body))
        result: dict[str, Any] = json.loads(reply.data)
        return result


@pytest.fixture
async def api_nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_server.url, name="test-api")
    await ensure_streams(nc.jetstream())
    yield nc
    await nc.drain()


@contextlib.asynccontextmanager
async def running_agent(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path, *, reports_ready: bool = True, **settings: Any
) -> AsyncIterator[AgentHarness]:
    js = api_nc.jetstream()
    identity = make_identity(nats_server.url)
    await create_agent_consumer(js, identity.agent_id)
    wiretap = Wiretap()

    async def tap(msg: Msg) -> None:
        wiretap.messages.append((msg.subject, bytes(msg.data)))

    tap_sub = await api_nc.subscribe(">", cb=tap)
    reports = Reports(js, identity.agent_id)
    if reports_ready:  # otherwise the test creates AGENT_REPORTS later and starts reading then
        await reports.start()
    storage_dir = tmp_path / "storage"
    storage_dir.mkdir()
    agent_settings = AgentSettings(
        config=tmp_path / "agent.json",
        heartbeat_seconds=settings.pop("heartbeat_seconds", 0.5),
        fetch_timeout_seconds=0.5,
        progress_interval_seconds=0.2,
        drain_seconds=settings.pop("drain_seconds", 10.0),
        **settings,
    )
    save_identity(identity, agent_settings.config)
    online = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        online.set()

    beat_sub = await api_nc.subscribe(subjects.agent_heartbeat(identity.agent_id), cb=on_beat)
    stop = asyncio.Event()
    supervisor = Supervisor(identity, agent_settings)
    task = asyncio.create_task(supervisor.run(stop))
    try:
        # like the API, talk to the agent only once it has said it is online
        await asyncio.wait_for(online.wait(), 20)
        await beat_sub.unsubscribe()
        yield AgentHarness(identity, api_nc, js, reports, wiretap, storage_dir, stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)  # returns at once if a test already shut it down
        await tap_sub.unsubscribe()
        await reports.close()
