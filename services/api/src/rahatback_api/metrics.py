"""Prometheus metrics of the API, served on `GET /metrics` of the API's own port.

Two kinds:
- per-process: HTTP request latency by route template and status class, and the process collector;
- control-plane state read from the database and JetStream when scraped: per backup job (last
  success, last run status, durations and sizes, runs by status, overdue), agents online/offline,
  and the lag of the durable consumers. Every API replica reports the same state values, so
  aggregate them with `max`, never `sum` (deploy/grafana does).

State queries run at most once per `REFRESH_SECONDS` whatever the scrape rate, under a lock, so
neither an eager Prometheus nor several at once can load the database. Labels are bounded: job and
agent ids and names (configuration, not history), never a run id.

/metrics needs no token: keep it off the public gateway (the Kubernetes Ingress only routes /v1
and the docs; see docs/deploy.md). Job and agent names are visible to whoever can scrape it.
"""

from __future__ import annotations

import asyncio
import time
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from rahatback_contracts import streams
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rahatback_api.agents.service import is_online
from rahatback_api.backups.models import RunStatus
from rahatback_api.models import Agent, BackupJob, BackupRun

__all__ = ["REFRESH_SECONDS", "ApiMetrics", "HttpMetricsMiddleware", "install_metrics", "router"]

log = structlog.get_logger(__name__)

REFRESH_SECONDS = 15.0
NATS_TIMEOUT_SECONDS = 2.0
RUN_STATUSES: tuple[str, ...] = typing.get_args(RunStatus)
SUCCESS_STATUSES = ("completed", "partial")  # both set the job's last_success_at
FINISHED_STATUSES = (*SUCCESS_STATUSES, "failed")
# the API's own consumers, and the notifier's (the API creates it; its lag is notification lag)
CONSUMERS = (streams.API_REPORTS_CONSUMER, streams.API_CONTROL_CONSUMER, streams.NOTIFIER_EVENTS_CONSUMER)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
JOB_LABELS = ("org_id", "job_id", "job_name")  # not "job": Prometheus sets that to the scrape job
AGENT_LABELS = ("org_id", "agent_id", "agent_name")
CONSUMER_LABELS = ("stream", "consumer")
Family = GaugeMetricFamily | CounterMetricFamily


def _timestamp(moment: datetime | None) -> float | None:
    return moment.timestamp() if moment is not None else None


@dataclass
class _LastRun:
    status: str
    duration_ms: int | None
    dump_size: int | None
    artifact_size: int | None


@dataclass
class _Snapshot:
    jobs: list[BackupJob] = field(default_factory=list)
    runs_by_status: dict[tuple[str, str], int] = field(default_factory=dict)
    dump_bytes_total: dict[str, int] = field(default_factory=dict)
    last_finished: dict[str, _LastRun] = field(default_factory=dict)
    last_success: dict[str, _LastRun] = field(default_factory=dict)
    agents: list[tuple[Agent, bool]] = field(default_factory=list)
    consumers: dict[tuple[str, str], tuple[int, int, int]] = field(default_factory=dict)
    database_up: bool = False
    nats_up: bool = False
    refresh_seconds: float = 0.0


class StateCollector:
    """Yields the last snapshot; `refresh` (awaited by the endpoint before rendering) renews it."""

    def __init__(self, offline_after_seconds: int) -> None:
        self.offline_after_seconds = offline_after_seconds
        self.snapshot = _Snapshot()
        self._refreshed_at: float | None = None
        self._lock = asyncio.Lock()

    async def refresh(self, app: FastAPI) -> None:
        if self._fresh():
            return
        async with self._lock:
            if self._fresh():  # another scrape refreshed it while this one waited
                return
            started = time.perf_counter()
            snapshot = _Snapshot()
            try:
                async with app.state.sessionmaker() as session:
                    await self._read_database(session, snapshot)
                snapshot.database_up = True
            except Exception as exc:  # a scrape reports the failure, it never fails the API
                log.warning("metrics.database_unavailable", error=type(exc).__name__)
                snapshot = _Snapshot()
            await self._read_consumers(app, snapshot)
            snapshot.refresh_seconds = time.perf_counter() - started
            self.snapshot = snapshot
            self._refreshed_at = time.monotonic()

    def _fresh(self) -> bool:
        return self._refreshed_at is not None and time.monotonic() - self._refreshed_at < REFRESH_SECONDS

    async def _read_database(self, session: AsyncSession, snapshot: _Snapshot) -> None:
        snapshot.jobs = list((await session.execute(select(BackupJob))).scalars())
        counts = await session.execute(
            select(col(BackupRun.job_id), col(BackupRun.status), func.count())
            .where(col(BackupRun.job_id).is_not(None))
            .group_by(col(BackupRun.job_id), col(BackupRun.status))
        )
        snapshot.runs_by_status = {(str(job), str(status)): int(n) for job, status, n in counts.all()}
        sums = await session.execute(
            select(col(BackupRun.job_id), func.coalesce(func.sum(col(BackupRun.dump_size)), 0))
            .where(col(BackupRun.job_id).is_not(None), col(BackupRun.status).in_(SUCCESS_STATUSES))
            .group_by(col(BackupRun.job_id))
        )
        snapshot.dump_bytes_total = {str(job): int(total or 0) for job, total in sums.all()}
        snapshot.last_finished = await _latest_runs(session, FINISHED_STATUSES)
        snapshot.last_success = await _latest_runs(session, SUCCESS_STATUSES)
        agents = (await session.execute(select(Agent).where(col(Agent.revoked_at).is_(None)))).scalars()
        snapshot.agents = [(agent, is_online(agent, self.offline_after_seconds)) for agent in agents]

    async def _read_consumers(self, app: FastAPI, snapshot: _Snapshot) -> None:
        bus = getattr(app.state, "bus", None)
        if bus is None or not bus.connected:
            return
        try:
            for spec in CONSUMERS:
                info = await bus.js.consumer_info(spec.stream, spec.durable, timeout=NATS_TIMEOUT_SECONDS)
                snapshot.consumers[(spec.stream, spec.durable)] = (
                    int(info.num_pending or 0),
                    int(info.num_ack_pending or 0),
                    int(info.num_redelivered or 0),
                )
            snapshot.nats_up = True
        except Exception as exc:  # e.g. the notifier's consumer was deleted, or NATS timed out
            log.warning("metrics.nats_unavailable", error=type(exc).__name__)

    def describe(self) -> Iterator[Metric]:
        return iter(_families())

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        families = {family.name: family for family in _families()}

        def add(name: str, labels: Iterable[str], value: float | None) -> None:
            if value is not None:
                families[name].add_metric(list(labels), value)

        for job in snap.jobs:
            labels = (job.org_id, job.id, job.name)
            add("rahatback_backup_last_success_timestamp_seconds", labels, _timestamp(job.last_success_at))
            add("rahatback_backup_last_run_timestamp_seconds", labels, _timestamp(job.last_run_at))
            add("rahatback_backup_overdue", labels, 1.0 if job.overdue_since is not None else 0.0)
            add("rahatback_backup_job_enabled", labels, 1.0 if job.enabled else 0.0)
            verified_at = _timestamp(job.last_verify_ok_at)
            add("rahatback_backup_last_verification_timestamp_seconds", labels, verified_at)
            if job.last_verify_status is not None:
                failed = 1.0 if job.last_verify_status == "failed" else 0.0
                add("rahatback_backup_last_verification_failed", labels, failed)
            if job.last_run_status is not None:
                for status in RUN_STATUSES:
                    add(
                        "rahatback_backup_last_run_status",
                        (*labels, status),
                        float(job.last_run_status == status),
                    )
            if (finished := snap.last_finished.get(job.id)) and finished.duration_ms is not None:
                add("rahatback_backup_last_run_duration_seconds", labels, finished.duration_ms / 1000)
            if success := snap.last_success.get(job.id):
                if success.duration_ms is not None:
                    add("rahatback_backup_last_success_duration_seconds", labels, success.duration_ms / 1000)
                add("rahatback_backup_last_success_dump_bytes", labels, success.dump_size)
                add("rahatback_backup_last_success_artifact_bytes", labels, success.artifact_size)
            for status in RUN_STATUSES:
                add("rahatback_backup_runs", (*labels, status), snap.runs_by_status.get((job.id, status), 0))
            add("rahatback_backup_dump_bytes", labels, snap.dump_bytes_total.get(job.id, 0))

        by_state: dict[tuple[str, str], int] = {}
        for agent, online in snap.agents:
            add("rahatback_agent_online", (agent.org_id, agent.id, agent.name), 1.0 if online else 0.0)
            key = (agent.org_id, "online" if online else "offline")
            by_state[key] = by_state.get(key, 0) + 1
        orgs = {org for org, _ in by_state}
        for org in orgs:
            for state in ("online", "offline"):
                add("rahatback_agents", (org, state), by_state.get((org, state), 0))

        for (stream, consumer), (pending, ack_pending, redelivered) in snap.consumers.items():
            add("rahatback_nats_consumer_pending_messages", (stream, consumer), pending)
            add("rahatback_nats_consumer_ack_pending_messages", (stream, consumer), ack_pending)
            add("rahatback_nats_consumer_redelivered_messages", (stream, consumer), redelivered)

        add("rahatback_api_metrics_source_up", ("database",), 1.0 if snap.database_up else 0.0)
        add("rahatback_api_metrics_source_up", ("nats",), 1.0 if snap.nats_up else 0.0)
        add("rahatback_api_metrics_refresh_duration_seconds", (), snap.refresh_seconds)
        return iter(families.values())


async def _latest_runs(session: AsyncSession, statuses: tuple[str, ...]) -> dict[str, _LastRun]:
    """Per job, the most recently finished run with one of `statuses`."""
    rank = (
        func.row_number()
        .over(partition_by=col(BackupRun.job_id), order_by=col(BackupRun.finished_at).desc())
        .label("rank")
    )
    ranked = (
        select(
            col(BackupRun.job_id),
            col(BackupRun.status),
            col(BackupRun.duration_ms),
            col(BackupRun.dump_size),
            col(BackupRun.artifact_size),
            rank,
        )
        .where(
            col(BackupRun.job_id).is_not(None),
            col(BackupRun.status).in_(statuses),
            col(BackupRun.finished_at).is_not(None),
        )
        .subquery()
    )
    rows = await session.execute(select(ranked).where(ranked.c.rank == 1))
    return {
        str(row.job_id): _LastRun(row.status, row.duration_ms, row.dump_size, row.artifact_size)
        for row in rows
    }


def _families() -> list[Family]:
    def gauge(name: str, documentation: str, labels: Iterable[str]) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=list(labels))

    return [
        gauge(
            "rahatback_backup_last_success_timestamp_seconds",
            "When the job's last successful (completed or partial) backup finished; absent until one has",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_run_timestamp_seconds", "When the job's last run was queued", JOB_LABELS
        ),
        gauge(
            "rahatback_backup_last_run_status",
            "1 for the status of the job's last run, 0 for the others",
            (*JOB_LABELS, "status"),
        ),
        gauge(
            "rahatback_backup_last_run_duration_seconds",
            "Duration of the job's last finished run (completed, partial or failed)",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_success_duration_seconds",
            "Duration of the job's last successful run",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_success_dump_bytes",
            "Size of the plain dump of the job's last successful run",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_success_artifact_bytes",
            "Size of the stored (compressed, encrypted) artifact of the job's last successful run",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_verification_timestamp_seconds",
            "When the job's last passed verification ended; absent until one has passed",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_last_verification_failed",
            "1 if the job's most recent verification failed (a backup that may not restore), else 0",
            JOB_LABELS,
        ),
        gauge(
            "rahatback_backup_overdue",
            "1 while the job's scheduled backup is overdue (backup.overdue was published), else 0",
            JOB_LABELS,
        ),
        gauge("rahatback_backup_job_enabled", "1 if the job's schedule is enabled", JOB_LABELS),
        CounterMetricFamily(
            "rahatback_backup_runs",
            "Backup runs recorded for the job, by status (from the database: the same on every replica)",
            labels=[*JOB_LABELS, "status"],
        ),
        CounterMetricFamily(
            "rahatback_backup_dump_bytes",
            "Plain dump bytes of the job's successful runs, summed: its rate is the backup throughput",
            labels=list(JOB_LABELS),
        ),
        gauge(
            "rahatback_agent_online",
            "1 if the (not revoked) agent sent a heartbeat within the offline limit, else 0",
            AGENT_LABELS,
        ),
        gauge("rahatback_agents", "Not revoked agents by state", ("org_id", "state")),
        gauge(
            "rahatback_nats_consumer_pending_messages",
            "Messages in the stream not yet delivered to the durable consumer (its lag)",
            CONSUMER_LABELS,
        ),
        gauge(
            "rahatback_nats_consumer_ack_pending_messages",
            "Messages delivered to the consumer and not acknowledged yet",
            CONSUMER_LABELS,
        ),
        gauge(
            "rahatback_nats_consumer_redelivered_messages",
            "Messages of the consumer delivered more than once and still unacknowledged",
            CONSUMER_LABELS,
        ),
        gauge(
            "rahatback_api_metrics_source_up",
            "1 if the last metrics refresh could read this source (database, nats)",
            ("source",),
        ),
        gauge("rahatback_api_metrics_refresh_duration_seconds", "How long the last metrics refresh took", ()),
    ]


# --- HTTP latency ---------------------------------------------------------------------------------


class HttpMetricsMiddleware:
    """Time to the response's first byte, by route template (never the raw path, which carries ids),
    method and status class. Streaming responses (SSE) count until their headers are sent."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            route = scope.get("route")
            template = getattr(route, "path", None) if route is not None else None
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.histogram.labels(method, template or "unmatched", f"{status // 100}xx").observe(
                time.perf_counter() - started
            )

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            if not observed:  # failed before any response: the server answers 500
                observe(500)


# --- wiring ---------------------------------------------------------------------------------------


# Commands and requests agents refused (forged, expired, replayed…): a security signal, counted as
# this process applied the refusal reports. Process-wide, shown by each app's registry.
COMMAND_REFUSALS = Counter(
    "rahatback_agent_command_refusals",
    "Commands and requests an agent refused, by reason (docs/security.md)",
    ["reason"],
    registry=None,
)


class ApiMetrics:
    def __init__(self, offline_after_seconds: int) -> None:
        # a registry per app: tests build many apps in one process
        self.registry = CollectorRegistry()
        self.registry.register(COMMAND_REFUSALS)
        self.http = Histogram(
            "rahatback_http_request_duration_seconds",
            "HTTP request latency to the first response byte",
            ["method", "route", "status_class"],
            registry=self.registry,
        )
        self.state = StateCollector(offline_after_seconds)
        self.registry.register(self.state)
        ProcessCollector(registry=self.registry)

    async def render(self, app: FastAPI) -> bytes:
        await self.state.refresh(app)
        return generate_latest(self.registry)


router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    api_metrics: ApiMetrics = request.app.state.metrics
    return Response(await api_metrics.render(request.app), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI) -> None:
    """Adds GET /metrics and the latency middleware (outermost, so it times everything inside)."""
    settings = app.state.settings
    app.state.metrics = ApiMetrics(settings.agent_offline_seconds)
    app.add_middleware(HttpMetricsMiddleware, histogram=app.state.metrics.http)
    app.include_router(router)
