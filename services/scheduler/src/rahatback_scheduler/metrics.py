"""Prometheus metrics of one scheduler process, served on `/metrics` when a port is configured."""

from __future__ import annotations

from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


@dataclass
class Metrics:
    # a registry per instance: several schedulers in one test process must not collide
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    _server: WSGIServer | None = None

    def __post_init__(self) -> None:
        self.fires = Counter(
            "rahatback_scheduler_fires",
            "Scheduled requests stored in CONTROL by this process (a replica's duplicate not counted)",
            ["kind"],
            registry=self.registry,
        )
        self.duplicates = Counter(
            "rahatback_scheduler_duplicate_fires",
            "Fires another replica had already published (deduplicated by Nats-Msg-Id)",
            ["kind"],
            registry=self.registry,
        )
        self.missed = Counter(
            "rahatback_scheduler_missed_fires",
            "Fires reported as missed (scheduler down or NATS unreachable beyond the grace period)",
            ["kind"],
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "rahatback_scheduler_publish_failures",
            "JetStream publish attempts that failed (retried with the same Nats-Msg-Id)",
            registry=self.registry,
        )
        self.invalid = Counter(
            "rahatback_scheduler_invalid_schedules",
            "Schedule entries that could not be read or scheduled (bad JSON, cron or time zone)",
            registry=self.registry,
        )
        self.loaded = Gauge(
            "rahatback_scheduler_schedules_loaded",
            "Enabled, valid schedules this process is timing",
            registry=self.registry,
        )

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics from a daemon thread; returns the bound port (useful with port 0 in tests)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
