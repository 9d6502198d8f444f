"""The three core flows end to end, through the real processes: API, agent, nats-server, PostgreSQL.

enroll → add database → test (good and bad password) → storage → job → run → history with sizes
and checksums → restore into a second database → identical tables → tampered artifact → restore
fails, target unchanged → agent stopped → connection test is 409 at once. Plus: the password never
crosses NATS or JetStream in plaintext, and never appears in responses or logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from scripts.devstack import BIN
from tests.e2e.conftest import Client, stack_logs, table_fingerprint
from tests.servers import PostgresServer

pytestmark = pytest.mark.e2e

SOURCE_DB = "shop"
TARGET_DB = "shop_restored"

SEED_SQL = """
create table customers (id serial primary key, name text not null, email text unique,
                        balance numeric(12,2), joined timestamptz default now(), meta jsonb, photo bytea);
create table orders (id bigserial primary key, customer_id int references customers(id), total numeric(10,2),
                     note text);
create index orders_customer on orders(customer_id);
create view big_spenders as select c.name, sum(o.total) total
  from customers c join orders o on o.customer_id=c.id group by c.name having sum(o.total) > 1000;
insert into customers (name, email, balance, meta, photo)
  select 'Müşteri ' || i || ' ✓', 'c' || i || '@example.com', i * 1.5,
         jsonb_build_object('i', i, 'tags', array['a','b']), decode(md5(i::text), 'hex')
  from generate_series(1, 5000) i;
insert into orders (customer_id, total, note)
  select 1 + (i % 5000), (i % 997) * 1.25, case when i % 7 = 0 then null else repeat('x', i % 50) end
  from generate_series(1, 60000) i;
"""


def read_only_token(client: Client) -> str:
    """A read-only personal access token of the same organization."""
    created = client.ok("POST", "/v1/tokens", {"name": "read-only", "scopes": ["read"], "expires_in_days": 1})
    return str(created["token"])


def wait_status(client: Client, path: str, done: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item: dict[str, Any] = client.ok("GET", path)
        if item["status"] in done:
            return item
        time.sleep(0.3)
    raise AssertionError(f"{path} did not reach {done} in {timeout} s: {item}")


class NatsTap:
    """Records every message on `>` in a background thread for the duration of the test."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bodies: list[bytes] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        nc = await nats.connect(self.url)

        async def record(msg: Any) -> None:
            self.bodies.append(
                msg.subject.encode() + b" " + msg.data + json.dumps(msg.headers or {}).encode()
            )

        await nc.subscribe(">", cb=record)
        self._ready.set()
        while not self._stop.is_set():  # noqa: ASYNC110 - the stop flag is set from another thread
            await asyncio.sleep(0.05)
        await nc.drain()

    def __enter__(self) -> NatsTap:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture(scope="module")
def databases(postgres: PostgresServer) -> PostgresServer:
    for name in (SOURCE_DB, TARGET_DB):
        postgres.psql("postgres", f"drop database if exists {name}")
        postgres.psql("postgres", f"create database {name}")
    postgres.psql(SOURCE_DB, SEED_SQL)
    return postgres


def test_backup_and_restore_postgresql_end_to_end(
    stack: Client, databases: PostgresServer, tmp_path: Path
) -> None:
    pg = databases
    password = pg.password
    agents = stack.ok("GET", "/v1/agents")
    assert len(agents) == 1 and agents[0]["online"] is True and agents[0]["version"]
    agent_id = agents[0]["id"]

    settings = {"host": pg.host, "port": pg.port, "user": pg.user, "database": SOURCE_DB}
    created = stack.call(
        "POST",
        "/v1/databases",
        {
            "name": "shop",
            "engine": "postgresql",
            "agent_id": agent_id,
            "settings": {**settings, "password": password},
        },
    )
    assert created.status_code == 201, created.text
    assert password not in created.text
    source = created.json()
    target = stack.ok(
        "POST",
        "/v1/databases",
        {
            "name": "shop-restored",
            "engine": "postgresql",
            "agent_id": agent_id,
            "settings": {**settings, "database": TARGET_DB, "password": password},
        },
    )

    # connection tests: saved database, and unsaved credentials with a wrong password / unknown database
    good = stack.ok("POST", f"/v1/databases/{source['id']}/test")
    assert good["ok"] is True and good["server_version"].startswith("15") and good["latency_ms"] > 0
    bad = stack.ok(
        "POST",
        "/v1/databases/test-connection",
        {"engine": "postgresql", "settings": {**settings, "password": "wrong-password"}},
    )
    assert bad["ok"] is False and bad["error_code"] == "auth_failed" and "password" in bad["error"]
    unknown = stack.ok(
        "POST",
        "/v1/databases/test-connection",
        {"engine": "postgresql", "settings": {**settings, "database": "nope", "password": password}},
    )
    assert (
        unknown["ok"] is False and unknown["error_code"] == "unknown_database" and "nope" in unknown["error"]
    )

    backups = tmp_path / "backups"
    backups.mkdir()  # the agent refuses to create a missing storage root (an unmounted NAS must fail loudly)
    storage = stack.ok(
        "POST",
        "/v1/storages",
        {"name": "local", "kind": "local", "agent_id": agent_id, "settings": {"path": str(backups)}},
    )
    assert stack.ok("POST", f"/v1/storages/{storage['id']}/test") == {
        "schema_version": 1,
        "ok": True,
        "error_code": None,
        "error": None,
    }
    missing = stack.ok(
        "POST",
        "/v1/storages/test-connection",
        {"kind": "local", "settings": {"path": str(tmp_path / "not-mounted")}},
    )
    assert missing["ok"] is False and missing["error_code"] == "folder_missing"
    assert "not-mounted" in missing["error"]
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {
            "name": "shop-nightly",
            "database_id": source["id"],
            "storage_id": storage["id"],
            "compression": "zstd",
            "compression_level": 3,
            "encryption_enabled": True,
            "cron": "0 3 * * *",
            "timezone": "Europe/Istanbul",
        },
    )

    with NatsTap(stack.stack.nats_url) as tap:
        run = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
        second = stack.call("POST", f"/v1/backups/jobs/{job['id']}/run")
        assert second.status_code == 409, second.text
        run = wait_status(stack, f"/v1/backups/history/{run['id']}", {"completed", "failed"})
    assert run["status"] == "completed", run["error"]
    artifact = backups / run["storage_key"]
    assert artifact.name.endswith(".sql.zst.rbk") and run["storage_key"].startswith("shop/")
    assert run["artifact_size"] == artifact.stat().st_size
    assert run["artifact_sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    assert run["dump_size"] > run["artifact_size"] > 0
    assert run["duration_ms"] is not None and run["started_at"] and run["finished_at"]
    assert (backups / run["manifest_key"]).exists()

    history = stack.ok("GET", f"/v1/backups/history?job_id={job['id']}&status=completed")
    assert [item["id"] for item in history["items"]] == [run["id"]]

    # the password crossed NATS and JetStream only sealed
    assert tap.bodies, "the tap saw no traffic"
    assert not [b for b in tap.bodies if password.encode() in b]
    store = stack.stack.var / "nats"
    assert not [p for p in store.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]

    # restore into the second database: identical tables
    restore = stack.ok("POST", f"/v1/backups/history/{run['id']}/restore", {"database_id": target["id"]})
    restore = wait_status(stack, f"/v1/backups/restores/{restore['id']}", {"completed", "failed"})
    assert restore["status"] == "completed", restore["error"]
    expected = table_fingerprint(pg, SOURCE_DB)
    assert expected["customers"][0] == 5000 and expected["orders"][0] == 60000
    assert table_fingerprint(pg, TARGET_DB) == expected
    assert stack.ok("GET", f"/v1/backups/history/{run['id']}")["last_restore_status"] == "completed"

    # recovery without RahatBack: the exported key and the file are enough
    exported = stack.ok("POST", f"/v1/backups/keys/{run['key_id']}/export")
    read_only_denied = stack.call(
        "POST", f"/v1/backups/keys/{run['key_id']}/export", token=read_only_token(stack)
    )
    assert read_only_denied.status_code == 403
    keyfile = tmp_path / "key"
    keyfile.write_text(exported["key_b64"])
    plain = tmp_path / "dump.sql"
    subprocess.run(
        [str(BIN / "rahatback-agent"), "decrypt", str(artifact), "--key", f"@{keyfile}", "--out", str(plain)],
        check=True,
    )
    assert hashlib.sha256(plain.read_bytes()).hexdigest() == run["dump_sha256"]
    assert b"CREATE TABLE" in plain.read_bytes()

    # a tampered artifact: the restore fails clearly and the target stays exactly as it was
    pg.psql(TARGET_DB, "delete from orders where id > 59000")
    before = table_fingerprint(pg, TARGET_DB)
    original = artifact.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    for damaged, cause in (
        (bytes(data), "authentication"),
        (original[: len(original) * 3 // 5], "truncated"),
    ):
        artifact.write_bytes(damaged)
        bad = stack.ok("POST", f"/v1/backups/history/{run['id']}/restore", {"database_id": target["id"]})
        bad = wait_status(stack, f"/v1/backups/restores/{bad['id']}", {"completed", "failed"})
        assert bad["status"] == "failed"
        assert cause in bad["error"], bad["error"]
        assert table_fingerprint(pg, TARGET_DB) == before
    artifact.write_bytes(original)

    # secrets never in responses or logs
    for path in (
        "/v1/databases",
        f"/v1/databases/{source['id']}",
        "/v1/backups/history",
        f"/v1/backups/jobs/{job['id']}",
    ):
        assert password not in stack.call("GET", path).text
    assert password not in stack_logs(stack.stack.var)

    # agent stopped: the connection test is refused at once
    stack.stack.stop_child("agent")
    started = time.monotonic()
    offline = stack.call("POST", f"/v1/databases/{source['id']}/test")
    assert offline.status_code == 409, offline.text
    assert "offline" in offline.json()["detail"]
    assert time.monotonic() - started < 5

    # a backup requested while the agent is away waits in JetStream, sealed, and runs when it is back
    queued = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    pending = wait_until_stored(stack.stack.var / "nats", queued["id"])
    assert not [p for p in pending if password.encode() in p.read_bytes()]
    stack.stack.start_agent(stack.token)
    queued = wait_status(stack, f"/v1/backups/history/{queued['id']}", {"completed", "failed"})
    assert queued["status"] == "completed", queued["error"]


def wait_until_stored(store: Path, run_id: str) -> list[Path]:
    """The JetStream files while a command for `run_id` is in them (the agent has not taken it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        files = [p for p in store.rglob("*") if p.is_file()]
        if any(run_id.encode() in p.read_bytes() for p in files if "AGENT_COMMANDS" in str(p)):
            return files
        time.sleep(0.2)
    raise AssertionError(f"the command for run {run_id} never reached the AGENT_COMMANDS stream")


def test_sqlite_demo_tour(stack: Client) -> None:
    """`make demo`, against this stack: SQLite backup, restore into a new file, rows identical."""
    env = {**os.environ, "RAHATBACK_VAR_DIR": str(stack.stack.var), "RAHATBACK_API": stack.stack.api}
    tour = subprocess.run(
        [sys.executable, "scripts/demo.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert tour.returncode == 0, tour.stdout + tour.stderr
    assert "1000 rows, restored 1000 rows: identical" in tour.stdout
