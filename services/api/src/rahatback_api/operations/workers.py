"""The API's background work: consume agent reports and scheduled requests, record presence and
progress, fail stalled runs, raise overdue alerts.

Each loop opens its own session per unit of work and commits it before acknowledging, so a crash
at any point leads to a re-delivery that `apply_report` recognises and ignores.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import timedelta

import structlog
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from rahatback_api.db import session_scope
from rahatback_api.messaging.bus import Bus
from rahatback_api.messaging.live import LiveHub
from rahatback_api.messaging.outbox import OutboxRelay
from rahatback_api.models import BackupRun, VerifyRun
from rahatback_api.scheduling import service as scheduling
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.verification import service as verification
from rahatback_contracts import messages as m
from rahatback_contracts import streams, subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import reports, service

log = structlog.get_logger(__name__)

# progress arrives about once a second per run; the stall watchdog needs far less resolution
PROGRESS_WRITE_INTERVAL = 5.0


class Workers:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        bus: Bus,
        relay: OutboxRelay,
        hub: LiveHub,
        *,
        box: SecretBox,
        stall_after: timedelta,
        offline_after: timedelta,
        overdue_grace: timedelta,
    ) -> None:
        self.sessions = sessions
        self.box = box
        self.overdue_grace = overdue_grace
        self.bus = bus
        self.relay = relay
        self.hub = hub
        self.stall_after = stall_after
        self.offline_after = offline_after
        self._tasks: list[asyncio.Task[None]] = []
        self._progress_written: dict[str, float] = {}
        # Loops check this as well as being cancelled: nats-py's fetch can turn a cancellation that
        # races its own timeout into a TimeoutError, which a loop would otherwise just retry.
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        await self.bus.nc.subscribe(subjects.ALL_HEARTBEATS, cb=self._on_heartbeat)
        await self.bus.nc.subscribe(subjects.ALL_PROGRESS, cb=self._on_progress)
        for name, loop in (
            ("reports", self._consume_reports),
            ("control", self._consume_control),
            ("watchdog", self._watchdog),
            ("outbox", lambda: self.relay.run(self._stopping)),
        ):
            task = asyncio.create_task(self._forever(name, loop), name=f"api-{name}")
            self._tasks.append(task)

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        _, stuck = await asyncio.wait(self._tasks, timeout=10)
        for task in stuck:
            log.error("worker.did_not_stop", worker=task.get_name())

    async def _forever(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Restart a background loop after an unexpected error instead of silently losing it."""
        while not self._stopping.is_set():
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker.crashed", worker=name)
                await asyncio.sleep(2)

    # -------------------------------------------------------------------------------- reports

    async def _consume(self, spec: streams.ConsumerSpec, handle: Callable[[Msg], Awaitable[None]]) -> None:
        sub = await self.bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
        try:
            await self._fetch_loop(sub, handle)
        finally:
            # nats-py's drain() waits out its whole timeout (30 s) for a pull subscription still
            # registered: unsubscribe it first so a shutdown is immediate
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _fetch_loop(
        self, sub: JetStreamContext.PullSubscription, handle: Callable[[Msg], Awaitable[None]]
    ) -> None:
        while not self._stopping.is_set():
            try:
                # one at a time: a batch fetch lingers until the batch fills or times out, delaying work
                batch = await sub.fetch(1, timeout=5)
            except NatsTimeoutError:
                continue
            for msg in batch:
                await handle(msg)

    async def _consume_reports(self) -> None:
        await self._consume(streams.API_REPORTS_CONSUMER, self.handle_report)

    async def _consume_control(self) -> None:
        await self._consume(streams.API_CONTROL_CONSUMER, self.handle_control)

    async def handle_report(self, msg: Msg) -> None:
        msg_id = _msg_id(msg)
        try:
            agent_id, kind, report = reports.parse_report(msg.subject, msg.data)
            async with session_scope(self.sessions) as session:
                changed = await reports.apply_report(session, agent_id, msg_id, report)
        except reports.UntrustedReport as exc:
            log.warning("report.rejected", subject=msg.subject, reason=str(exc))
            await msg.term()
            return
        except Exception:
            # e.g. the database is down: retry later, backing off, never drop the report
            log.exception("report.failed", subject=msg.subject)
            await msg.nak(delay=min(2.0 * msg.metadata.num_delivered, 30.0))
            return
        await msg.ack()
        if changed:
            self.relay.kick()
        log.info("report.applied", subject=msg.subject, kind=kind, changed=changed)

    async def handle_control(self, msg: Msg) -> None:
        """From the scheduler: `backup.requested` runs the job like "run now" (or records why not);
        `verify.requested` verifies the job's latest successful backup."""
        if msg.subject not in (subjects.BACKUP_REQUESTED, subjects.VERIFY_REQUESTED):
            log.warning("control.unsupported", subject=msg.subject)
            await msg.term()
            return
        try:
            request = m.VerifyRequested.from_bytes(msg.data)  # same fields as BackupRequested
        except ValueError as exc:
            log.warning("control.malformed", subject=msg.subject, error=str(exc))
            await msg.term()
            return
        run: BackupRun | VerifyRun | None
        try:
            async with session_scope(self.sessions) as session:
                if msg.subject == subjects.VERIFY_REQUESTED:
                    run = await verification.handle_verify_requested(
                        session, self.box, request, _msg_id(msg), offline_after=self.offline_after
                    )
                else:
                    run = await scheduling.handle_backup_requested(
                        session, self.box, self.bus, request, _msg_id(msg), offline_after=self.offline_after
                    )
        except Exception:
            log.exception("control.failed", job_id=request.job_id)
            await msg.nak(delay=min(2.0 * msg.metadata.num_delivered, 30.0))
            return
        await msg.ack()
        self.relay.kick()
        log.info("control.applied", job_id=request.job_id, run_id=run.id if run else None)

    # ------------------------------------------------------------------- presence and progress

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            agent_id = subjects.agent_id_of(msg.subject)
            heartbeat = m.Heartbeat.model_validate_json(msg.data)
            async with session_scope(self.sessions) as session:
                await service.record_heartbeat(session, heartbeat, agent_id, self.offline_after)
        except Exception:
            log.exception("heartbeat.failed", subject=msg.subject)
            return
        self.relay.kick()

    async def _on_progress(self, msg: Msg) -> None:
        try:
            agent_id = subjects.agent_id_of(msg.subject)
            progress = m.Progress.model_validate_json(msg.data)
        except ValueError:
            log.warning("progress.malformed", subject=msg.subject)
            return
        org_id = await self.hub.publish_progress(agent_id, progress)
        loop_time = asyncio.get_running_loop().time()
        if (
            org_id is None
            or loop_time - self._progress_written.get(progress.run_id, 0) < PROGRESS_WRITE_INTERVAL
        ):
            return
        self._progress_written[progress.run_id] = loop_time
        try:
            async with session_scope(self.sessions) as session:
                await service.record_progress(session, progress, agent_id)
        except Exception:
            log.exception("progress.failed", run_id=progress.run_id)

    # ---------------------------------------------------------------------------- watchdog

    async def _watchdog(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(service.SWEEP_INTERVAL.total_seconds())
            # After a start or a NATS outage we have not heard heartbeats for a while through no
            # fault of the agents: judge them only once a full offline window has been heard.
            if self.bus.connected_for() < self.offline_after.total_seconds():
                continue
            async with session_scope(self.sessions) as session:
                failed = await service.sweep_stalled(
                    session, stall_after=self.stall_after, offline_after=self.offline_after
                )
            async with session_scope(self.sessions) as session:
                overdue = await scheduling.sweep_overdue(session, self.overdue_grace)
            if failed or overdue:
                self.relay.kick()
            if len(self._progress_written) > 10_000:  # finished runs' entries are never needed again
                self._progress_written.clear()


def _msg_id(msg: Msg) -> str:
    return (msg.headers or {}).get("Nats-Msg-Id") or f"seq:{msg.metadata.sequence.stream}"
