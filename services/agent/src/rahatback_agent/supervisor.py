"""The agent's one long-running component: connect, heartbeat, answer RPCs, pull commands with
bounded concurrency, cancel, report durably, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import nats
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import (
    BackupCommand,
    BackupCompleted,
    BackupFailed,
    BackupStarted,
    CancelCommand,
    CommandRefused,
    DbListReply,
    DbListRequest,
    DbTestReply,
    DbTestRequest,
    Heartbeat,
    Progress,
    PruneCommand,
    PruneCompleted,
    PruneFailed,
    Report,
    RestoreCommand,
    RestoreCompleted,
    RestoreFailed,
    RestoreStarted,
    RpcFailureReply,
    Stage,
    StorageTestReply,
    StorageTestRequest,
    VerifyCommand,
    VerifyCompleted,
    VerifyFailed,
    VerifyStarted,
)

from . import __version__, jobs, metrics, tools, verification
from .command_auth import CommandAuth, CommandRefusal, describe_body
from .identity import AgentIdentity
from .keyring import Keyring
from .nats_credentials import CredentialsRefused, NatsCredentials
from .scratch_registry import ScratchRegistry
from .settings import AgentSettings

log = structlog.get_logger("rahatback_agent.supervisor")

CANCELLED_BY_USER = "cancelled by user"
SHUTTING_DOWN = "agent shutting down"
# after the drain deadline, how long reports of cancelled jobs may take to reach JetStream
REPORT_GRACE_SECONDS = 30.0
REPORT_RETRY_CAP_SECONDS = 15.0

RunKind = Literal["backup", "restore", "verify"]
Command = BackupCommand | RestoreCommand | VerifyCommand


@dataclass
class RunningJob:
    kind: RunKind
    run_id: str
    progress: jobs.ProgressState
    inner: asyncio.Task[Report]
    cancel_reason: str | None = None
    last_sent: tuple[str, int, int] | None = None
    last_sent_at: float = field(default_factory=time.monotonic)


def _now() -> datetime:
    return datetime.now(UTC)


def _stream_seq(msg: Msg) -> int | None:
    """The command's sequence in AGENT_COMMANDS: the same on a redelivery, new on a replay."""
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream message
        return None


class Supervisor:
    def __init__(self, identity: AgentIdentity, settings: AgentSettings) -> None:
        self.identity = identity
        self.settings = settings
        self.agent_id = identity.agent_id
        self._private_key = identity.private_key
        self._nats_url = settings.nats_url or identity.nats_url
        parsed = urlsplit(self._nats_url)
        # a URL may carry user:password; logs get only scheme, host and port
        self._nats_url_for_logs = (
            f"{parsed.scheme}://{parsed.hostname}:{parsed.port}" if parsed.hostname else "?"
        )
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._psub: JetStreamContext.PullSubscription | None = None
        self._running: dict[str, RunningJob] = {}
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._rpc_tasks: set[asyncio.Task[None]] = set()
        self._cancelled: set[str] = set()  # cancels that arrived before their command
        self._seen: set[str] = set()  # run ids started by this process: a redelivery never re-runs one
        self._slot_freed = asyncio.Event()
        self._closing = asyncio.Event()  # set once jobs are done: stops heartbeat and progress
        self._engines = jobs.supported_engines()
        self._storages = jobs.supported_storages()
        self._scratch_registry = ScratchRegistry.beside(settings.config)
        # JWT mode: the nkey seed and user JWT from enrollment, renewed here; None in plain mode
        self._nats_credentials = NatsCredentials.for_identity(identity, settings.config)
        self._connection_closed = asyncio.Event()  # the server closed the connection for good
        # why the API refused this agent new NATS credentials (revoked or unknown): it exits non-zero
        self.refused: str | None = None
        # signature, expiry and replay checks of everything the API sends (CommandAuthError if unpinned)
        self._auth = CommandAuth.for_identity(
            identity,
            settings.config,
            clock_skew_seconds=settings.command_clock_skew_seconds,
            max_entries=settings.replay_cache_max_entries,
        )
        self._keyring = Keyring.from_settings(settings)  # customer-held backup keys
        self.log = log.bind(agent_id=self.agent_id)

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    # ------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        await tools.detect_tools(refresh=True)  # for the heartbeat; runs and tests look again
        # leftovers of a killed agent (docs/verification.md): SQLite's need no credentials; those on
        # servers are in the scratch registry with their secrets still sealed to this agent, and
        # are dropped in the background so that an unreachable server never delays start-up
        await verification.sweep_local_leftovers(self.agent_id)
        cleanup = asyncio.create_task(
            verification.drop_registered_leftovers(
                self._scratch_registry,
                agent_id=self.agent_id,
                private_key=self._private_key,
                timeout_seconds=self.settings.scratch_cleanup_timeout_seconds,
            ),
            name="scratch-cleanup",
        )
        try:
            await self._run_connected(stop)
        finally:
            if not cleanup.done():  # its entries stay on disk for the next start
                cleanup.cancel()
            await asyncio.gather(cleanup, return_exceptions=True)

    async def _run_connected(self, stop: asyncio.Event) -> None:
        nc = await self._connect(stop)
        if nc is None:
            return
        background: list[asyncio.Task[None]] = []
        try:
            # one pass per connection: the server closes a connection for good when the agent's
            # JWT expires (or it was revoked); running jobs go on and report over the next one
            while nc is not None:
                await self._serve_connection(nc, stop, background)
                nc = None if stop.is_set() else await self._connect(stop)
        finally:
            await self._drain_jobs()
            self._closing.set()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            for task in list(self._rpc_tasks):
                task.cancel()
            await asyncio.gather(*self._rpc_tasks, return_exceptions=True)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.drain()
            self.log.info("agent stopped")

    async def _serve_connection(
        self, nc: NATS, stop: asyncio.Event, background: list[asyncio.Task[None]]
    ) -> None:
        """Pull commands until `stop`, or until the server closes this connection for good."""
        self._nc = nc
        self._js = nc.jetstream()
        await self._subscribe_rpcs(nc)
        # the server knows our subscriptions before the first heartbeat says we are online
        with contextlib.suppress(Exception):
            await nc.flush(timeout=5)
        if not background:  # they publish on whichever connection is current
            background.append(asyncio.create_task(self._heartbeat_loop(), name="heartbeat"))
            background.append(asyncio.create_task(self._progress_loop(), name="progress"))
        ended = asyncio.Event()  # stop, or this connection closed by the server
        relay = asyncio.create_task(self._relay_end(stop, ended), name="connection-end")
        renewing: asyncio.Task[None] | None = None
        if self._nats_credentials is not None:
            renewing = asyncio.create_task(
                self._nats_credentials.renew_loop(nc, ended), name="nats-credentials"
            )
        try:
            await self._command_loop(ended)
        finally:
            relay.cancel()
            if renewing is not None:
                renewing.cancel()
            await asyncio.gather(relay, *([renewing] if renewing else []), return_exceptions=True)

    async def _relay_end(self, stop: asyncio.Event, ended: asyncio.Event) -> None:
        waits = [asyncio.create_task(stop.wait()), asyncio.create_task(self._connection_closed.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            ended.set()
        finally:
            for task in waits:
                task.cancel()

    async def _connect(self, stop: asyncio.Event) -> NATS | None:
        async def error_cb(exc: Exception) -> None:
            self.log.warning("nats error", error=str(exc), error_type=type(exc).__name__)

        async def disconnected_cb() -> None:
            metrics.NATS_CONNECTED.set(0)
            if self._closing.is_set():
                self.log.info("disconnected from nats")
            else:
                self.log.warning("disconnected from nats; reconnecting")

        async def reconnected_cb() -> None:
            metrics.NATS_CONNECTED.set(1)
            self.log.info("reconnected to nats")

        backoff = 1.0
        closed_by_server = self._connection_closed.is_set()
        while not stop.is_set():
            renewed = await self._renew_nats_credentials_over_http(closed_by_server=closed_by_server)
            if renewed is False:
                stop.set()
                return None
            if renewed is None:  # the API is unreachable: connecting with an expired JWT is pointless
                await self._sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            closed_by_server = False
            self._connection_closed.clear()
            self.log.info("connecting to nats", url=self._nats_url_for_logs)
            # with max_reconnect_attempts=-1 nats-py retries the first connect forever by itself;
            # racing it against `stop` keeps the agent stoppable while the server is unreachable
            connecting = asyncio.create_task(
                nats.connect(
                    self._nats_url,
                    name=f"rahatback-agent-{self.agent_id}",
                    inbox_prefix=subjects.agent_inbox_prefix(self.agent_id),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=error_cb,
                    disconnected_cb=disconnected_cb,
                    reconnected_cb=reconnected_cb,
                    **self._nats_credential_options(stop),
                )
            )
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await connecting
                return None
            try:
                nc = connecting.result()
            except Exception as exc:
                self.log.warning("could not connect to nats", error=str(exc), retry_in=backoff)
                await self._sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            self.log.info("connected to nats", url=self._nats_url_for_logs)
            metrics.NATS_CONNECTED.set(1)
            return nc
        return None

    async def _renew_nats_credentials_over_http(self, *, closed_by_server: bool) -> bool | None:
        """An agent whose JWT expired (offline too long, or the renewal responder was unreachable
        for half its lifetime) renews over HTTP (docs/nats-security.md). So does one the server
        closed for good: a revoked agent learns it here. True: go on connecting; None: not now,
        retry later; False: the API refused (revoked or unknown), `self.refused` says why."""
        credentials = self._nats_credentials
        if credentials is None or not (closed_by_server or credentials.expired()):
            return True
        try:
            await credentials.renew_over_http(self.identity.api_url)
        except CredentialsRefused as exc:
            if exc.status_code in (401, 403):
                self.refused = str(exc)
                self.log.error("the API refuses this agent new NATS credentials; stopping", error=str(exc))
                return False
            failure: Exception = exc
        except Exception as exc:
            failure = exc
        else:
            return True
        self.log.error(
            "the agent's NATS credentials cannot be renewed yet; retrying",
            error=str(failure) or type(failure).__name__,
            expires_at=credentials.expires_at.isoformat(),
        )
        return None

    def _nats_credential_options(self, stop: asyncio.Event) -> dict[str, Any]:
        """JWT mode: sign in with the agent's own NATS user (docs/nats-security.md)."""
        credentials = self._nats_credentials
        if credentials is None:
            return {}

        def closed_by_server() -> None:
            metrics.NATS_CONNECTED.set(0)
            if not self._closing.is_set() and not stop.is_set():
                # nats-py gives up after the server closed us (expired or revoked credentials): go
                # back to connecting, which renews over HTTP and stops only if the API refuses
                self.log.warning(
                    "nats closed the connection for good; renewing the credentials over http",
                    expired=credentials.expired(),
                )
                self._connection_closed.set()

        return credentials.connect_options(closed_by_server)

    @staticmethod
    async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    # ------------------------------------------------------------ telemetry

    async def _heartbeat_loop(self) -> None:
        assert self._nc is not None
        subject = subjects.agent_heartbeat(self.agent_id)
        while not self._closing.is_set():
            beat = Heartbeat(
                agent_id=self.agent_id,
                version=__version__,
                engines=self._engines,
                storages=self._storages,
                running=self.running_ids,
                tools=tools.reported_tools(),
                at=_now(),
                keys=await asyncio.to_thread(self._keyring.held),
            )
            try:
                await self._nc.publish(subject, beat.to_bytes())
            except Exception as exc:
                self.log.warning("heartbeat not sent", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.settings.heartbeat_seconds)

    async def _progress_loop(self) -> None:
        assert self._nc is not None
        subject = subjects.agent_progress(self.agent_id)
        while not self._closing.is_set():
            await asyncio.sleep(self.settings.progress_interval_seconds)
            for job in list(self._running.values()):
                state = (job.progress.stage, job.progress.bytes_in, job.progress.bytes_out)
                if state == job.last_sent:
                    continue
                now = time.monotonic()
                previous_in = job.last_sent[1] if job.last_sent else 0
                elapsed = max(now - job.last_sent_at, 1e-6)
                message = Progress(
                    agent_id=self.agent_id,
                    kind=job.kind,
                    run_id=job.run_id,
                    stage=state[0],
                    bytes_in=state[1],
                    bytes_out=state[2],
                    rate_bps=max(state[1] - previous_in, 0) / elapsed,
                    at=_now(),
                )
                job.last_sent, job.last_sent_at = state, now
                try:
                    await self._nc.publish(subject, message.to_bytes())
                except Exception as exc:
                    self.log.debug("progress not sent", error=str(exc))

    # ------------------------------------------------------------ rpc

    async def _subscribe_rpcs(self, nc: NATS) -> None:
        async def on_db_test(msg: Msg) -> None:
            self._spawn_rpc(msg, self._answer_db_test)

        async def on_storage_test(msg: Msg) -> None:
            self._spawn_rpc(msg, self._answer_storage_test)

        async def on_db_list(msg: Msg) -> None:
            self._spawn_rpc(msg, self._answer_db_list)

        await nc.subscribe(subjects.agent_rpc(self.agent_id, "db.test"), cb=on_db_test)
        await nc.subscribe(subjects.agent_rpc(self.agent_id, "storage.test"), cb=on_storage_test)
        await nc.subscribe(subjects.agent_rpc(self.agent_id, "db.list"), cb=on_db_list)

    def _spawn_rpc(self, msg: Msg, handler: Callable[[Msg], Awaitable[bytes]]) -> None:
        # one slow database must not hold up the next request: answer each in its own task
        async def answer() -> None:
            try:
                self._auth.check_request(msg.subject, msg.data, msg.headers)
            except CommandRefusal as refusal:
                await self._refuse_request(msg, refusal)
                return
            try:
                body = await handler(msg)
            except Exception as exc:  # a bug must still produce an answer, never a silent timeout
                self.log.exception("rpc handler crashed", subject=msg.subject)
                failure = RpcFailureReply(error_code="error", error=f"agent error: {type(exc).__name__}")
                body = failure.to_bytes()
            if msg.reply:
                try:
                    await msg.respond(body)
                except Exception as exc:
                    self.log.warning("rpc reply not sent", subject=msg.subject, error=str(exc))

        task = asyncio.create_task(answer())
        self._rpc_tasks.add(task)
        task.add_done_callback(self._rpc_tasks.discard)

    async def _answer_db_test(self, msg: Msg) -> bytes:
        try:
            request = DbTestRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            return DbTestReply(
                ok=False, error_code="error", error=f"malformed db.test request: {exc.error_count()} error(s)"
            ).to_bytes()
        with structlog.contextvars.bound_contextvars(request_id=request.request_id):
            reply = await jobs.test_database(request, private_key=self._private_key)
            self.log.info(
                "db.test answered", ok=reply.ok, error_code=reply.error_code, request_id=request.request_id
            )
        return reply.to_bytes()

    async def _answer_db_list(self, msg: Msg) -> bytes:
        try:
            request = DbListRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            return DbListReply(
                ok=False, error_code="error", error=f"malformed db.list request: {exc.error_count()} error(s)"
            ).to_bytes()
        reply = await jobs.list_databases(request, private_key=self._private_key)
        self.log.info(
            "db.list answered",
            ok=reply.ok,
            databases=len(reply.databases),
            error_code=reply.error_code,
            request_id=request.request_id,
        )
        return reply.to_bytes()

    async def _answer_storage_test(self, msg: Msg) -> bytes:
        try:
            request = StorageTestRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            return StorageTestReply(
                ok=False,
                error_code="error",
                error=f"malformed storage.test request: {exc.error_count()} error(s)",
            ).to_bytes()
        reply = await jobs.test_storage(request, private_key=self._private_key)
        self.log.info(
            "storage.test answered", ok=reply.ok, error_code=reply.error_code, request_id=request.request_id
        )
        return reply.to_bytes()

    # ------------------------------------------------------------ commands

    async def _command_loop(self, stop: asyncio.Event) -> None:
        assert self._js is not None
        spec = streams.agent_commands_consumer(self.agent_id)
        try:
            await self._pull_commands(stop, spec)
        finally:
            if self._psub is not None:
                # unconsumed fetch status messages would otherwise make nc.drain() wait for ever
                with contextlib.suppress(Exception):
                    await self._psub.unsubscribe()

    async def _pull_commands(self, stop: asyncio.Event, spec: streams.ConsumerSpec) -> None:
        assert self._js is not None
        psub: JetStreamContext.PullSubscription | None = None
        while not stop.is_set():
            if psub is None:
                try:
                    # bind only: agents have no $JS.API rights to look up or create consumers
                    psub = await self._js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
                    self._psub = psub
                except Exception as exc:
                    self.log.warning("cannot bind to the command consumer", error=str(exc))
                    await self._sleep_or_stop(stop, 2.0)
                    continue
            try:
                msgs = await psub.fetch(1, timeout=self.settings.fetch_timeout_seconds)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:
                self.log.warning("fetching commands failed", error=str(exc), error_type=type(exc).__name__)
                await self._sleep_or_stop(stop, 2.0)
                continue
            for msg in msgs:
                if stop.is_set():
                    # left for the next start: the command is durable until it expires
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    continue
                try:
                    await self._handle_command(msg, stop)
                except Exception:
                    self.log.exception("command handling crashed", subject=msg.subject)

    async def _handle_command(self, msg: Msg, stop: asyncio.Event) -> None:
        try:
            self._auth.check_signature(msg.subject, msg.data, msg.headers)
        except CommandRefusal as refusal:
            await self._refuse(msg, refusal, stop)
            return
        prefix = f"agent.{self.agent_id}."
        suffix = msg.subject[len(prefix) :] if msg.subject.startswith(prefix) else ""
        if suffix == "prune.execute":
            await self._prune(msg, stop)
            return
        model: type[BackupCommand] | type[RestoreCommand] | type[VerifyCommand] | type[CancelCommand]
        if suffix == "job.execute":
            model = BackupCommand
        elif suffix == "restore.execute":
            model = RestoreCommand
        elif suffix == "verify.execute":
            model = VerifyCommand
        elif suffix == "job.cancel":
            model = CancelCommand
        else:
            self.log.error("unsupported command; terminating it", subject=msg.subject)
            await msg.term()
            return
        try:
            command = model.model_validate_json(msg.data)
        except ValidationError as exc:
            self.log.error(
                "unparseable command; terminating it", subject=msg.subject, errors=exc.error_count()
            )
            await msg.term()
            return

        if not await self._fresh(msg, command.command_id, command.expires_at, stop):
            return
        if isinstance(command, CancelCommand):
            self._auth.accept(command.command_id, command.expires_at, _stream_seq(msg))
            self._cancel(command.run_id)
            await msg.ack()
            return

        run_id, kind = self._identify(command)
        bound = self.log.bind(run_id=run_id, subject=msg.subject, command_id=command.command_id)
        if run_id in self._seen or run_id in self._running:
            bound.warning("command redelivered for a run this agent already started; not running it twice")
            await msg.ack()
            return
        if run_id in self._cancelled:
            self._cancelled.discard(run_id)
            bound.info("command was cancelled before it started")
            if await self._publish_report(
                kind, self._failure(kind, run_id, CANCELLED_BY_USER, "queued"), give_up=stop
            ):
                self._auth.accept(command.command_id, command.expires_at, _stream_seq(msg))
                await msg.ack()
            return

        if not await self._wait_for_slot(msg, stop):
            with contextlib.suppress(Exception):
                await msg.nak()
            return

        started: Report
        if isinstance(command, BackupCommand):
            started = BackupStarted(
                agent_id=self.agent_id, occurred_at=_now(), run_id=run_id, agent_version=__version__
            )
        elif isinstance(command, VerifyCommand):
            started = VerifyStarted(agent_id=self.agent_id, occurred_at=_now(), verify_id=run_id)
        else:
            started = RestoreStarted(agent_id=self.agent_id, occurred_at=_now(), restore_id=run_id)
        if not await self._publish_report(kind, started, give_up=stop):
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        # acked only once `started` is stored: a crash after this is the API's stall watchdog's business;
        # a half-done backup is never run again (the replay cache turns a redelivery away)
        self._auth.accept(command.command_id, command.expires_at, _stream_seq(msg))
        await msg.ack()
        self._start(kind, run_id, command)
        bound.info("command started", kind=kind)

    @staticmethod
    def _identify(command: Command) -> tuple[str, RunKind]:
        if isinstance(command, BackupCommand):
            return command.run_id, "backup"
        if isinstance(command, VerifyCommand):
            return command.verify_id, "verify"
        return command.restore_id, "restore"

    async def _prune(self, msg: Msg, stop: asyncio.Event) -> None:
        """Retention deletes are short and idempotent: done inline, acked once the report is stored."""
        try:
            command = PruneCommand.model_validate_json(msg.data)
        except ValidationError as exc:
            self.log.error("unparseable prune command; terminating it", errors=exc.error_count())
            await msg.term()
            return
        if not await self._fresh(msg, command.command_id, command.expires_at, stop):
            return
        # an expired prune was refused by _fresh (the API then leaves its copies for the next one)
        report = await jobs.run_prune(command, agent_id=self.agent_id, private_key=self._private_key)
        if await self._publish_report("prune", report):
            # remembered only now: a prune cut short by a crash runs again (deleting is idempotent)
            self._auth.accept(command.command_id, command.expires_at, _stream_seq(msg))
            await msg.ack()

    # ------------------------------------------------------------ refusals (docs/security.md)

    async def _fresh(self, msg: Msg, command_id: str, expires_at: datetime, stop: asyncio.Event) -> bool:
        """Expiry and replay of a correctly signed command; False when the message is settled here."""
        try:
            verdict = self._auth.check_fresh(command_id, expires_at, _stream_seq(msg))
        except CommandRefusal as refusal:
            await self._refuse(msg, refusal, stop)
            return False
        if verdict == "redelivered":
            self.log.warning(
                "command redelivered after this agent accepted it; not running it twice",
                subject=msg.subject,
                command_id=command_id,
            )
            await msg.ack()
            return False
        return True

    def _refusal(self, msg: Msg, refusal: CommandRefusal) -> CommandRefused:
        facts = describe_body(msg.subject, msg.data)
        self.log.warning(
            "command refused; running nothing",
            subject=msg.subject,
            reason=refusal.reason,
            detail=refusal.detail,
            command_id=facts.command_id,
            run_id=facts.run_id,
        )
        return CommandRefused(
            agent_id=self.agent_id,
            occurred_at=_now(),
            subject=msg.subject,
            reason=refusal.reason,
            detail=refusal.detail,
            command_id=facts.command_id,
            run_kind=facts.run_kind,
            run_id=facts.run_id,
        )

    async def _refuse(self, msg: Msg, refusal: CommandRefusal, stop: asyncio.Event) -> None:
        """Report the refusal durably, then terminate the command (never redelivered, never run)."""
        report = self._refusal(msg, refusal)
        seq = _stream_seq(msg)
        if await self._publish_refusal(report, f"refused:{seq}:{refusal.reason}", give_up=stop):
            await msg.term()
        else:  # stopping: the command comes back at the next start and is refused then
            with contextlib.suppress(Exception):
                await msg.nak()

    async def _refuse_request(self, msg: Msg, refusal: CommandRefusal) -> None:
        report = self._refusal(msg, refusal)
        if msg.reply:
            reply = RpcFailureReply(
                error_code="refused", error=f"the agent refused this request: {refusal.detail}"
            )
            with contextlib.suppress(Exception):
                await msg.respond(reply.to_bytes())
        await self._publish_refusal(report, f"refused:rpc:{uuid.uuid4().hex}", give_up=self._closing)

    async def _wait_for_slot(self, msg: Msg, stop: asyncio.Event) -> bool:
        last_touch = time.monotonic()
        while len(self._running) >= self.settings.max_concurrency:
            if stop.is_set():
                return False
            if time.monotonic() - last_touch > 15:
                # keep the held command ours while we wait (ack wait is 60 s)
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                last_touch = time.monotonic()
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), 1.0)
        return True

    def _start(self, kind: RunKind, run_id: str, command: Command) -> None:
        progress = jobs.ProgressState(kind=kind, run_id=run_id)
        coro: Awaitable[Report]
        if isinstance(command, BackupCommand):
            coro = jobs.run_backup(
                command,
                agent_id=self.agent_id,
                private_key=self._private_key,
                progress=progress,
                keyring=self._keyring,
            )
        elif isinstance(command, VerifyCommand):
            coro = jobs.run_verify(
                command,
                agent_id=self.agent_id,
                private_key=self._private_key,
                progress=progress,
                registry=self._scratch_registry,
                keyring=self._keyring,
            )
        else:
            coro = jobs.run_restore(
                command,
                agent_id=self.agent_id,
                private_key=self._private_key,
                progress=progress,
                keyring=self._keyring,
            )

        async def as_task() -> Report:
            return await coro

        inner = asyncio.create_task(as_task(), name=f"{kind}-{run_id}")
        job = RunningJob(kind=kind, run_id=run_id, progress=progress, inner=inner)
        self._seen.add(run_id)
        self._running[run_id] = job
        metrics.RUNNING.set(len(self._running))
        outer = asyncio.create_task(self._finish(job), name=f"report-{run_id}")
        self._job_tasks.add(outer)
        outer.add_done_callback(self._job_tasks.discard)

    async def _finish(self, job: RunningJob) -> None:
        await asyncio.wait({job.inner})
        report: Report
        if job.inner.cancelled():
            report = self._failure(
                job.kind, job.run_id, job.cancel_reason or SHUTTING_DOWN, job.progress.stage
            )
        elif (exc := job.inner.exception()) is not None:
            self.log.error("job crashed", run_id=job.run_id, error_type=type(exc).__name__)
            report = self._failure(job.kind, job.run_id, jobs.describe_error(exc), job.progress.stage)
        else:
            report = job.inner.result()
        self._running.pop(job.run_id, None)
        metrics.RUNNING.set(len(self._running))
        metrics.record_finished(job.kind, report, job.progress.bytes_in)
        self._slot_freed.set()
        await self._publish_report(job.kind, report)

    def _cancel(self, run_id: str) -> None:
        job = self._running.get(run_id)
        if job is None:
            self.log.info("cancel for a run that is not running here; remembering it", run_id=run_id)
            if run_id not in self._seen:
                self._cancelled.add(run_id)
            return
        self.log.info("cancelling run", run_id=run_id)
        job.cancel_reason = CANCELLED_BY_USER
        job.inner.cancel()

    def _failure(self, kind: RunKind, run_id: str, error: str, stage: Stage | None) -> Report:
        if kind == "backup":
            return BackupFailed(
                agent_id=self.agent_id, occurred_at=_now(), run_id=run_id, stage=stage, error=error
            )
        if kind == "verify":
            return VerifyFailed(
                agent_id=self.agent_id, occurred_at=_now(), verify_id=run_id, stage=stage, error=error
            )
        return RestoreFailed(
            agent_id=self.agent_id, occurred_at=_now(), restore_id=run_id, stage=stage, error=error
        )

    async def _drain_jobs(self) -> None:
        if self._job_tasks:
            self.log.info(
                "draining running jobs", running=self.running_ids, deadline_s=self.settings.drain_seconds
            )
            _, pending = await asyncio.wait(set(self._job_tasks), timeout=self.settings.drain_seconds)
            if pending:
                for job in list(self._running.values()):
                    job.cancel_reason = SHUTTING_DOWN
                    job.inner.cancel()
                _, pending = await asyncio.wait(pending, timeout=REPORT_GRACE_SECONDS)
                for task in pending:
                    self.log.error("report could not be stored before shutdown", task=task.get_name())
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------ reports

    async def _publish_report(
        self, kind: RunKind | Literal["prune"], report: Report, *, give_up: asyncio.Event | None = None
    ) -> bool:
        """Store a report in AGENT_REPORTS, retrying with the same Nats-Msg-Id until it is: the API may
        be down or JetStream briefly unavailable, and a lost `completed` would be a lost backup."""
        assert self._js is not None
        if isinstance(report, BackupStarted | RestoreStarted | VerifyStarted):
            outcome: Literal["started", "completed", "failed"] = "started"
        elif isinstance(report, BackupCompleted | RestoreCompleted | PruneCompleted | VerifyCompleted):
            outcome = "completed"
        else:
            outcome = "failed"
        if isinstance(report, BackupStarted | BackupCompleted | BackupFailed):
            run_id = report.run_id
        elif isinstance(report, RestoreStarted | RestoreCompleted | RestoreFailed):
            run_id = report.restore_id
        elif isinstance(report, VerifyStarted | VerifyCompleted | VerifyFailed):
            run_id = report.verify_id
        elif isinstance(report, PruneCompleted | PruneFailed):
            run_id = report.prune_id
        else:
            raise TypeError(f"not a run report: {type(report).__name__}")
        subject = subjects.agent_report(self.agent_id, kind, outcome)
        return await self._store(subject, report, f"{run_id}:{outcome}", run_id, give_up)

    async def _publish_refusal(
        self, report: CommandRefused, msg_id: str, *, give_up: asyncio.Event | None = None
    ) -> bool:
        subject = subjects.agent_command_refused(self.agent_id)
        return await self._store(subject, report, msg_id, report.command_id or "?", give_up)

    async def _store(
        self, subject: str, report: Report, msg_id: str, run_id: str, give_up: asyncio.Event | None
    ) -> bool:
        assert self._js is not None
        headers = {"Nats-Msg-Id": msg_id}
        body = report.to_bytes()
        delay = 0.25
        while True:
            try:
                await self._js.publish(subject, body, timeout=5, headers=headers)
                self.log.info("report stored", run_id=run_id, subject=subject)
                return True
            except Exception as exc:
                if give_up is not None and give_up.is_set():
                    # only for reports about commands not yet acked: the command itself comes back
                    self.log.warning(
                        "report not stored; leaving the command for the next start", run_id=run_id
                    )
                    return False
                self.log.warning(
                    "report not stored yet; retrying",
                    run_id=run_id,
                    subject=subject,
                    error=str(exc) or type(exc).__name__,
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, REPORT_RETRY_CAP_SECONDS)
