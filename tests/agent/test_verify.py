"""Verification: integrity checks and test restores, with row counts taken from the dump's snapshot.

Backups are made with `jobs.run_backup` and verified with `jobs.run_verify`, exactly as the
supervisor runs them (secrets sealed to the agent's key), against real PostgreSQL 15, MariaDB 10.11,
SQLite, local storage and S3 (moto); one test drives the whole exchange through the supervisor over
a real nats-server.
"""

# ruff: noqa: S608, RUF001 - SQL built from names the tests made; the Turkish dotless i is the point

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rahatback_agent import jobs, verification
from rahatback_agent.engines.base import Connection, ScratchDatabases, TableCounts
from rahatback_agent.engines.mysql import DumpRowCounter
from rahatback_agent.engines.postgresql import CopyRowCounter, PostgreSQLEngine
from rahatback_agent.engines.registry import get_engine
from rahatback_agent.identity import generate_private_key, public_key_b64, save_identity
from rahatback_agent.pipeline import Manifest, restore_stream
from rahatback_agent.scratch_registry import ScratchEntry, ScratchRegistry
from rahatback_agent.settings import AgentSettings
from rahatback_agent.supervisor import Supervisor
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import (
    BackupCommand,
    BackupCompleted,
    CancelCommand,
    DatabaseTarget,
    EncryptionSpec,
    StorageTarget,
    TableCheck,
    VerifyCommand,
    VerifyCompleted,
    VerifyFailed,
    seal_info,
)
from rahatback_contracts.sealing import seal

from tests.agent.conftest import AgentHarness, create_agent_consumer, make_identity, running_agent, signed
from tests.servers import MariaDBServer, MotoServer, NatsServer, PostgresServer

pytestmark = pytest.mark.integration

KEY = generate_private_key()
PUBLIC = public_key_b64(KEY)
AGENT = uuid.uuid4().hex
JOB_KEY = secrets.token_bytes(32)
_names = itertools.count()

TargetFactory = Callable[[str], DatabaseTarget]  # seal info -> the database, secrets sealed with it


def now() -> datetime:
    return datetime.now(UTC)


def local(path: Path) -> StorageTarget:
    return StorageTarget(name="local", kind="local", settings={"path": str(path)})


def encryption(info: str, key: bytes = JOB_KEY, public: str = PUBLIC) -> EncryptionSpec:
    return EncryptionSpec(
        enabled=True,
        key_id="job-key-1",
        job_key=seal(public, {"key_b64": base64.b64encode(key).decode()}, info),
    )


def pg_target(pg: PostgresServer, db: str, public: str = PUBLIC) -> TargetFactory:
    def make(info: str) -> DatabaseTarget:
        return DatabaseTarget(
            name=db,
            engine="postgresql",
            settings={"host": pg.host, "port": pg.port, "user": pg.user, "database": db},
            secrets=seal(public, {"password": pg.password}, info),
        )

    return make


def maria_target(m: MariaDBServer, db: str) -> TargetFactory:
    def make(info: str) -> DatabaseTarget:
        return DatabaseTarget(
            name=db,
            engine="mysql",
            settings={"host": m.host, "port": m.port, "user": m.user, "database": db},
            secrets=seal(PUBLIC, {"password": m.password}, info),
        )

    return make


def sqlite_target(path: Path) -> TargetFactory:
    def make(info: str) -> DatabaseTarget:
        return DatabaseTarget(name=path.stem, engine="sqlite", settings={"path": str(path)})

    return make


async def backup(database: TargetFactory, storage: Path, *, encrypted: bool = True) -> BackupCompleted:
    run_id = uuid.uuid4().hex
    info = seal_info("run", run_id)
    command = BackupCommand(
        command_id=uuid.uuid4().hex,
        org_id="org",
        issued_at=now(),
        expires_at=now() + timedelta(minutes=10),
        run_id=run_id,
        job_id="job",
        database=database(info),
        storage=local(storage),
        compression="zstd",
        encryption=encryption(info) if encrypted else EncryptionSpec(enabled=False),
    )
    progress = jobs.ProgressState(kind="backup", run_id=run_id)
    report = await jobs.run_backup(command, agent_id=AGENT, private_key=KEY, progress=progress)
    assert isinstance(report, BackupCompleted), report
    return report


def verify_command(
    done: BackupCompleted,
    storage: StorageTarget,
    level: str = "integrity",
    *,
    database: TargetFactory | None = None,
    scratch_server: TargetFactory | None = None,
    key: bytes | None = JOB_KEY,
    **changes: Any,
) -> VerifyCommand:
    verify_id = uuid.uuid4().hex
    info = seal_info("verify", verify_id)
    command = VerifyCommand(
        command_id=uuid.uuid4().hex,
        org_id="org",
        issued_at=now(),
        expires_at=now() + timedelta(minutes=10),
        verify_id=verify_id,
        backup_run_id=done.run_id,
        level=level,  # type: ignore[arg-type]
        storage=storage,
        storage_key=done.storage_key,
        manifest_key=done.manifest_key,
        compression="zstd",
        encrypted=key is not None,
        artifact_sha256=done.artifact_sha256,
        dump_sha256=done.dump_sha256,
        encryption=encryption(info, key) if key is not None else None,
        database=database(info) if database else None,
        scratch_server=scratch_server(info) if scratch_server else None,
    )
    return command.model_copy(update=changes)


async def run(
    command: VerifyCommand, progress: jobs.ProgressState | None = None
) -> VerifyCompleted | VerifyFailed:
    progress = progress or jobs.ProgressState(kind="verify", run_id=command.verify_id)
    return await jobs.run_verify(command, agent_id=AGENT, private_key=KEY, progress=progress)


async def completed(command: VerifyCommand) -> VerifyCompleted:
    report = await run(command)
    assert isinstance(report, VerifyCompleted), report
    return report


def edit_manifest(storage: Path, done: BackupCompleted, **changes: Any) -> None:
    path = storage / done.manifest_key
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def manifest_of(storage: Path, done: BackupCompleted) -> Manifest:
    return Manifest.from_json((storage / done.manifest_key).read_bytes())


async def dump_of(storage: Path, done: BackupCompleted) -> bytes:
    """The plain dump inside an artifact, as a restore would read it."""

    async def read() -> AsyncIterator[bytes]:
        yield (storage / done.storage_key).read_bytes()

    return b"".join(
        [chunk async for chunk in restore_stream(read(), compression="zstd", job_key_lookup=JOB_KEY)]
    )


# ------------------------------------------------------------------ PostgreSQL

PG_SCHEMA = """
CREATE SCHEMA sales;
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, note text);
INSERT INTO customers (name, note)
    SELECT 'customer ' || g, E'line\\none ' || g FROM generate_series(1, 5000) g;
INSERT INTO customers (name, note) VALUES ('Ayşe Öztürk', 'tab\there');
CREATE TABLE sales."Orders" (id int PRIMARY KEY, customer_id int REFERENCES customers (id), amount numeric);
INSERT INTO sales."Orders" SELECT g, g % 100 + 1, g * 1.5 FROM generate_series(1, 400) g;
CREATE TABLE empty_table (x int);
CREATE TABLE events (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO events SELECT g, date '2025-06-01' + g FROM generate_series(1, 300) g;
CREATE UNLOGGED TABLE cache (k text);
INSERT INTO cache VALUES ('a'), ('b'), ('c');
CREATE MATERIALIZED VIEW customer_count AS SELECT count(*) FROM customers;
CREATE VIEW big_orders AS SELECT * FROM sales."Orders" WHERE amount > 100;
-- values that look like the end of a COPY section, in a table whose name needs quoting
CREATE TABLE sales."Odd""Name(x)" (v text);
INSERT INTO sales."Odd""Name(x)" VALUES ('\\.'), ('a' || chr(10) || '\\.' || chr(10) || 'b'), (''), ('\\'),
    ('COPY x FROM stdin;');
"""

PG_COUNTS = {
    "public.customers": 5001,
    'sales."Orders"': 400,
    "public.empty_table": 0,
    "public.events_2025": 213,  # 2025-06-02 .. 2025-12-31
    "public.events_2026": 87,
    "public.cache": 3,
    'sales."Odd""Name(x)"': 5,
}


def pg_new_db(pg: PostgresServer, schema: str | None = None) -> str:
    name = f"ver_{os.getpid()}_{next(_names)}"
    pg.psql("postgres", f"CREATE DATABASE {name}")
    if schema:
        pg.psql(name, schema)
    return name


def pg_scratch(pg: PostgresServer) -> list[str]:
    out = pg.psql("postgres", r"SELECT datname FROM pg_database WHERE datname LIKE 'rbk\_%' ORDER BY 1")
    return out.splitlines()


def pg_fingerprint(pg: PostgresServer, db: str) -> str:
    """Every table's rows (hashed) and every object of the database: equal = untouched."""
    tables = pg.psql(
        db,
        "SELECT string_agg(format('%I.%I', schemaname, tablename), ' ' ORDER BY 1) FROM pg_tables "
        "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    ).split()
    parts = [
        pg.psql(
            db,
            f"SELECT count(*) || md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {t} t",
        )
        for t in tables
    ]
    objects = "SELECT string_agg(relname::text || relkind::text, ',' ORDER BY relname) FROM pg_class"
    parts.append(pg.psql(db, objects))
    return "|".join(parts)


@pytest.fixture(scope="module")
def pg_source(postgres: PostgresServer) -> str:
    db = pg_new_db(postgres, PG_SCHEMA)
    # guards against a schema typo quietly leaving the interesting cases out
    assert postgres.psql(db, "SELECT count(*) FROM events_2025") == "213"
    return db


@pytest.fixture(autouse=True)
def no_scratch_left_on_postgres(request: pytest.FixtureRequest) -> Any:
    yield
    if "postgres" in request.fixturenames:
        pg = request.getfixturevalue("postgres")
        assert pg_scratch(pg) == [], "a scratch database was left behind"


async def test_postgresql_manifest_has_row_counts_per_table(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    assert manifest_of(tmp_path, done).tables == PG_COUNTS


def copy_rows(dump: bytes, table: bytes) -> int:
    """Rows of `table` in a plain pg_dump: the lines between its COPY and the `\\.` after it."""
    start = dump.index(b"\nCOPY " + table + b" ")
    body = dump[dump.index(b"\n", start + 1) + 1 : dump.index(b"\n\\.\n", start)]
    return 0 if not body else body.count(b"\n") + 1


async def test_postgresql_counter_reads_any_split_and_skips_what_it_is_told(
    postgres: PostgresServer, pg_source: str
) -> None:
    conn = Connection(
        settings={"host": postgres.host, "port": postgres.port, "user": postgres.user, "database": pg_source},
        secrets={"password": postgres.password},
    )
    counts = TableCounts()
    async with PostgreSQLEngine().dump(conn, counts) as chunks:
        dump = b"".join([chunk async for chunk in chunks])
    assert counts.tables == PG_COUNTS
    # fed in pieces cut anywhere (inside `\\.`, COPY lines, rows), it counts the same
    for size in (1, 2, 3, 5, 7, 64, 4093):
        counter = CopyRowCounter()
        for start in range(0, len(dump), size):
            counter.feed(dump[start : start + size])
        assert counter.result() == PG_COUNTS, size
    skipping = CopyRowCounter(skip=frozenset({"public.cache"}))
    skipping.feed(dump)
    assert skipping.result() == {k: v for k, v in PG_COUNTS.items() if k != "public.cache"}
    # a dump cut inside a table's rows gets no counts rather than wrong ones
    cut = CopyRowCounter()
    cut.feed(dump[: dump.index(b"\nCOPY public.customers ") + 500])
    assert cut.result() is None


async def test_postgresql_counts_come_from_the_dumps_own_snapshot_while_rows_pour_in(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    db = pg_new_db(
        postgres,
        "CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz DEFAULT now());"
        "CREATE TABLE padding AS SELECT g, repeat(md5(g::text), 4) AS pad FROM generate_series(1, 100000) g;",
    )
    writer = await asyncpg.connect(postgres.dsn(db))
    stop = asyncio.Event()
    inserted = 0

    async def pour() -> None:
        nonlocal inserted
        while not stop.is_set():
            await writer.execute("INSERT INTO ticks DEFAULT VALUES")  # each its own transaction
            inserted += 1

    pouring = asyncio.create_task(pour())
    try:
        while inserted < 20:  # noqa: ASYNC110 - rows commit before the backup starts, and go on during it
            await asyncio.sleep(0.01)
        done = await backup(pg_target(postgres, db), tmp_path)
        during = inserted
    finally:
        stop.set()
        await pouring
        await writer.close()
    counted = manifest_of(tmp_path, done).tables
    assert counted is not None
    dump = await dump_of(tmp_path, done)
    # the count and pg_dump saw the very same rows, though hundreds were committed around them
    assert counted["public.ticks"] == copy_rows(dump, b"public.ticks")
    assert counted["public.padding"] == 100000 == copy_rows(dump, b"public.padding")
    assert int(postgres.psql(db, "SELECT count(*) FROM ticks")) >= during > counted["public.ticks"]


async def test_integrity_of_a_good_artifact(postgres: PostgresServer, pg_source: str, tmp_path: Path) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    progress = jobs.ProgressState(kind="verify", run_id="v")
    command = verify_command(done, local(tmp_path))
    report = await run(command, progress)
    assert isinstance(report, VerifyCompleted), report
    assert (report.ok, report.error, report.level) == (True, None, "integrity")
    assert (report.artifact_sha256_ok, report.dump_sha256_ok) == (True, True)
    assert report.tables_compared == 0 and report.mismatches == []
    assert report.verify_id == command.verify_id and report.agent_id == AGENT
    assert report.started_at <= report.finished_at
    # the whole artifact went through: its size in, the plain dump out
    assert progress.bytes_in == done.artifact_size and progress.bytes_out == done.dump_size


async def test_integrity_of_a_flipped_bit(postgres: PostgresServer, pg_source: str, tmp_path: Path) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    artifact = tmp_path / done.storage_key
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x04
    artifact.write_bytes(bytes(data))
    report = await completed(verify_command(done, local(tmp_path)))
    assert report.ok is False
    assert report.error is not None
    assert re.search(r"artifact chunk \d+ failed authentication", report.error), report.error
    assert "artifact checksum mismatch" in report.error
    assert report.artifact_sha256_ok is False and report.dump_sha256_ok is None


async def test_integrity_of_a_truncated_artifact(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    artifact = tmp_path / done.storage_key
    artifact.write_bytes(artifact.read_bytes()[:-100])
    report = await completed(verify_command(done, local(tmp_path)))
    assert report.ok is False and report.error is not None
    assert report.error.startswith("artifact is truncated"), report.error
    assert report.artifact_sha256_ok is False


async def test_integrity_without_the_manifest(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    (tmp_path / done.manifest_key).unlink()
    report = await completed(verify_command(done, local(tmp_path)))
    assert report.ok is False
    assert report.error == f"manifest missing at {done.manifest_key}"
    # the artifact itself is fine, and the report says so
    assert (report.artifact_sha256_ok, report.dump_sha256_ok) == (True, True)


async def test_integrity_with_the_wrong_key(postgres: PostgresServer, pg_source: str, tmp_path: Path) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    report = await completed(verify_command(done, local(tmp_path), key=secrets.token_bytes(32)))
    assert report.ok is False and report.error is not None
    assert report.error.startswith("wrong key: the data key could not be unwrapped with key id 'job-key-1'")
    assert report.artifact_sha256_ok is True  # the file is intact: it is the key that is wrong


async def test_integrity_of_a_missing_artifact_and_an_unreachable_storage(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    (tmp_path / done.storage_key).unlink()
    report = await completed(verify_command(done, local(tmp_path)))
    assert (report.ok, report.error) == (False, f"artifact missing at {done.storage_key}")

    # a storage that is not there at all (an unmounted NAS) is no verdict on the backup
    failed = await run(verify_command(done, local(tmp_path / "not-mounted")))
    assert isinstance(failed, VerifyFailed), failed
    assert "does not exist" in failed.error and failed.stage == "downloading"


async def test_a_checksum_that_differs_from_the_recorded_one_is_named(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    report = await completed(verify_command(done, local(tmp_path), dump_sha256="0" * 64))
    assert report.ok is False and report.dump_sha256_ok is False and report.artifact_sha256_ok is True
    assert report.error == (
        "dump checksum mismatch: the restored dump's SHA-256 is not the one the control plane recorded"
    )


async def test_integrity_on_s3(
    postgres: PostgresServer, pg_source: str, s3_server: MotoServer, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    bucket = s3_server.create_bucket()
    client = s3_server.client()
    for key in (done.storage_key, done.manifest_key):
        client.put_object(Bucket=bucket, Key=key, Body=(tmp_path / key).read_bytes())

    def s3(verify_id: str) -> StorageTarget:
        return StorageTarget(
            name="s3",
            kind="s3",
            settings={
                "bucket": bucket,
                "region": s3_server.region,
                "endpoint_url": s3_server.url,
                "path_style": True,
                "access_key_id": s3_server.access_key_id,
            },
            secrets=seal(
                PUBLIC, {"secret_access_key": s3_server.secret_access_key}, seal_info("verify", verify_id)
            ),
        )

    command = verify_command(done, local(tmp_path))
    report = await completed(command.model_copy(update={"storage": s3(command.verify_id)}))
    assert (report.ok, report.artifact_sha256_ok, report.dump_sha256_ok) == (True, True, True), report

    data = bytearray((tmp_path / done.storage_key).read_bytes())
    data[-40] ^= 0x01
    client.put_object(Bucket=bucket, Key=done.storage_key, Body=bytes(data))
    command = verify_command(done, local(tmp_path))
    report = await completed(command.model_copy(update={"storage": s3(command.verify_id)}))
    assert report.ok is False and report.artifact_sha256_ok is False
    assert report.error is not None and "failed authentication" in report.error


async def test_postgresql_test_restore_compares_every_table_and_leaves_the_source_alone(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    before = pg_fingerprint(postgres, pg_source)
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, pg_source))
    )
    assert (report.ok, report.error, report.level) == (True, None, "test_restore")
    assert report.tables_compared == len(PG_COUNTS) and report.mismatches == []
    assert (report.artifact_sha256_ok, report.dump_sha256_ok) == (True, True)
    assert pg_fingerprint(postgres, pg_source) == before


async def test_postgresql_test_restore_on_a_scratch_server(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    report = await completed(
        verify_command(
            done,
            local(tmp_path),
            "test_restore",
            database=pg_target(postgres, pg_source),
            scratch_server=pg_target(postgres, "postgres"),
        )
    )
    assert (report.ok, report.tables_compared) == (True, len(PG_COUNTS)), report


async def test_postgresql_test_restore_names_the_table_with_fewer_rows_than_the_manifest(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    edit_manifest(tmp_path, done, tables={**PG_COUNTS, 'sales."Orders"': 1000, "public.gone": 5})
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, pg_source))
    )
    assert report.ok is False
    assert report.mismatches == [
        TableCheck(table="public.gone", expected=5, found=None),
        TableCheck(table='sales."Orders"', expected=1000, found=400),
    ]
    assert report.tables_compared == len(PG_COUNTS) + 1
    assert report.error == (
        f"row counts differ from the manifest in 2 of {len(PG_COUNTS) + 1} tables: "
        "public.gone (expected 5 rows, table missing), "
        'sales."Orders" (expected 1000 rows, found 400)'
    )
    # the artifact itself matched its checksums: only the rows differ
    assert (report.artifact_sha256_ok, report.dump_sha256_ok) == (True, True)


async def test_postgresql_test_restore_of_a_damaged_artifact_fails_and_drops_the_scratch(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    artifact = tmp_path / done.storage_key
    data = bytearray(artifact.read_bytes())
    data[-30] ^= 0x80  # in the last chunk: psql has loaded most of the dump when it fails
    artifact.write_bytes(bytes(data))
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, pg_source))
    )
    assert report.ok is False and report.error is not None and "failed authentication" in report.error
    assert report.tables_compared == 0


async def test_postgresql_test_restore_that_is_cancelled_drops_the_scratch(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    db = pg_new_db(
        postgres,
        "CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 6) AS pad FROM generate_series(1, 300000) g",
    )
    done = await backup(pg_target(postgres, db), tmp_path)
    command = verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, db))
    progress = jobs.ProgressState(kind="verify", run_id=command.verify_id)
    task = asyncio.create_task(run(command, progress))
    scratch = verification.scratch_name(AGENT, command.verify_id)
    for _ in range(600):  # cancel once psql is loading rows into the scratch database
        if progress.stage == "restoring" and progress.bytes_out > 0 and scratch in pg_scratch(postgres):
            break
        await asyncio.sleep(0.05)
    assert not task.done(), "the verification finished before the cancel: make the database bigger"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pg_scratch(postgres) == []


async def test_leftovers_of_this_agent_are_dropped_at_its_next_test_restore_on_that_server(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    """A killed agent leaves its scratch database behind; credentials arrive only with commands,
    so its next test restore on that server drops it. Another agent's stays theirs."""
    mine = verification.scratch_prefix(AGENT) + "0123456789ab"
    theirs = verification.scratch_prefix(uuid.uuid4().hex) + "0123456789ab"
    for name in (mine, theirs):
        postgres.psql("postgres", f"CREATE DATABASE {name}")
    try:
        done = await backup(pg_target(postgres, pg_source), tmp_path)
        report = await completed(
            verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, pg_source))
        )
        assert report.ok, report
        assert pg_scratch(postgres) == [theirs]
    finally:
        postgres.psql("postgres", f"DROP DATABASE IF EXISTS {theirs}")


async def test_scratch_names_cannot_collide_with_real_ones() -> None:
    name = verification.scratch_name(
        "0123456789abcdef0123456789abcdef", "fedcba98-7654-3210-aaaa-bbbbccccdddd"
    )
    assert name == "rbk_verify_01234567_fedcba987654"
    assert re.fullmatch(r"rbk_verify_[0-9a-f]{8}_[0-9a-f]{12}", verification.scratch_name(AGENT, "not hex!"))


async def test_test_restore_without_the_database_or_of_an_unsupported_engine_cannot_run(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    failed = await run(verify_command(done, local(tmp_path), "test_restore"))
    assert isinstance(failed, VerifyFailed)
    assert failed.error == "a test restore needs the backed-up database's connection; the command has none"

    def mongo(info: str) -> DatabaseTarget:
        return DatabaseTarget(name="m", engine="mongodb", settings={"uri": "mongodb://127.0.0.1:9/x"})

    failed = await run(verify_command(done, local(tmp_path), "test_restore", database=mongo))
    assert isinstance(failed, VerifyFailed)
    assert (
        failed.error
        == "test restores of mongodb databases are not supported yet; verify their integrity instead"
    )


async def test_a_scratch_server_that_refuses_create_database_is_a_failed_verification(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    role = f"nocreate_{os.getpid()}"
    postgres.psql("postgres", f"CREATE ROLE {role} LOGIN PASSWORD '{postgres.password}' NOCREATEDB")
    try:
        done = await backup(pg_target(postgres, pg_source), tmp_path)

        def limited(info: str) -> DatabaseTarget:
            target = pg_target(postgres, pg_source)(info)
            return target.model_copy(update={"settings": {**target.settings, "user": role}})

        failed = await run(verify_command(done, local(tmp_path), "test_restore", database=limited))
        assert isinstance(failed, VerifyFailed), failed
        assert failed.error.startswith(f'user "{role}" may not create databases on ')
        assert failed.stage == "restoring"
    finally:
        postgres.psql("postgres", f"DROP ROLE {role}")


# ------------------------------------------------------------------ SQLite


def make_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT);"
        'CREATE TABLE "odd ""name""" (x);'
        "CREATE TABLE empty (y);"
        "CREATE VIEW v AS SELECT * FROM customers;"
    )
    db.executemany("INSERT INTO customers (name) VALUES (?)", [(f"c{i}';\n",) for i in range(1200)])
    db.executemany('INSERT INTO "odd ""name""" VALUES (?)', [(i,) for i in range(7)])
    db.commit()
    db.close()


SQLITE_COUNTS = {"customers": 1200, 'odd "name"': 7, "empty": 0}


async def test_sqlite_counts_and_test_restore(tmp_path: Path) -> None:
    source = tmp_path / "shop.db"
    make_sqlite(source)
    storage = tmp_path / "storage"
    storage.mkdir()
    done = await backup(sqlite_target(source), storage)
    assert manifest_of(storage, done).tables == SQLITE_COUNTS
    before = source.read_bytes()
    command = verify_command(done, local(storage), "test_restore", database=sqlite_target(source))
    report = await completed(command)
    assert (report.ok, report.tables_compared, report.mismatches) == (True, 3, []), report
    assert source.read_bytes() == before
    scratch = Path(tempfile.gettempdir()) / verification.scratch_name(AGENT, command.verify_id)
    assert not scratch.exists()

    edit_manifest(storage, done, tables={**SQLITE_COUNTS, "customers": 1000, "empty": 0})
    report = await completed(
        verify_command(done, local(storage), "test_restore", database=sqlite_target(source))
    )
    assert report.mismatches == [TableCheck(table="customers", expected=1000, found=1200)]
    assert report.error is not None and "customers (expected 1000 rows, found 1200)" in report.error


async def test_sqlite_leftovers_are_swept_at_start_up(tmp_path: Path) -> None:
    root = Path(tempfile.gettempdir())
    mine = root / (verification.scratch_prefix(AGENT) + "aaaabbbbcccc")
    theirs = root / (verification.scratch_prefix(uuid.uuid4().hex) + "aaaabbbbcccc")
    for folder in (mine, theirs):
        folder.mkdir()
        (folder / "scratch.sqlite").write_bytes(b"left behind")
    try:
        await verification.sweep_local_leftovers(AGENT)
        assert not mine.exists()
        assert (theirs / "scratch.sqlite").exists()
    finally:
        for folder in (mine, theirs):
            if folder.exists():
                (folder / "scratch.sqlite").unlink()
                folder.rmdir()


# ------------------------------------------------------------------ MariaDB

MARIA_SCHEMA = r"""
CREATE TABLE customers (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(200), note TEXT, photo BLOB)
    DEFAULT CHARSET=utf8mb4;
CREATE TABLE orders (id INT PRIMARY KEY, customer_id INT, amount DECIMAL(10, 2),
    FOREIGN KEY (customer_id) REFERENCES customers (id));
CREATE TABLE `we``ird` (id INT PRIMARY KEY, s TEXT, bits BIT(5), doubled INT AS (id * 2) VIRTUAL);
CREATE TABLE empty_table (x INT);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
CREATE SEQUENCE invoice_numbers;
SET SESSION max_recursive_iterations = 100000;
INSERT INTO customers (name, note, photo) VALUES
    ('Ayşe Yılmaz', 'çok önemli ✓ 😀', X'00FF27'),
    ('Bob "Tables"; DROP \\\\ it''s', 'multi\nline ),( \'quoted\' ; \\', NULL),
    ('tail\\', '', X'');
INSERT INTO customers (name, note)
    WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 3000)
    SELECT CONCAT('bulk ''(', n, '),('), REPEAT('x;\\', n % 50) FROM g;
INSERT INTO orders WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 400)
    SELECT n, n % 50 + 1, n * 1.5 FROM g;
INSERT INTO `we``ird` (id, s, bits)
    VALUES (1, 'a''),(''b\\', b'101'), (2, 'x\\''y\n;', NULL), (3, 'tail\\', b'0');
"""

MARIA_COUNTS = {"customers": 3003, "orders": 400, "we`ird": 3, "empty_table": 0}


def maria_new_db(m: MariaDBServer, schema: str | None = None) -> str:
    name = f"ver_{os.getpid()}_{next(_names)}"
    m.sql(None, f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    if schema:
        m.sql(name, schema)
    return name


def maria_scratch(m: MariaDBServer) -> list[str]:
    return m.sql(None, "SHOW DATABASES LIKE 'rbk\\_%'").splitlines()


def maria_fingerprint(m: MariaDBServer, db: str) -> str:
    """Every table's content checksum and every table, view and sequence: equal = untouched."""
    checksums = m.sql(db, "CHECKSUM TABLE customers, orders, `we``ird`, empty_table EXTENDED")
    objects = m.sql(
        None,
        "SELECT GROUP_CONCAT(CONCAT(TABLE_NAME, '/', TABLE_TYPE) ORDER BY 1) FROM information_schema.TABLES "
        f"WHERE TABLE_SCHEMA = '{db}'",
    )
    return f"{checksums}|{objects}"


@pytest.fixture(scope="module")
def maria_source(mariadb: MariaDBServer) -> str:
    db = maria_new_db(mariadb, MARIA_SCHEMA)
    assert mariadb.sql(db, "SELECT COUNT(*) FROM customers") == "3003"
    return db


async def test_mariadb_manifest_counts_rows_from_the_dump_stream(
    mariadb: MariaDBServer, maria_source: str, tmp_path: Path
) -> None:
    done = await backup(maria_target(mariadb, maria_source), tmp_path)
    assert manifest_of(tmp_path, done).tables == MARIA_COUNTS


async def test_mariadb_test_restore(mariadb: MariaDBServer, maria_source: str, tmp_path: Path) -> None:
    done = await backup(maria_target(mariadb, maria_source), tmp_path)
    before = maria_fingerprint(mariadb, maria_source)
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=maria_target(mariadb, maria_source))
    )
    assert (report.ok, report.error, report.tables_compared, report.mismatches) == (True, None, 4, []), report
    assert maria_fingerprint(mariadb, maria_source) == before
    assert maria_scratch(mariadb) == []

    edit_manifest(tmp_path, done, tables={**MARIA_COUNTS, "orders": 1000})
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=maria_target(mariadb, maria_source))
    )
    assert report.ok is False
    assert report.mismatches == [TableCheck(table="orders", expected=1000, found=400)]
    assert (
        report.error
        == "row counts differ from the manifest in 1 of 4 tables: orders (expected 1000 rows, found 400)"
    )
    assert maria_scratch(mariadb) == []


async def test_mariadb_test_restore_of_a_truncated_artifact_drops_the_scratch(
    mariadb: MariaDBServer, maria_source: str, tmp_path: Path
) -> None:
    done = await backup(maria_target(mariadb, maria_source), tmp_path)
    artifact = tmp_path / done.storage_key
    artifact.write_bytes(artifact.read_bytes()[:-50])
    report = await completed(
        verify_command(done, local(tmp_path), "test_restore", database=maria_target(mariadb, maria_source))
    )
    assert (
        report.ok is False and report.error is not None and report.error.startswith("artifact is truncated")
    )
    assert maria_scratch(mariadb) == []


async def test_mariadb_counter_reads_any_split_and_never_guesses(
    mariadb: MariaDBServer, maria_source: str
) -> None:
    from rahatback_agent.engines.base import Connection, TableCounts
    from rahatback_agent.engines.mysql import MySQLEngine

    conn = Connection(
        settings={"host": mariadb.host, "port": mariadb.port, "user": mariadb.user, "database": maria_source},
        secrets={"password": mariadb.password},
    )
    counts = TableCounts()
    async with MySQLEngine().dump(conn, counts) as chunks:
        dump = b"".join([chunk async for chunk in chunks])
    assert counts.tables == MARIA_COUNTS
    # fed in pieces cut anywhere (inside strings, escapes, `);\n`, LOCK lines), it counts the same
    for size in (1, 2, 3, 5, 7, 64, 4093):
        counter = DumpRowCounter()
        for start in range(0, len(dump), size):
            counter.feed(dump[start : start + size])
        assert counter.result() == MARIA_COUNTS, (size, counter.problem)

    # MySQL's own mysqldump writes every row of an INSERT on one line
    one_line = (
        b"LOCK TABLES `t` WRITE;\n/*!40000 ALTER TABLE `t` DISABLE KEYS */;\n"
        b"INSERT INTO `t` VALUES (1,'a\\'),(\\'b'),(2,'c\\\\'),(3,NULL);\n"
        b"INSERT INTO `t` VALUES (4,0x2829);\n/*!40000 ALTER TABLE `t` ENABLE KEYS */;\nUNLOCK TABLES;\n"
    )
    counter = DumpRowCounter()
    counter.feed(one_line)
    assert counter.result() == {"t": 4}

    # a dump it cannot follow gets no counts rather than wrong ones
    for unknown in (
        one_line.replace(b"INSERT INTO `t` VALUES (4", b"INSERT IGNORE INTO `t` VALUES (4"),
        one_line[: one_line.index(b"(2,")],  # ends inside an INSERT
        b"CREATE TABLE `t` (x int);\nINSERT INTO `t` VALUES (1);\n",  # no LOCK TABLES brackets
    ):
        counter = DumpRowCounter()
        counter.feed(unknown)
        assert counter.result() is None and counter.problem


# ------------------------------------------------------------------ through the supervisor, over NATS


def seal_to(agent: AgentHarness, pg: PostgresServer, db: str) -> TargetFactory:
    return pg_target(pg, db, agent.public_key_b64)


async def test_verify_through_the_supervisor_with_progress_cancel_and_reports(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    db = pg_new_db(
        postgres,
        "CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 6) AS pad FROM generate_series(1, 300000) g",
    )
    job_key = secrets.token_bytes(32)
    progress: list[dict[str, Any]] = []
    async with running_agent(nats_server, api_nc, tmp_path) as agent:

        async def on_progress(msg: Msg) -> None:
            progress.append(json.loads(msg.data))

        sub = await api_nc.subscribe(subjects.agent_progress(agent.agent_id), cb=on_progress)
        run_id = uuid.uuid4().hex
        info = seal_info("run", run_id)
        await agent.send_command(
            "job.execute",
            BackupCommand(
                command_id=uuid.uuid4().hex,
                org_id=agent.identity.org_id,
                issued_at=now(),
                expires_at=now() + timedelta(minutes=10),
                run_id=run_id,
                job_id="job",
                database=seal_to(agent, postgres, db)(info),
                storage=local(agent.storage_dir),
                encryption=encryption(info, job_key, agent.public_key_b64),
            ),
        )
        done = BackupCompleted.model_validate(
            await agent.reports.outcome("backup", "completed", "run_id", run_id)
        )

        def command() -> VerifyCommand:
            verify_id = uuid.uuid4().hex
            info = seal_info("verify", verify_id)
            return VerifyCommand(
                command_id=uuid.uuid4().hex,
                org_id=agent.identity.org_id,
                issued_at=now(),
                expires_at=now() + timedelta(minutes=10),
                verify_id=verify_id,
                backup_run_id=run_id,
                level="test_restore",
                storage=local(agent.storage_dir),
                storage_key=done.storage_key,
                manifest_key=done.manifest_key,
                compression="zstd",
                encrypted=True,
                artifact_sha256=done.artifact_sha256,
                dump_sha256=done.dump_sha256,
                encryption=encryption(info, job_key, agent.public_key_b64),
                database=seal_to(agent, postgres, db)(info),
            )

        # one verification is cancelled while it restores
        first = command()
        await agent.send_command("verify.execute", first)
        await agent.reports.outcome("verify", "started", "verify_id", first.verify_id)
        for _ in range(600):
            if any(
                p["run_id"] == first.verify_id and p["stage"] == "restoring" and p["bytes_out"]
                for p in progress
            ):
                break
            await asyncio.sleep(0.05)
        await agent.send_command(
            "job.cancel",
            CancelCommand(
                command_id=uuid.uuid4().hex,
                org_id=agent.identity.org_id,
                issued_at=now(),
                expires_at=now() + timedelta(minutes=5),
                run_id=first.verify_id,
            ),
        )
        _, cancelled = await agent.reports.wait_for(
            lambda s, b: b.get("verify_id") == first.verify_id and not s.endswith(".started")
        )
        if "stage" not in cancelled:
            pytest.fail(
                f"the verification ended before the cancel reached it: make the database bigger ({cancelled})"
            )
        assert cancelled["error"] == "cancelled by user"
        assert cancelled["stage"] == "restoring"
        assert pg_scratch(postgres) == []
        mine = [p for p in progress if p["run_id"] == first.verify_id]
        assert mine and all(p["kind"] == "verify" for p in mine)

        # the next one runs to its end
        second = command()
        await agent.send_command("verify.execute", second)
        report = await agent.reports.outcome("verify", "completed", "verify_id", second.verify_id)
        await sub.unsubscribe()
    assert report["ok"] is True and report["error"] is None, report
    assert (report["level"], report["tables_compared"], report["mismatches"]) == ("test_restore", 1, [])
    assert report["artifact_sha256_ok"] is True and report["dump_sha256_ok"] is True
    # stored once per outcome, under the Msg-Id the API deduplicates by
    js = api_nc.jetstream()
    info = await js.stream_info(streams.AGENT_REPORTS.name)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(streams.AGENT_REPORTS.name, seq)
        if msg.subject and msg.subject.startswith(f"agent.{agent.agent_id}.report.verify."):
            ids.append((msg.subject.rsplit(".", 1)[1], (msg.headers or {}).get("Nats-Msg-Id")))
    assert ids == [
        ("started", f"{first.verify_id}:started"),
        ("failed", f"{first.verify_id}:failed"),
        ("started", f"{second.verify_id}:started"),
        ("completed", f"{second.verify_id}:completed"),
    ]
    assert pg_scratch(postgres) == []


# ------------------------------------------------------------------ a killed agent's scratch databases


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def assert_private_and_sealed(registry: ScratchRegistry, *passwords: str) -> None:
    assert stat.S_IMODE(registry.path.stat().st_mode) == 0o600
    text = registry.path.read_text()
    for password in passwords:
        assert password not in text, "a plaintext password in the scratch registry"


async def leave_scratch(
    registry: ScratchRegistry, target: DatabaseTarget, verify_id: str, agent_id: str, password: str
) -> str:
    """What a test restore does before it is killed: record the scratch database, then create it."""
    name = verification.scratch_name(agent_id, verify_id)
    await registry.add(
        ScratchEntry(verify_id=verify_id, scratch=name, engine=target.engine, server=target, created_at=now())
    )
    engine = get_engine(target.engine)
    assert isinstance(engine, ScratchDatabases)
    await engine.create_scratch(Connection(dict(target.settings), {"password": password}), name)
    return name


def pg_server(pg: PostgresServer, public: str = PUBLIC, port: int | None = None) -> TargetFactory:
    """The server only (`database` = the maintenance database), on another port if given."""

    def make(info: str) -> DatabaseTarget:
        target = pg_target(pg, "postgres", public)(info)
        return target.model_copy(update={"settings": {**target.settings, "port": port or pg.port}})

    return make


async def test_the_scratch_registry_holds_a_test_restore_only_while_its_scratch_database_exists(
    postgres: PostgresServer, pg_source: str, tmp_path: Path
) -> None:
    registry = ScratchRegistry.beside(tmp_path / "agent.json")
    assert registry.path == tmp_path / "agent.scratch.json"
    done = await backup(pg_target(postgres, pg_source), tmp_path)
    command = verify_command(done, local(tmp_path), "test_restore", database=pg_target(postgres, pg_source))
    seen: list[list[ScratchEntry]] = []
    progress = jobs.ProgressState(kind="verify", run_id=command.verify_id)
    task = asyncio.create_task(
        jobs.run_verify(command, agent_id=AGENT, private_key=KEY, progress=progress, registry=registry)
    )
    while not task.done():
        if verification.scratch_name(AGENT, command.verify_id) in pg_scratch(postgres):
            seen.append(registry.load())
        await asyncio.sleep(0.02)
    report = task.result()
    assert isinstance(report, VerifyCompleted) and report.ok, report
    # whenever the scratch database existed, the registry named it, with the server as received
    assert seen, "the scratch database was never seen: the test proves nothing"
    for entries in seen:
        assert [(e.verify_id, e.engine, e.server) for e in entries] == [
            (command.verify_id, "postgresql", command.database)
        ]
    assert registry.load() == []
    assert_private_and_sealed(registry, postgres.password)


async def test_start_up_drops_registered_leftovers_and_keeps_what_it_cannot_reach(
    postgres: PostgresServer, mariadb: MariaDBServer, tmp_path: Path
) -> None:
    registry = ScratchRegistry.beside(tmp_path / "agent.json")
    left: list[str] = []
    for target, password in (
        (pg_server(postgres), postgres.password),
        (maria_target(mariadb, "mysql"), mariadb.password),
    ):
        verify_id = uuid.uuid4().hex
        left.append(
            await leave_scratch(registry, target(seal_info("verify", verify_id)), verify_id, AGENT, password)
        )
    unreachable_id = uuid.uuid4().hex
    unreachable = pg_server(postgres, port=closed_port())(seal_info("verify", unreachable_id))
    await registry.add(
        ScratchEntry(
            verify_id=unreachable_id,
            scratch=verification.scratch_name(AGENT, unreachable_id),
            engine="postgresql",
            server=unreachable,
            created_at=now(),
        )
    )
    assert left[0] in pg_scratch(postgres) and left[1] in maria_scratch(mariadb)
    assert_private_and_sealed(registry, postgres.password, mariadb.password)

    await verification.drop_registered_leftovers(
        registry, agent_id=AGENT, private_key=KEY, timeout_seconds=10
    )

    assert pg_scratch(postgres) == [] and maria_scratch(mariadb) == []
    assert [entry.verify_id for entry in registry.load()] == [unreachable_id]
    # run again: still there, still nothing dropped that is not this agent's
    await verification.drop_registered_leftovers(
        registry, agent_id=AGENT, private_key=KEY, timeout_seconds=10
    )
    assert [entry.verify_id for entry in registry.load()] == [unreachable_id]


async def test_a_killed_agent_drops_its_scratch_database_at_its_next_start(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path
) -> None:
    """SIGKILL mid test-restore: the scratch database and its registry entry stay; the next start
    drops it in the background, while a server that never answers neither blocks start-up nor loses
    its entry."""
    identity = make_identity(nats_server.url)
    await create_agent_consumer(api_nc.jetstream(), identity.agent_id)
    config = tmp_path / "agent.json"
    save_identity(identity, config)
    registry = ScratchRegistry.beside(config)
    db = pg_new_db(
        postgres,
        "CREATE TABLE bulk AS SELECT g, repeat(md5(g::text), 6) AS pad FROM generate_series(1, 300000) g",
    )
    storage = tmp_path / "storage"
    storage.mkdir()
    done = await backup(pg_target(postgres, db), storage, encrypted=False)
    command = verify_command(
        done,
        local(storage),
        "test_restore",
        database=pg_target(postgres, db, identity.public_key_b64),
        key=None,
        # redelivered after the ack wait, it is expired by then and creates nothing
        expires_at=now() + timedelta(seconds=20),
    )
    scratch = verification.scratch_name(identity.agent_id, command.verify_id)

    agent_bin = Path(sys.executable).parent / "rahatback-agent"
    proc = await asyncio.create_subprocess_exec(
        str(agent_bin),
        "run",
        "--config",
        str(config),
        env={**os.environ, "RAHATBACK_AGENT_FETCH_TIMEOUT_SECONDS": "0.5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        subject, body = subjects.agent_command(identity.agent_id, "verify.execute"), command.to_bytes()
        await api_nc.jetstream().publish(subject, body, headers=signed(subject, body))
        for _ in range(600):
            if scratch in pg_scratch(postgres):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the agent never created the scratch database")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    assert scratch in pg_scratch(postgres)
    assert [(e.scratch, e.server) for e in registry.load()] == [(scratch, command.database)]
    assert_private_and_sealed(registry, postgres.password)

    # a server that accepts connections and never answers
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    silent_port = silent.sockets[0].getsockname()[1]
    silent_id = uuid.uuid4().hex
    await registry.add(
        ScratchEntry(
            verify_id=silent_id,
            scratch=verification.scratch_name(identity.agent_id, silent_id),
            engine="postgresql",
            server=pg_server(postgres, identity.public_key_b64, silent_port)(seal_info("verify", silent_id)),
            created_at=now(),
        )
    )

    beats = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        beats.set()

    sub = await api_nc.subscribe(subjects.agent_heartbeat(identity.agent_id), cb=on_beat)
    stop = asyncio.Event()
    settings = AgentSettings(
        config=config, heartbeat_seconds=0.5, fetch_timeout_seconds=0.5, scratch_cleanup_timeout_seconds=600
    )
    task = asyncio.create_task(Supervisor(identity, settings).run(stop))
    try:
        await asyncio.wait_for(beats.wait(), 20)  # online while the silent server still holds its drop
        for _ in range(600):
            if scratch not in pg_scratch(postgres) and len(registry.load()) == 1:
                break
            await asyncio.sleep(0.05)
        assert pg_scratch(postgres) == []
        assert [entry.verify_id for entry in registry.load()] == [silent_id]
        assert held, "the start-up cleanup never tried the silent server"
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sub.unsubscribe()
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    # stopped mid-drop: the entry is kept for the next start
    assert [entry.verify_id for entry in registry.load()] == [silent_id]
