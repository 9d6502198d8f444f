"""Helpers for the scheduler's integration tests: schedules put into the real KV bucket, requests read
back from the real CONTROL stream. The nats-server is session-wide, so every test uses its own job ids
and reads only its own messages."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, KeyValueConfig
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KeyValue
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import BackupRequested, ScheduleEntry, ScheduleKind, schedule_key
from rahatback_scheduler.metrics import Metrics
from rahatback_scheduler.scheduler import Scheduler
from rahatback_scheduler.settings import SchedulerSettings

from tests.servers import NatsServer


@dataclass(frozen=True)
class Seen:
    msg_id: str
    request: BackupRequested
    subject: str


async def bucket(js: JetStreamContext, spec: streams.KeyValueSpec) -> KeyValue:
    try:
        return await js.key_value(spec.bucket)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(bucket=spec.bucket, description=spec.description, history=spec.history)
        )


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    schedules: KeyValue
    state: KeyValue
    keys: list[str]

    async def put_schedule(
        self,
        job_id: str,
        cron: str,
        *,
        timezone: str = "UTC",
        enabled: bool = True,
        updated_at: datetime | None = None,
        kind: ScheduleKind = "backup",
        org_id: str = "org-test",
    ) -> ScheduleEntry:
        entry = ScheduleEntry(
            kind=kind,
            job_id=job_id,
            org_id=org_id,
            cron=cron,
            timezone=timezone,
            enabled=enabled,
            updated_at=updated_at or datetime.now(UTC),
        )
        key = schedule_key(kind, job_id)
        await self.schedules.put(key, entry.to_bytes())
        self.keys.append(key)
        return entry

    async def delete_schedule(self, job_id: str, kind: ScheduleKind = "backup") -> None:
        await self.schedules.delete(schedule_key(kind, job_id))

    async def requests(self, job_id: str, subject: str = subjects.BACKUP_REQUESTED) -> list[Seen]:
        """Every request for `job_id` stored in CONTROL so far, in stream order (a fresh ordered
        consumer reads the subject from the start)."""
        sub = await self.js.subscribe(
            subject, stream=streams.CONTROL.name, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        seen: list[Seen] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except nats.errors.TimeoutError:
                    break
                request = BackupRequested.from_bytes(msg.data)
                if request.job_id == job_id:
                    seen.append(Seen((msg.headers or {}).get("Nats-Msg-Id", ""), request, msg.subject))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return seen

    async def wait_for(
        self,
        job_id: str,
        done: Callable[[list[Seen]], bool],
        timeout: float = 30.0,  # noqa: ASYNC109 - a deadline for an outcome, not a speed assertion
        subject: str = subjects.BACKUP_REQUESTED,
    ) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while True:
            seen = await self.requests(job_id, subject)
            if done(seen) or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(0.5)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    # the CONTROL stream is the scheduler's to create if missing; the test only needs the buckets
    schedules = await bucket(js, streams.SCHEDULES)
    state = await bucket(js, streams.SCHEDULER_STATE)
    b = Bus(nc, js, schedules, state, [])
    yield b
    for key in b.keys:  # leave no schedule ticking for the tests that follow
        with contextlib.suppress(nats.errors.Error):
            await schedules.delete(key)
    await nc.drain()


@pytest.fixture
def job_id() -> str:
    return uuid.uuid4().hex


RunScheduler = Callable[..., contextlib.AbstractAsyncContextManager[Scheduler]]


@pytest.fixture
def run_scheduler(nats_server: NatsServer) -> RunScheduler:
    @contextlib.asynccontextmanager
    async def running(
        url: str | None = None, metrics: Metrics | None = None, **overrides: object
    ) -> AsyncIterator[Scheduler]:
        settings = SchedulerSettings(nats_url=url or nats_server.url, **overrides)  # type: ignore[arg-type]
        scheduler = Scheduler(settings, metrics or Metrics())
        stop = asyncio.Event()
        task = asyncio.create_task(scheduler.run(stop))
        try:
            # ready once the first snapshot of SCHEDULES is applied (streams and buckets exist by then)
            await asyncio.wait_for(scheduler.synced.wait(), 30)
            yield scheduler
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    return running


def fire_seconds(seen: list[Seen]) -> list[int]:
    return [s.request.fire_time.second for s in seen]
