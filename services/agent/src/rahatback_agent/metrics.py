"""The agent's own /metrics (off unless RAHATBACK_AGENT_METRICS_PORT is set): what it ran, how it
ended, how many bytes it moved. Labels are bounded (kind, outcome): no run ids, no database names.
The control plane's view of agents (online, last seen) is on the API's /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from rahatback_contracts.messages import (
    BackupCompleted,
    Report,
    RestoreCompleted,
    VerifyCompleted,
)

REGISTRY = CollectorRegistry()

FINISHED = Counter(
    "rahatback_agent_jobs",
    "Backups, restores and verifications this agent finished, by outcome (completed | failed)",
    ["kind", "outcome"],
    registry=REGISTRY,
)
RUNNING = Gauge("rahatback_agent_running_jobs", "Jobs running right now", registry=REGISTRY)
BYTES_READ = Counter(
    "rahatback_agent_read_bytes",
    "Bytes read by finished jobs: dump bytes for backups, artifact bytes for restores and verifications",
    ["kind"],
    registry=REGISTRY,
)
NATS_CONNECTED = Gauge("rahatback_agent_nats_connected", "1 while connected to NATS", registry=REGISTRY)


def record_finished(kind: str, report: Report, bytes_read: int) -> None:
    ok = isinstance(report, BackupCompleted | RestoreCompleted) or (
        isinstance(report, VerifyCompleted) and report.ok
    )
    FINISHED.labels(kind=kind, outcome="completed" if ok else "failed").inc()
    BYTES_READ.labels(kind=kind).inc(bytes_read)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics on `host:port` from a daemon thread."""
    start_http_server(port, addr=host, registry=REGISTRY)
