"""Watches KV SCHEDULES and publishes `backup.requested` / `verify.requested` on time.

One APScheduler job per schedule key, a DateTrigger at the schedule's next fire instant (computed by
`cron.CronSchedule`, which applies the DST rule); when it fires, the next one is armed and the request
is published in its own task. Every fire carries `Nats-Msg-Id = scheduled_msg_id(kind, job, fire time)`,
so any number of replicas produce one message per fire, and a timed-out publish is retried with the
same id. Whenever an entry is (re)loaded, and whenever a publish could not get through, the misfire
rule (`catchup.plan_catch_up`) settles what fell due in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import nats
import nats.errors
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler  # type: ignore[import-untyped]  # APScheduler 3 ships no type hints
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped]  # same
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import ValidationError
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import BackupRequested, ScheduleEntry, schedule_key, scheduled_msg_id
from rahatback_jetstream import create_stream_if_missing, key_value

from .catchup import Due, plan_catch_up
from .cron import CronError, CronSchedule
from .metrics import Metrics
from .settings import SchedulerSettings

log = structlog.get_logger(__name__)

# what a JetStream/KV call can fail with while NATS is down, restarting or refusing
NATS_FAILURES: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)
_MAX_RETRY_DELAY = 30.0
_CONCURRENT_CATCH_UPS = 8


class PublishFailed(Exception):
    """A scheduled request could not be stored in CONTROL (after retries with the same Msg-Id)."""


_RETRYABLE: tuple[type[BaseException], ...] = (PublishFailed, *NATS_FAILURES)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Loaded:
    entry: ScheduleEntry
    schedule: CronSchedule
    generation: int  # bumps on every (re)load: work of an older load is dropped


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _iso(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat()


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._clock = clock
        self._grace = timedelta(seconds=settings.misfire_grace_seconds)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._state: KeyValue | None = None
        self._aps = AsyncIOScheduler(timezone=UTC)
        self._loaded: dict[str, _Loaded] = {}
        self._generations = itertools.count(1)
        self._catch_ups: dict[str, tuple[asyncio.Task[None], datetime]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rewatch = asyncio.Event()
        self._stop = asyncio.Event()
        self._catch_up_slots = asyncio.Semaphore(_CONCURRENT_CATCH_UPS)
        # set once the first snapshot of SCHEDULES has been applied (streams and buckets exist)
        self.synced = asyncio.Event()

    # --- life cycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop` is set: keep a watch on SCHEDULES (re-watching after every reconnect) and fire."""
        self._stop = stop
        if not await self._connect():
            return
        self._aps.start()
        try:
            await self._watch_forever()
        finally:
            await self._shutdown()

    async def _connect(self) -> bool:
        async def on_error(exc: Exception) -> None:
            log.warning("nats.error", error=_describe(exc))

        async def on_disconnect() -> None:
            log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            log.info("nats.reconnected")
            self._rewatch.set()  # the server may have restarted: ensure buckets, reload, catch up

        # with max_reconnect_attempts=-1 nats-py retries the FIRST connection forever too: race it
        connecting = asyncio.ensure_future(
            nats.connect(
                servers=[self._settings.nats_url],
                name="rahatback-scheduler",
                # JWT mode: its own user, replies in its own inbox (docs/nats-security.md)
                user_credentials=str(self._settings.nats_creds) if self._settings.nats_creds else None,
                inbox_prefix="_INBOX.scheduler" if self._settings.nats_creds else "_INBOX",
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
            )
        )
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, *NATS_FAILURES):
                await connecting
            return False
        self._nc = connecting.result()
        self._js = self._nc.jetstream()
        log.info("nats.connected", url=self._settings.nats_url)
        return True

    async def _shutdown(self) -> None:
        if self._aps.running:
            self._aps.shutdown(wait=False)
        for task, _until in self._catch_ups.values():
            task.cancel()
        pending = {t for t in self._tasks if not t.done()}
        if pending:  # fires being published: let them finish, within bounds
            _done, late = await asyncio.wait(pending, timeout=self._settings.drain_seconds)
            for task in late:
                task.cancel()
            if late:
                log.warning("drain.abandoned", publishes=len(late))
        catch_ups = [task for task, _until in self._catch_ups.values()]
        await asyncio.gather(*catch_ups, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(*NATS_FAILURES):
                await asyncio.wait_for(self._nc.drain(), 10)
        self._metrics.loaded.set(0)
        log.info("scheduler.stopped")

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- streams and buckets (the API creates them too; whoever comes first wins) ---------------

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("not connected to NATS")
        return self._js

    async def _ensure_control_stream(self) -> None:
        await create_stream_if_missing(self.js, streams.CONTROL, self._settings.stream_replicas)

    async def _ensure_bucket(self, spec: streams.KeyValueSpec) -> KeyValue:
        return await key_value(self.js, spec, self._settings.stream_replicas)

    # --- watching SCHEDULES --------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            self._rewatch.clear()
            try:
                await self._ensure_control_stream()
                schedules = await self._ensure_bucket(streams.SCHEDULES)
                self._state = await self._ensure_bucket(streams.SCHEDULER_STATE)
                await self._watch(schedules)
                delay = 1.0
            except NATS_FAILURES as exc:
                log.warning("watch.failed", error=_describe(exc), retry_in=delay)
                await self._pause(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)

    async def _watch(self, schedules: KeyValue) -> None:
        """Apply every entry of the bucket, then every change, until stopped or asked to re-watch.

        The watch starts with the current value of every key: a key that is gone from that snapshot
        was deleted while we were not looking.
        """
        watcher = await schedules.watchall()
        log.info("watch.started", bucket=streams.SCHEDULES.bucket)
        seen: set[str] = set()
        initial = True
        try:
            while not (self._stop.is_set() or self._rewatch.is_set()):
                try:
                    update = await watcher.updates(timeout=1.0)  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
                except nats.errors.TimeoutError:
                    continue
                if update is None:  # end of the snapshot
                    if initial:
                        for key in set(self._loaded) - seen:
                            self._apply(key, None)
                        initial = False
                        self.synced.set()
                        log.info("watch.synced", schedules=len(self._loaded))
                    continue
                if initial:
                    seen.add(update.key)
                if update.operation in (KV_DEL, KV_PURGE):
                    self._apply(update.key, None)
                    self._spawn(self._forget(update.key))
                else:
                    self._apply(update.key, self._read_entry(update.key, update.value or b""))
        finally:
            with contextlib.suppress(*NATS_FAILURES):
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated

    def _read_entry(self, key: str, value: bytes) -> ScheduleEntry | None:
        try:
            entry: ScheduleEntry = ScheduleEntry.from_bytes(value)
        except ValidationError as exc:
            self._metrics.invalid.inc()
            log.error("schedule.unreadable", key=key, error=str(exc))
            return None
        if schedule_key(entry.kind, entry.job_id) != key:
            self._metrics.invalid.inc()
            log.error("schedule.key_mismatch", key=key, expected=schedule_key(entry.kind, entry.job_id))
            return None
        return entry

    # --- (re)loading one schedule --------------------------------------------------------------

    def _apply(self, key: str, entry: ScheduleEntry | None) -> None:
        """Make the timer for `key` match `entry` (None: removed). Runs the misfire rule on load."""
        self._disarm(key)
        generation = next(self._generations)
        if entry is None or not entry.enabled:
            if self._loaded.pop(key, None) is not None:
                log.info("schedule.stopped", key=key, reason="disabled" if entry else "removed")
            self._metrics.loaded.set(len(self._loaded))
            return
        try:
            schedule = CronSchedule(entry.cron, entry.timezone)
        except CronError as exc:
            self._loaded.pop(key, None)
            self._metrics.loaded.set(len(self._loaded))
            self._metrics.invalid.inc()
            log.error("schedule.invalid", key=key, cron=entry.cron, timezone=entry.timezone, error=str(exc))
            return
        self._loaded[key] = _Loaded(entry, schedule, generation)
        self._metrics.loaded.set(len(self._loaded))
        now = self._clock()
        next_fire = self._arm(key, generation, after=now)
        self._start_catch_up(key, generation, until=now)
        log.info(
            "schedule.loaded",
            key=key,
            cron=entry.cron,
            timezone=entry.timezone,
            next_fire=_iso(next_fire) if next_fire else None,
        )

    def _current(self, key: str, generation: int) -> _Loaded | None:
        loaded = self._loaded.get(key)
        return loaded if loaded is not None and loaded.generation == generation else None

    def _disarm(self, key: str) -> None:
        if self._aps.get_job(key) is not None:
            self._aps.remove_job(key)
        running = self._catch_ups.pop(key, None)
        if running is not None:
            running[0].cancel()

    def _arm(self, key: str, generation: int, after: datetime) -> datetime | None:
        loaded = self._current(key, generation)
        if loaded is None:
            return None
        fire_time = loaded.schedule.next_fire(after)
        if fire_time is None:
            log.warning("schedule.exhausted", key=key, cron=loaded.entry.cron)
            return None
        self._aps.add_job(
            self._on_timer,
            trigger=DateTrigger(run_date=fire_time),
            args=(key, generation, fire_time),
            id=key,
            replace_existing=True,
            misfire_grace_time=None,  # never dropped by APScheduler: lateness is our misfire rule's call
        )
        return fire_time

    # --- firing --------------------------------------------------------------------------------

    async def _on_timer(self, key: str, generation: int, fire_time: datetime) -> None:
        """APScheduler job: arm the next fire first, then publish this one in its own task."""
        loaded = self._current(key, generation)
        if loaded is None:
            return
        now = self._clock()
        if now - fire_time > self._grace:
            # the process stood still (suspended, clock jumped): like downtime, never a burst
            self._arm(key, generation, after=now)
            self._start_catch_up(key, generation, until=now)
            return
        self._arm(key, generation, after=fire_time)
        self._spawn(self._fire(key, loaded, fire_time))

    async def _fire(self, key: str, loaded: _Loaded, fire_time: datetime) -> None:
        try:
            await self._publish(loaded.entry, Due(fire_time))
        except PublishFailed:
            # the catch-up keeps trying; past the grace period it reports the fire as missed
            self._start_catch_up(key, loaded.generation, until=fire_time)
            return
        with contextlib.suppress(*NATS_FAILURES):
            await self._remember(key, fire_time)

    async def _publish(self, entry: ScheduleEntry, due: Due, attempts: int = 3) -> None:
        subject = subjects.BACKUP_REQUESTED if entry.kind == "backup" else subjects.VERIFY_REQUESTED
        # TODO(contracts): a VerifyRequested model with the same fields will replace this for verify
        request = BackupRequested(
            job_id=entry.job_id,
            org_id=entry.org_id,
            fire_time=due.fire_time,
            missed=due.missed,
            missed_fires=due.missed_fires,
        )
        msg_id = scheduled_msg_id(entry.kind, entry.job_id, due.fire_time)
        delay = 0.5
        for attempt in range(1, attempts + 1):
            try:
                ack = await self.js.publish(
                    subject,
                    request.to_bytes(),
                    timeout=self._settings.publish_timeout_seconds,
                    headers={"Nats-Msg-Id": msg_id},
                )
                break
            except NATS_FAILURES as exc:
                self._metrics.publish_failures.inc()
                log.warning(
                    "fire.publish_failed",
                    msg_id=msg_id,
                    attempt=attempt,
                    error=_describe(exc),
                )
                if attempt == attempts or self._stop.is_set():
                    raise PublishFailed(f"{msg_id} not stored after {attempt} attempts") from exc
                await self._pause(delay)
                delay *= 2
        if ack.duplicate:
            self._metrics.duplicates.labels(entry.kind).inc()
            log.debug("fire.duplicate", msg_id=msg_id)
            return
        if due.missed:
            self._metrics.missed.labels(entry.kind).inc(due.missed_fires)
            log.warning("fire.missed", msg_id=msg_id, missed_fires=due.missed_fires)
        else:
            self._metrics.fires.labels(entry.kind).inc()
            log.info("fire.published", msg_id=msg_id, subject=subject)

    # --- catching up ---------------------------------------------------------------------------

    def _start_catch_up(self, key: str, generation: int, until: datetime) -> None:
        """(Re)start the catch-up of `key` for fires up to `until` (one per key at a time)."""
        running = self._catch_ups.pop(key, None)
        if running is not None and not running[0].done():
            running[0].cancel()  # replaced by one that covers both: same Msg-Ids, nothing doubles
            until = max(until, running[1])
        task = asyncio.ensure_future(self._catch_up(key, generation, until))
        self._catch_ups[key] = (task, until)
        task.add_done_callback(lambda done: self._catch_up_finished(key, done))

    def _catch_up_finished(self, key: str, task: asyncio.Task[None]) -> None:
        if key in self._catch_ups and self._catch_ups[key][0] is task:
            del self._catch_ups[key]

    async def _catch_up(self, key: str, generation: int, until: datetime) -> None:
        delay = 1.0
        while not self._stop.is_set():
            loaded = self._current(key, generation)
            if loaded is None:
                return
            try:
                async with self._catch_up_slots:
                    await self._catch_up_once(key, loaded, until)
                return
            except _RETRYABLE as exc:
                log.warning("catch_up.retry", key=key, error=_describe(exc), retry_in=delay)
                await self._pause(delay)
                delay = min(delay * 2, _MAX_RETRY_DELAY)
                with contextlib.suppress(*NATS_FAILURES):
                    await self._ensure_control_stream()

    async def _catch_up_once(self, key: str, loaded: _Loaded, until: datetime) -> None:
        owed = plan_catch_up(
            loaded.schedule,
            last_fire=await self._last_fire(key),
            updated_at=loaded.entry.updated_at,
            until=until,
            now=self._clock(),
            grace=self._grace,
        )
        for due in owed:
            log.info(
                "catch_up.due",
                key=key,
                fire_time=_iso(due.fire_time),
                missed=due.missed,
                missed_fires=due.missed_fires,
            )
            await self._publish(loaded.entry, due)
            await self._remember(key, due.fire_time)

    # --- SCHEDULER_STATE: the last fire per key ------------------------------------------------

    @property
    def state(self) -> KeyValue:
        if self._state is None:
            raise RuntimeError("SCHEDULER_STATE is not open yet")
        return self._state

    async def _last_fire(self, key: str) -> datetime | None:
        try:
            entry = await self.state.get(key)
        except KeyNotFoundError:
            return None
        return self._parse_fire(key, entry.value)

    @staticmethod
    def _parse_fire(key: str, value: bytes | None) -> datetime | None:
        try:
            fired = datetime.fromisoformat((value or b"").decode())
        except (UnicodeDecodeError, ValueError):
            log.warning("state.unreadable", key=key)
            return None
        return fired if fired.tzinfo is not None else fired.replace(tzinfo=UTC)

    async def _remember(self, key: str, fire_time: datetime) -> None:
        """Record `fire_time` as the last fire of `key`, never moving it backwards (two replicas and a
        late catch-up all write here: compare-and-set on the revision)."""
        value = _iso(fire_time).encode()
        for _attempt in range(5):
            try:
                current = await self.state.get(key)
            except KeyNotFoundError:
                try:
                    await self.state.create(key, value)
                    return
                except KeyWrongLastSequenceError:
                    continue
            known = self._parse_fire(key, current.value)
            if known is not None and known >= fire_time:
                return
            try:
                await self.state.update(key, value, last=current.revision)
                return
            except KeyWrongLastSequenceError:
                continue
        log.warning("state.contended", key=key)

    async def _forget(self, key: str) -> None:
        """A deleted schedule's memory goes too (a re-created one starts from its own updated_at)."""
        with contextlib.suppress(*NATS_FAILURES):
            await self.state.get(key)
            await self.state.delete(key)
