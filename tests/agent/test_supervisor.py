"""The agent supervisor against a real nats-server (JetStream) and a real PostgreSQL 15.

The test plays the API: it creates the streams and the agent's durable consumer, publishes sealed
commands, sends RPC requests and reads reports back out of AGENT_REPORTS.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy, StreamConfig
from rahatback_agent import metrics as agent_metrics
from rahatback_agent.identity import save_identity
from rahatback_agent.pipeline import Manifest
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import (
    BackupCommand,
    CancelCommand,
    DatabaseTarget,
    DbListRequest,
    DbTestRequest,
    EncryptionSpec,
    RestoreCommand,
    StorageTarget,
    StorageTestRequest,
    seal_info,
)
from rahatback_contracts.sealing import seal

from tests.agent.conftest import (
    AgentHarness,
    create_agent_consumer,
    ensure_streams,
    make_identity,
    running_agent,
    signed,
)
from tests.servers import NatsServer, PostgresServer, free_port, start_nats

pytestmark = pytest.mark.integration


def metric(name: str, **labels: str) -> float:
    return agent_metrics.REGISTRY.get_sample_value(name, labels) or 0.0


_names = itertools.count()
WRONG_PASSWORD = "not-the-Right-pw-7731"

SCHEMA = """
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, balance numeric(12, 2));
INSERT INTO customers (name, balance) SELECT 'customer ' || g, g * 1.25 FROM generate_series(1, 5000) g;
INSERT INTO customers (name, balance) VALUES ('Ayşe Öztürk', 42.00);
"""


def new_db(pg: PostgresServer, schema: str | None = None) -> str:
    name = f"sup_{os.getpid()}_{next(_names)}"
    pg.psql("postgres", f"CREATE DATABASE {name}")
    if schema:
        pg.psql(name, schema)
    return name


def rows(pg: PostgresServer, db: str) -> str:
    return pg.psql(
        db,
        "SELECT count(*), md5(string_agg(id || ':' || name || ':' || balance, ',' ORDER BY id))"
        " FROM customers",
    )


def now() -> datetime:
    return datetime.now(UTC)


def db_target(
    pg: PostgresServer, db: str, sealed_to: str, info: str, password: str | None = None
) -> DatabaseTarget:
    return DatabaseTarget(
        name=db,
        engine="postgresql",
        settings={"host": pg.host, "port": pg.port, "user": pg.user, "database": db},
        secrets=seal(sealed_to, {"password": pg.password if password is None else password}, info),
    )


def backup_command(
    agent: AgentHarness,
    pg: PostgresServer,
    db: str,
    job_key: bytes,
    *,
    run_id: str | None = None,
    seal_info_override: str | None = None,
    expires_in: timedelta = timedelta(minutes=10),
) -> BackupCommand:
    run_id = run_id or uuid.uuid4().hex
    info = seal_info_override or seal_info("run", run_id)
    return BackupCommand(
        command_id=uuid.uuid4().hex,
        org_id=agent.identity.org_id,
        issued_at=now(),
        expires_at=now() + expires_in,
        run_id=run_id,
        job_id=uuid.uuid4().hex,
        database=db_target(pg, db, agent.public_key_b64, info),
        storage=StorageTarget(name="local", kind="local", settings={"path": str(agent.storage_dir)}),
        compression="zstd",
        encryption=EncryptionSpec(
            enabled=True,
            key_id="job-key-1",
            job_key=seal(agent.public_key_b64, {"key_b64": base64.b64encode(job_key).decode()}, info),
        ),
    )


def assert_no_secret_leaked(agent: AgentHarness, *needles: str) -> None:
    assert agent.wiretap.messages, "the wiretap saw nothing: the test would prove nothing"
    for needle in needles:
        assert agent.wiretap.contains(needle) == [], (
            f"a secret crossed NATS on {agent.wiretap.contains(needle)}"
        )


async def assert_stream_free_of(nc: NATS, stream: str, *needles: str) -> int:
    js = nc.jetstream()
    info = await js.stream_info(stream)
    checked = 0
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except Exception:  # noqa: S112 - deleted (acked work-queue) messages leave gaps
            continue
        checked += 1
        for needle in needles:
            assert needle.encode() not in (msg.data or b""), f"{stream} seq {seq} holds a secret"
    return checked


# ------------------------------------------------------------------ presence and rpc


async def test_heartbeat_arrives_with_capabilities(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    identity_holder: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        identity_holder.append(json.loads(msg.data))
        got.set()

    sub = await api_nc.subscribe(subjects.ALL_HEARTBEATS, cb=on_beat)
    try:
        async with running_agent(nats_server, api_nc, tmp_path) as agent:
            await asyncio.wait_for(got.wait(), 10)
            mine = [b for b in identity_holder if b["agent_id"] == agent.agent_id]
            assert mine, identity_holder
            beat = mine[0]
            assert beat["version"]
            assert "postgresql" in beat["engines"] and "sqlite" in beat["engines"]
            assert beat["storages"] == ["local", "s3", "gdrive"]
            assert beat["running"] == []
            # it keeps beating
            count = len(mine)
            await asyncio.sleep(1.2)
            assert len([b for b in identity_holder if b["agent_id"] == agent.agent_id]) > count
    finally:
        await sub.unsubscribe()


async def test_db_test_rpc_right_and_wrong_password(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        request_id = uuid.uuid4().hex
        ok = await agent.request(
            "db.test",
            DbTestRequest(
                request_id=request_id,
                database=db_target(postgres, "postgres", agent.public_key_b64, seal_info("rpc", request_id)),
            ),
        )
        assert ok["ok"] is True, ok
        assert ok["server_version"].startswith("15"), ok
        assert ok["latency_ms"] > 0

        request_id = uuid.uuid4().hex
        bad = await agent.request(
            "db.test",
            DbTestRequest(
                request_id=request_id,
                database=db_target(
                    postgres, "postgres", agent.public_key_b64, seal_info("rpc", request_id), WRONG_PASSWORD
                ),
            ),
        )
        assert bad["ok"] is False
        assert bad["error_code"] == "auth_failed", bad
        assert bad["error"]

        # secrets sealed for another request are refused with an answer, not a timeout
        request_id = uuid.uuid4().hex
        replayed = await agent.request(
            "db.test",
            DbTestRequest(
                request_id=request_id,
                database=db_target(postgres, "postgres", agent.public_key_b64, seal_info("rpc", "other")),
            ),
        )
        assert replayed["ok"] is False
        assert "bound to" in replayed["error"], replayed

        # garbage gets a clear answer too, even correctly signed
        subject = subjects.agent_rpc(agent.agent_id, "db.test")
        reply = await agent.nc.request(
            subject, b"{not json", timeout=10, headers=signed(subject, b"{not json")
        )
        assert json.loads(reply.data)["ok"] is False

    assert_no_secret_leaked(agent, postgres.password, WRONG_PASSWORD)


async def test_storage_test_rpc(nats_server: NatsServer, api_nc: NATS, tmp_path: Path) -> None:
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        good = await agent.request(
            "storage.test",
            StorageTestRequest(
                request_id=uuid.uuid4().hex,
                storage=StorageTarget(name="nas", kind="local", settings={"path": str(agent.storage_dir)}),
            ),
        )
        assert good == {"schema_version": 1, "ok": True, "error_code": None, "error": None}
        bad = await agent.request(
            "storage.test",
            StorageTestRequest(
                request_id=uuid.uuid4().hex,
                storage=StorageTarget(name="nas", kind="local", settings={"path": "relative/dir"}),
            ),
        )
        assert bad["ok"] is False and bad["error_code"] == "bad_settings", bad
        incomplete = await agent.request(
            "storage.test",
            StorageTestRequest(
                request_id=uuid.uuid4().hex,
                storage=StorageTarget(name="gd", kind="gdrive", settings={}),
            ),
        )
        assert incomplete["ok"] is False and incomplete["error_code"] == "bad_settings", incomplete
        assert "folder_id" in incomplete["error"]


# ------------------------------------------------------------------ backup and restore


async def test_backup_then_restore_into_another_database(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    target = new_db(postgres)
    job_key = secrets.token_bytes(32)
    finished_before = metric("rahatback_agent_jobs_total", kind="backup", outcome="completed")
    read_before = metric("rahatback_agent_read_bytes_total", kind="backup")
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        command = backup_command(agent, postgres, source, job_key)
        await agent.send_command("job.execute", command)

        started = await agent.reports.outcome("backup", "started", "run_id", command.run_id)
        assert started["agent_id"] == agent.agent_id and started["agent_version"]
        done = await agent.reports.outcome("backup", "completed", "run_id", command.run_id)

        # the artifact is on disk, where the report says, with the reported checksum
        key = done["storage_key"]
        assert key.startswith(f"{source}/{now():%Y}/"), key
        assert key.endswith(f"_{command.run_id}.sql.zst.rbk"), key
        artifact = agent.storage_dir / key
        data = artifact.read_bytes()
        assert len(data) == done["artifact_size"]
        assert hashlib.sha256(data).hexdigest() == done["artifact_sha256"]
        assert SCHEMA.split("'")[1].encode() not in data  # encrypted: no plaintext row content
        manifest = Manifest.from_json((agent.storage_dir / done["manifest_key"]).read_bytes())
        assert done["manifest_key"] == key + ".manifest.json"
        assert manifest.run_id == command.run_id
        assert manifest.artifact_sha256 == done["artifact_sha256"]
        assert manifest.dump_sha256 == done["dump_sha256"]
        assert manifest.encrypted and manifest.key_id == "job-key-1"
        assert done["server_version"].startswith("15")
        assert done["dump_size"] > 100_000
        # the agent's own metrics (RAHATBACK_AGENT_METRICS_PORT) counted it
        await asyncio.sleep(0.2)  # the report is published just after the counters move
        assert metric("rahatback_agent_jobs_total", kind="backup", outcome="completed") == finished_before + 1
        assert metric("rahatback_agent_read_bytes_total", kind="backup") == read_before + done["dump_size"]

        # restore it into the second database
        restore_id = uuid.uuid4().hex
        info = seal_info("restore", restore_id)
        restore = RestoreCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=10),
            restore_id=restore_id,
            backup_run_id=command.run_id,
            database=db_target(postgres, target, agent.public_key_b64, info),
            storage=command.storage,
            storage_key=key,
            compression="zstd",
            encrypted=True,
            artifact_sha256=done["artifact_sha256"],
            dump_sha256=done["dump_sha256"],
            encryption=EncryptionSpec(
                key_id="job-key-1",
                job_key=seal(agent.public_key_b64, {"key_b64": base64.b64encode(job_key).decode()}, info),
            ),
        )
        await agent.send_command("restore.execute", restore)
        await agent.reports.outcome("restore", "started", "restore_id", restore_id)
        restored = await agent.reports.outcome("restore", "completed", "restore_id", restore_id)
        assert restored["bytes_restored"] == done["dump_size"]

    assert rows(postgres, target) == rows(postgres, source)
    assert rows(postgres, target).startswith("5001|")
    # progress is asserted where a backup runs long enough to have any: test_cancel_running_backup

    assert_no_secret_leaked(agent, postgres.password, base64.b64encode(job_key).decode())
    checked = await assert_stream_free_of(
        api_nc, streams.AGENT_REPORTS.name, postgres.password, base64.b64encode(job_key).decode()
    )
    assert checked >= 4


async def test_tampered_artifact_is_refused_and_target_untouched(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    target = new_db(postgres, "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (7);")
    job_key = secrets.token_bytes(32)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        command = backup_command(agent, postgres, source, job_key)
        await agent.send_command("job.execute", command)
        done = await agent.reports.outcome("backup", "completed", "run_id", command.run_id)
        artifact = agent.storage_dir / done["storage_key"]
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0x01
        artifact.write_bytes(bytes(data))

        restore_id = uuid.uuid4().hex
        info = seal_info("restore", restore_id)
        restore = RestoreCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=10),
            restore_id=restore_id,
            backup_run_id=command.run_id,
            database=db_target(postgres, target, agent.public_key_b64, info),
            storage=command.storage,
            storage_key=done["storage_key"],
            compression="zstd",
            encrypted=True,
            encryption=EncryptionSpec(
                key_id="job-key-1",
                job_key=seal(agent.public_key_b64, {"key_b64": base64.b64encode(job_key).decode()}, info),
            ),
        )
        await agent.send_command("restore.execute", restore)
        failed = await agent.reports.outcome("restore", "failed", "restore_id", restore_id)
    assert failed["error"], failed
    assert postgres.psql(target, "SELECT x FROM keep_me") == "7"
    assert postgres.psql(target, "SELECT to_regclass('public.customers') IS NULL") == "t"


async def test_secrets_sealed_for_another_run_are_refused(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        other_run = uuid.uuid4().hex
        command = backup_command(
            agent, postgres, source, secrets.token_bytes(32), seal_info_override=seal_info("run", other_run)
        )
        await agent.send_command("job.execute", command)
        failed = await agent.reports.outcome("backup", "failed", "run_id", command.run_id)
    assert other_run in failed["error"] and "another run" in failed["error"], failed
    assert failed["stage"] == "queued"
    assert list(agent.storage_dir.rglob("*")) == []


async def test_expired_command_is_refused_and_not_run(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        # expired beyond the agent's allowed clock skew (docs/security.md): refused, and reported
        command = backup_command(
            agent, postgres, source, secrets.token_bytes(32), expires_in=timedelta(hours=-1)
        )
        await agent.send_command("job.execute", command)
        refused_on = subjects.agent_command_refused(agent.agent_id)
        _, refused = await agent.reports.wait_for(
            lambda s, b: s == refused_on and b.get("run_id") == command.run_id
        )
        assert refused["reason"] == "expired" and "expired at" in refused["detail"]
        # the command is gone from the work queue, and the backup never started
        await asyncio.sleep(0.5)
        started = [b for s, b in agent.reports.received if s.endswith(".started")]
        assert started == []
    assert list(agent.storage_dir.rglob("*")) == []


async def test_cancel_before_start_and_poison_command(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        # a poison message (correctly signed) is terminated, and the agent keeps working
        subject = subjects.agent_command(agent.agent_id, "job.execute")
        await agent.js.publish(subject, b"{broken", headers=signed(subject, b"{broken"))
        command = backup_command(agent, postgres, source, secrets.token_bytes(32))
        cancel = CancelCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=5),
            run_id=command.run_id,
        )
        await agent.send_command("job.cancel", cancel)
        await agent.send_command("job.execute", command)
        failed = await agent.reports.outcome("backup", "failed", "run_id", command.run_id)
        assert failed["error"] == "cancelled by user"

        # and a normal command after both still runs
        ok = backup_command(agent, postgres, source, secrets.token_bytes(32))
        await agent.send_command("job.execute", ok)
        await agent.reports.outcome("backup", "completed", "run_id", ok.run_id)
    info = await api_nc.jetstream().consumer_info(
        streams.AGENT_COMMANDS.name, streams.agent_commands_consumer(agent.agent_id).durable
    )
    assert info.num_pending == 0 and info.num_ack_pending == 0


@pytest.fixture(scope="session")
def big_db(postgres: PostgresServer) -> str:
    """Big enough (~200 MB dump at zstd level 19) that a backup is still running a moment after it starts."""
    return new_db(
        postgres,
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, balance numeric(12, 2));"
        "INSERT INTO customers (name, balance) SELECT md5(g::text) || repeat('x', 500), g "
        "FROM generate_series(1, 400000) g;",
    )


async def test_cancel_running_backup(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, big_db: str, tmp_path: Path
) -> None:
    source = big_db
    progress: list[dict[str, Any]] = []
    async with running_agent(nats_server, api_nc, tmp_path) as agent:

        async def on_progress(msg: Msg) -> None:
            progress.append(json.loads(msg.data))

        await api_nc.subscribe(subjects.agent_progress(agent.agent_id), cb=on_progress)
        command = backup_command(agent, postgres, source, secrets.token_bytes(32))
        command = command.model_copy(update={"compression_level": 19})
        await agent.send_command("job.execute", command)
        await agent.reports.outcome("backup", "started", "run_id", command.run_id)
        # cancel once bytes are flowing, so this is a cancel in the middle of a dump
        for _ in range(200):
            if any(p["bytes_in"] > 0 for p in progress):
                break
            await asyncio.sleep(0.05)
        cancel = CancelCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now(),
            expires_at=now() + timedelta(minutes=5),
            run_id=command.run_id,
        )
        await agent.send_command("job.cancel", cancel)
        _, body = await agent.reports.wait_for(
            lambda s, b: b.get("run_id") == command.run_id and not s.endswith(".started")
        )
    if "error" not in body:
        pytest.fail(f"the backup finished before the cancel reached it: make the database bigger ({body})")
    assert body["error"] == "cancelled by user"
    assert body["stage"] == "dumping"
    assert max(p["bytes_in"] for p in progress) > 0
    # no partial artifact is left behind
    assert [p for p in agent.storage_dir.rglob("*") if p.is_file()] == []


async def test_drain_deadline_fails_the_running_backup_with_a_reason(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, big_db: str, tmp_path: Path
) -> None:
    async with running_agent(nats_server, api_nc, tmp_path, drain_seconds=0.5) as agent:
        command = backup_command(agent, postgres, big_db, secrets.token_bytes(32))
        command = command.model_copy(update={"compression_level": 19})
        await agent.send_command("job.execute", command)
        await agent.reports.outcome("backup", "started", "run_id", command.run_id)
        await agent.shut_down()
        _, body = await agent.reports.wait_for(
            lambda s, b: b.get("run_id") == command.run_id and not s.endswith(".started")
        )
    assert body.get("error") == "agent shutting down", body
    assert [p for p in agent.storage_dir.rglob("*") if p.is_file()] == []


async def test_drain_lets_a_short_backup_finish(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    source = new_db(postgres, SCHEMA)
    async with running_agent(nats_server, api_nc, tmp_path, drain_seconds=60) as agent:
        command = backup_command(agent, postgres, source, secrets.token_bytes(32))
        await agent.send_command("job.execute", command)
        await agent.reports.outcome("backup", "started", "run_id", command.run_id)
        await agent.shut_down()
        done = await agent.reports.outcome("backup", "completed", "run_id", command.run_id, within=5)
    assert (agent.storage_dir / done["storage_key"]).is_file()


async def test_reports_wait_for_jetstream_and_are_not_lost(tmp_path: Path) -> None:
    """AGENT_REPORTS missing (API not deployed yet / JetStream down): the agent keeps retrying with the
    same Nats-Msg-Id, and the report lands once, when the stream appears."""
    server = start_nats(tmp_path / "nats-private")
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=streams.AGENT_COMMANDS.name,
                subjects=list(streams.AGENT_COMMANDS.subjects),
                retention=RetentionPolicy.WORK_QUEUE,
            )
        )
        storage = tmp_path / "private"
        storage.mkdir()
        async with running_agent(server, nc, storage, reports_ready=False) as agent:
            expired = BackupCommand(
                command_id=uuid.uuid4().hex,
                org_id=agent.identity.org_id,
                issued_at=now(),
                expires_at=now() - timedelta(hours=1),  # well past the allowed clock skew
                run_id=uuid.uuid4().hex,
                job_id="j",
                database=DatabaseTarget(name="d", engine="postgresql", settings={}),
                storage=StorageTarget(name="s", kind="local", settings={"path": str(storage)}),
                encryption=EncryptionSpec(enabled=False),
            )
            await agent.send_command("job.execute", expired)
            await asyncio.sleep(2.0)  # several failed attempts
            await ensure_streams(js)
            await agent.reports.start()
            # an expired command is refused (docs/security.md), and the refusal is a report like any
            refused_on = subjects.agent_command_refused(agent.agent_id)
            _, refused = await agent.reports.wait_for(
                lambda s, b: s == refused_on and b.get("command_id") == expired.command_id, within=30
            )
            assert refused["reason"] == "expired" and refused["run_id"] == expired.run_id
            await asyncio.sleep(1.0)
            copies = [b for s, b in agent.reports.received if b.get("run_id") == expired.run_id]
            assert len(copies) == 1, copies
        await nc.drain()
    finally:
        server.stop()


# ------------------------------------------------------------------ the real process


async def test_real_process_runs_and_drains_on_sigterm(
    nats_server: NatsServer, api_nc: NATS, tmp_path: Path
) -> None:
    identity = make_identity(nats_server.url)
    await create_agent_consumer(api_nc.jetstream(), identity.agent_id)
    config = tmp_path / "agent.json"
    save_identity(identity, config)
    beats: list[bytes] = []
    got = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        beats.append(msg.data)
        got.set()

    sub = await api_nc.subscribe(subjects.agent_heartbeat(identity.agent_id), cb=on_beat)
    agent_bin = Path(sys.executable).parent / "rahatback-agent"
    proc = await asyncio.create_subprocess_exec(
        str(agent_bin),
        "run",
        "--config",
        str(config),
        env={**os.environ, "RAHATBACK_AGENT_HEARTBEAT_SECONDS": "0.5", "RAHATBACK_AGENT_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(got.wait(), 20)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sub.unsubscribe()
    assert proc.returncode == 0, err.decode()
    assert json.loads(beats[0])["agent_id"] == identity.agent_id
    log_lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    events = [line["event"] for line in log_lines]
    assert "connected to nats" in events and "agent stopped" in events, events
    assert identity.x25519_private_key_b64 not in err.decode()


def test_agent_metrics_are_served_over_http_when_asked() -> None:
    port = free_port()
    agent_metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "rahatback_agent_jobs_total" in body and "rahatback_agent_running_jobs" in body


async def test_db_list_rpc_names_the_servers_databases_but_not_system_or_scratch_ones(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    suffix = uuid.uuid4().hex[:8]
    user_db, scratch = f"listed_{suffix}", f"rbk_verify_{suffix}_x"
    for name in (user_db, scratch):
        postgres.psql("postgres", f"create database {name}")
    try:
        async with running_agent(nats_server, api_nc, tmp_path) as agent:
            request_id = uuid.uuid4().hex
            info = seal_info("rpc", request_id)
            listed = await agent.request(
                "db.list",
                DbListRequest(
                    request_id=request_id,
                    database=db_target(postgres, "postgres", agent.public_key_b64, info),
                ),
            )
            assert listed["ok"] is True, listed
            assert user_db in listed["databases"]
            assert scratch not in listed["databases"]  # a test restore in progress is never backed up
            assert "postgres" not in listed["databases"] and "template1" not in listed["databases"]
            assert listed["databases"] == sorted(listed["databases"])

            request_id = uuid.uuid4().hex
            info = seal_info("rpc", request_id)
            refused = await agent.request(
                "db.list",
                DbListRequest(
                    request_id=request_id,
                    database=db_target(postgres, "postgres", agent.public_key_b64, info, WRONG_PASSWORD),
                ),
            )
            assert refused == {**refused, "ok": False, "error_code": "auth_failed", "databases": []}
            assert WRONG_PASSWORD not in json.dumps(refused)
    finally:
        for name in (user_db, scratch):
            postgres.psql("postgres", f"drop database if exists {name}")
