"""Two API processes on one PostgreSQL and one nats-server (how Kubernetes runs it): both serve
requests, and every run, report and event is handled exactly once."""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rahatback_api.security.signing import new_signing_key
from rahatback_contracts import messages as m

from scripts.devstack import BIN, Stack, wait_for
from tests.e2e.conftest import Client, sqlite_and_folder, stack_logs
from tests.servers import PostgresServer, free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_apis(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[tuple[Client, str]]:
    name = f"api_{uuid.uuid4().hex[:12]}"
    postgres.psql("postgres", f"CREATE DATABASE {name}")
    stack = Stack(tmp_path_factory.mktemp("two-apis"), api_port=free_port(), nats_port=free_port())
    stack.env.update(
        {
            "RAHATBACK_DATABASE_URL": postgres.dsn(name),
            # outside dev mode nobody migrates at start (`rahatback-api migrate` ran once, as a
            # Kubernetes Job would), so two replicas cannot race each other's migrations
            "RAHATBACK_DEV_MODE": "false",
            "RAHATBACK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
            # both replicas sign commands with the one key the agent pinned at enrollment
            "RAHATBACK_COMMAND_SIGNING_KEY": new_signing_key(),
        }
    )
    try:
        token = stack.start()
        second = f"http://127.0.0.1:{free_port()}"
        port = second.rsplit(":", 1)[1]
        stack.spawn("api2", [str(BIN / "rahatback-api"), "serve", "--host", "127.0.0.1", "--port", port])
        wait_for(second + "/readyz")
        yield Client(stack, token), second
    finally:
        stack.stop()


class Replica:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def ok(self, method: str, path: str, json: Any = None) -> Any:
        r = httpx.request(
            method, self.url + path, json=json, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )
        assert r.status_code < 300, f"{method} {self.url}{path} → {r.status_code} {r.text}"
        return r.json()

    def metric(self, name: str, **labels: str) -> list[float]:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        return [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]


def test_two_api_replicas_serve_requests_and_handle_each_run_once(
    two_apis: tuple[Client, str], tmp_path: Path
) -> None:
    stack, second_url = two_apis
    first, second = Replica(stack.stack.api, stack.token), Replica(second_url, stack.token)

    setup = sqlite_and_folder(second, tmp_path, "shop")  # created through the second replica
    db, storage, folder = setup.database, setup.storage, setup.folder
    body = {"name": "shop", "database_id": db["id"], "storage_id": storage["id"]}
    job = second.ok("POST", "/v1/backups/jobs", body)

    runs = []
    for client in (first, second, first, second):
        run = client.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
        deadline = time.monotonic() + 90
        while (state := client.ok("GET", f"/v1/backups/history/{run['id']}"))["status"] in (
            "queued",
            "running",
        ):
            assert time.monotonic() < deadline, stack_logs(stack.stack.var)[-4000:]
            time.sleep(0.3)
        assert state["status"] == "completed", state
        runs.append(run["id"])

    # both replicas see the same history
    for client in (first, second):
        listed = client.ok("GET", f"/v1/backups/history?job_id={job['id']}")
        assert listed["total"] == 4 and {r["id"] for r in listed["items"]} == set(runs)

    # every run produced exactly one command, one started/completed event each, one artifact
    events = asyncio.run(_events(stack.stack.nats_url))
    counted = Counter((e.type, e.run_id) for e in events if isinstance(e, m.BackupEvent) and e.run_id in runs)
    expected = {(kind, r): 1 for r in runs for kind in ("backup.started", "backup.completed")}
    assert counted == Counter(expected)
    artifacts = [p for p in folder.rglob("*.rbk")]
    assert len(artifacts) == 4

    # the metrics of either replica show the job's last success, scraped after real backups
    for replica in (first, second):
        last = replica.metric("rahatback_backup_last_success_timestamp_seconds", job_id=job["id"])
        assert len(last) == 1 and last[0] > time.time() - 600
        ok = replica.metric("rahatback_backup_last_run_status", job_id=job["id"], status="completed")
        assert ok == [1.0]


async def _events(url: str) -> list[m.DomainEvent]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(">", stream="EVENTS", ordered_consumer=True)
        events: list[m.DomainEvent] = []
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                return events
            events.append(m.parse_event(msg.data))
    finally:
        await nc.close()
