"""What happens when processes stop: reports survive an API outage, stalled runs fail, live events.

Runs its own stack with short presence limits (agent heartbeat 1 s, offline after 4 s) so the
watchdog can be seen acting within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from rahatback_contracts import streams

from scripts.devstack import BIN, Stack
from tests.e2e.conftest import Client
from tests.servers import PostgresServer, free_port

pytestmark = pytest.mark.e2e

SOURCE_DB = "durable"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    var = tmp_path_factory.mktemp("stack")
    stack = Stack(var, api_port=free_port(), nats_port=free_port())
    stack.env.update(RAHATBACK_AGENT_OFFLINE_SECONDS="4", RAHATBACK_AGENT_HEARTBEAT_SECONDS="1")
    try:
        token = stack.start()
        yield Client(stack, token)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def source(
    stack: Client, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A database that takes a few seconds to back up, its job, and the backup folder."""
    postgres.psql("postgres", f"drop database if exists {SOURCE_DB}")
    postgres.psql("postgres", f"create database {SOURCE_DB}")
    postgres.psql(
        SOURCE_DB,
        "create table events as select i id, md5(i::text) || repeat(md5((i * 7)::text), 8) payload, "
        "now() - (i || ' seconds')::interval happened_at from generate_series(1, 1500000) i",
    )
    agent_id = stack.ok("GET", "/v1/agents")[0]["id"]
    db = stack.ok(
        "POST",
        "/v1/databases",
        {
            "name": SOURCE_DB,
            "engine": "postgresql",
            "agent_id": agent_id,
            "settings": {
                "host": postgres.host,
                "port": postgres.port,
                "user": postgres.user,
                "database": SOURCE_DB,
                "password": postgres.password,
            },
        },
    )
    folder = tmp_path_factory.mktemp("backups")
    storage = stack.ok(
        "POST",
        "/v1/storages",
        {"name": "local", "kind": "local", "agent_id": agent_id, "settings": {"path": str(folder)}},
    )
    job = stack.ok(
        "POST", "/v1/backups/jobs", {"name": "durable", "database_id": db["id"], "storage_id": storage["id"]}
    )
    return {"db": db, "job": job, "folder": folder}


def wait_until(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def _stream_messages(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True)
    bodies = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except nats.errors.TimeoutError:
            break
        bodies.append(json.loads(msg.data))
    await nc.close()
    return bodies


def stream_messages(url: str, stream: str, subject: str) -> list[dict[str, Any]]:
    return asyncio.run(_stream_messages(url, stream, subject))


def test_reports_survive_an_api_outage_and_apply_exactly_once(stack: Client, source: dict[str, Any]) -> None:
    run = stack.ok("POST", f"/v1/backups/jobs/{source['job']['id']}/run")
    wait_until(
        lambda: stack.ok("GET", f"/v1/backups/history/{run['id']}")["status"] == "running", 30, "running"
    )

    stack.stack.stop_child("api")
    manifest = wait_until(
        lambda: list(source["folder"].rglob(f"*{run['id']}*.manifest.json")),
        120,
        "the agent to finish the backup while the API is down",
    )
    stack.stack.start_api()

    done = wait_until(
        lambda: (r := stack.ok("GET", f"/v1/backups/history/{run['id']}"))["status"] != "running" and r,
        60,
        "the run to be recorded",
    )
    assert done["status"] == "completed", done["error"]
    assert done["storage_key"] + ".manifest.json" == str(manifest[0].relative_to(source["folder"]))

    # a re-delivered report (same body, new message id: past any dedup) changes nothing
    reports = stream_messages(
        stack.stack.nats_url, streams.AGENT_REPORTS.name, "agent.*.report.backup.completed"
    )
    completed = next(r for r in reports if r["run_id"] == run["id"])
    agent_id = completed["agent_id"]

    async def redeliver() -> None:
        nc = await nats.connect(stack.stack.nats_url)
        await nc.jetstream().publish(
            f"agent.{agent_id}.report.backup.completed",
            json.dumps({**completed, "dump_size": 1}).encode(),
            headers={"Nats-Msg-Id": f"replay-{time.time()}"},
        )
        await nc.close()

    asyncio.run(redeliver())
    time.sleep(2)
    assert stack.ok("GET", f"/v1/backups/history/{run['id']}") == done
    events = stream_messages(stack.stack.nats_url, streams.EVENTS.name, "backup.completed")
    assert [e["run_id"] for e in events].count(run["id"]) == 1


def test_live_events_reach_only_the_callers_organization(stack: Client, source: dict[str, Any]) -> None:
    other = (
        subprocess.run(
            [str(BIN / "rahatback-api"), "create-admin", "--email", "other@example.com", "--org", "Other"],
            env={**stack.stack.env, "RAHATBACK_ADMIN_PASSWORD": "another-password"},
            check=True,
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[-1]
        .rsplit(": ", 1)[-1]
    )
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {"mine": [], "other": []}

    def listen(who: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        # the other organization's stream never ends by itself; it is cut when the stack stops
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream(
                "GET", stack.stack.api + "/v1/events", headers=headers, timeout=httpx.Timeout(60, read=300)
            ) as response,
        ):
            assert response.status_code == 200
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    seen[who].append((event, json.loads(line[6:])))
                    if event == "backup.completed":
                        return

    listeners = [
        threading.Thread(target=listen, args=a, daemon=True)
        for a in (("mine", stack.token), ("other", other))
    ]
    for thread in listeners:
        thread.start()
    time.sleep(1)
    run = stack.ok("POST", f"/v1/backups/jobs/{source['job']['id']}/run")
    listeners[0].join(120)

    mine = [(name, body) for name, body in seen["mine"] if body.get("run_id") == run["id"]]
    # progress is core NATS, straight from the agent, and may overtake the `started` event, which is
    # committed by the API first: compare the lifecycle events among themselves
    lifecycle = [name for name, _ in mine if name != "progress"]
    assert lifecycle == ["backup.started", "backup.completed"]
    progress = [body for name, body in mine if name == "progress"]
    assert progress and progress[-1]["bytes_in"] > 0 and progress[-1]["stage"]
    assert seen["other"] == []


def test_a_killed_agent_fails_its_run_instead_of_leaving_it_running(
    stack: Client, source: dict[str, Any]
) -> None:
    run = stack.ok("POST", f"/v1/backups/jobs/{source['job']['id']}/run")
    wait_until(
        lambda: stack.ok("GET", f"/v1/backups/history/{run['id']}")["status"] == "running", 30, "running"
    )
    agent = stack.stack.children.pop("agent")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()

    failed = wait_until(
        lambda: (r := stack.ok("GET", f"/v1/backups/history/{run['id']}"))["status"] == "failed" and r,
        40,
        "the watchdog to fail the run",
    )
    assert "stopped heartbeating" in failed["error"]
    assert not list(Path(source["folder"]).rglob(f"*{run['id']}*.rbk"))
    stack.stack.start_agent(stack.token)
