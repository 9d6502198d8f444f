"""PostgreSQLEngine against a real PostgreSQL 15: what a user restores is what they backed up."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
from collections.abc import AsyncIterator

import pytest
from rahatback_agent.engines.base import Connection, EngineError
from rahatback_agent.engines.postgresql import PostgreSQLEngine
from rahatback_agent.engines.process import stream_stdout
from rahatback_agent.engines.registry import get_engine

from tests.servers import PostgresServer

pytestmark = pytest.mark.integration

_names = itertools.count()

SOURCE_SCHEMA = r"""
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    note text,
    photo bytea,
    profile jsonb,
    balance numeric(18, 4),
    created_at timestamptz,
    born date
);
CREATE INDEX customers_name_idx ON customers (name);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers (id),
    amount numeric(12, 2),
    placed_at timestamp
);
CREATE SEQUENCE invoice_numbers START 1000;
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
CREATE FUNCTION order_total(c int) RETURNS numeric LANGUAGE sql STABLE
    AS $$ SELECT coalesce(sum(amount), 0) FROM orders WHERE customer_id = c $$;
INSERT INTO customers (name, note, photo, profile, balance, created_at, born) VALUES
    ('Ayşe Yılmaz', 'çok önemli müşteri ✓', '\x00ff10', '{"tier": "gold", "tags": ["a", "ü"]}',
     12345.6789, '2026-11-26 10:00:00+03', '1990-02-28'),
    ('Bob "Tables"; DROP', E'multi\nline\ttext', NULL, NULL, NULL, NULL, NULL),
    ('日本語', '', '\x', '[]', -0.0001, '1970-01-01 00:00:00+00', '2000-01-01');
INSERT INTO customers (name, balance) SELECT 'bulk ' || g, g * 1.5 FROM generate_series(1, 2000) g;
INSERT INTO orders (customer_id, amount, placed_at)
    SELECT (g % 50) + 1, g * 3.25, timestamp '2026-01-01' + g * interval '1 hour'
    FROM generate_series(1, 3000) g;
SELECT nextval('invoice_numbers'), nextval('invoice_numbers');
"""  # noqa: RUF001 - the Turkish dotless i is the point of this unicode test data

TABLES = ("customers", "orders")


def new_db(pg: PostgresServer, schema: str | None = None) -> str:
    name = f"eng_{os.getpid()}_{next(_names)}"
    pg.psql("postgres", f"CREATE DATABASE {name}")
    if schema:
        pg.psql(name, schema)
    return name


def conn_for(
    pg: PostgresServer, database: str | None, password: str | None = None, **extra: object
) -> Connection:
    settings: dict[str, object] = {"host": pg.host, "port": pg.port, "user": pg.user, **extra}
    if database is not None:
        settings["database"] = database
    return Connection(settings=settings, secrets={"password": pg.password if password is None else password})


def fingerprint(pg: PostgresServer, database: str) -> dict[str, str]:
    """Row count and content hash per table, plus the objects a dump must carry along."""
    result = {}
    for table in TABLES:
        exists = pg.psql(database, f"SELECT to_regclass('public.{table}') IS NOT NULL")
        if exists != "t":
            result[table] = "absent"
            continue
        digest = "coalesce(md5(string_agg(t::text, ',' ORDER BY t::text)), '')"
        result[table] = pg.psql(database, f"SELECT count(*) || ':' || {digest} FROM {table} t")  # noqa: S608
    result["objects"] = pg.psql(
        database,
        "SELECT string_agg(relname::text || '/' || relkind::text, ',' ORDER BY relname) FROM pg_class "
        "WHERE relnamespace = 'public'::regnamespace",
    )
    return result


async def collect(engine: PostgreSQLEngine, conn: Connection) -> list[bytes]:
    async with engine.dump(conn) as chunks:
        return [chunk async for chunk in chunks]


async def replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class ArtifactTampered(Exception):
    pass


async def replay_then_fail(chunks: list[bytes], after: int | bytes) -> AsyncIterator[bytes]:
    # `after`: a byte count (usually mid-statement) or a marker to stop right behind, which ends
    # on a complete statement, so psql at EOF would commit what it has: only the kill prevents it
    after_bytes = after if isinstance(after, int) else b"".join(chunks).index(after) + len(after)
    sent = 0
    for chunk in chunks:
        piece = chunk[: max(after_bytes - sent, 0)]
        if piece:
            yield piece
            sent += len(piece)
        if sent >= after_bytes:
            # give psql time to execute what it got, so a missing rollback would show
            await asyncio.sleep(0.3)
            raise ArtifactTampered("chunk 7 failed authentication")


@pytest.fixture(scope="module")
def source_db(postgres: PostgresServer) -> str:
    return new_db(postgres, SOURCE_SCHEMA)


@pytest.fixture(scope="module")
def big_db(postgres: PostgresServer) -> str:
    """About 12 MB of dump: pg_dump is still writing while a test looks at it."""
    return new_db(
        postgres,
        "CREATE TABLE t AS SELECT g, repeat(md5(g::text), 8) AS pad FROM generate_series(1, 40000) g",
    )


@pytest.fixture(scope="module")
async def source_dump(postgres: PostgresServer, source_db: str) -> list[bytes]:
    return await collect(PostgreSQLEngine(), conn_for(postgres, source_db))


async def test_registry_hands_out_the_engines() -> None:
    assert get_engine("postgresql").name == "postgresql"
    assert get_engine("sqlite").name == "sqlite"
    with pytest.raises(EngineError) as err:
        get_engine("oracle")
    assert err.value.code == "bad_settings"
    assert "oracle" in err.value.message


async def test_connection_test_returns_server_version(postgres: PostgresServer, source_db: str) -> None:
    version = await PostgreSQLEngine().test(conn_for(postgres, source_db))
    assert version.startswith("15.")
    assert " " not in version


async def test_wrong_password_is_auth_failed_without_echoing_it(postgres: PostgresServer) -> None:
    wrong = "not-the-Pass-42"
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(conn_for(postgres, "postgres", password=wrong))
    assert err.value.code == "auth_failed"
    assert err.value.message == f'password authentication failed for user "{postgres.user}"'
    assert wrong not in str(err.value)


async def test_closed_port_is_unreachable(postgres: PostgresServer) -> None:
    from tests.servers import free_port

    port = free_port()
    conn = Connection(
        {"host": "127.0.0.1", "port": port, "user": "postgres"}, {"password": postgres.password}
    )
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(conn)
    assert err.value.code == "unreachable"
    assert f"cannot reach 127.0.0.1:{port}" in err.value.message
    assert postgres.password not in err.value.message


async def test_unknown_host_is_unreachable(postgres: PostgresServer) -> None:
    conn = Connection({"host": "no-such-host.invalid", "user": "postgres"}, {"password": postgres.password})
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(conn)
    assert err.value.code == "unreachable"
    assert "no-such-host.invalid:5432" in err.value.message


async def test_unknown_database(postgres: PostgresServer) -> None:
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(conn_for(postgres, "nope_db"))
    assert err.value.code == "unknown_database"
    assert err.value.message == f'database "nope_db" does not exist on {postgres.host}:{postgres.port}'


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"port": 5432, "user": "u"}, "host"),
        ({"host": "h", "user": "u", "port": 70000}, "port"),
        ({"host": "h", "user": "u", "sslmode": "sometimes"}, "sslmode"),
        ({"host": "h"}, "user"),
    ],
)
async def test_bad_settings_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(Connection(settings, {"password": "pw-Never-Shown"}))
    assert err.value.code == "bad_settings"
    assert field in err.value.message


async def test_bad_settings_never_echo_values() -> None:
    # a password typed into the wrong field must not come back in the error
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().test(Connection({"host": "h", "user": "u", "port": "hunter2-secret"}))
    assert err.value.code == "bad_settings"
    assert "hunter2-secret" not in err.value.message


async def test_list_databases_without_choosing_one(postgres: PostgresServer, source_db: str) -> None:
    names = await PostgreSQLEngine().list_databases(conn_for(postgres, None))
    assert source_db in names
    assert "postgres" not in names  # the maintenance database is a system database here
    assert "template0" not in names and "template1" not in names


async def test_dump_then_restore_into_empty_database_is_identical(
    postgres: PostgresServer, source_db: str, source_dump: list[bytes]
) -> None:
    target = new_db(postgres)
    fed = await PostgreSQLEngine().restore(conn_for(postgres, target), replay(source_dump))

    assert fed == sum(map(len, source_dump))
    assert fingerprint(postgres, target) == fingerprint(postgres, source_db)
    assert "absent" not in fingerprint(postgres, target).values()
    # the objects behave, not just exist
    assert postgres.psql(target, "SELECT nextval('invoice_numbers')") == "1002"
    assert postgres.psql(target, "SELECT count(*) FROM big_orders") == postgres.psql(
        source_db, "SELECT count(*) FROM big_orders"
    )
    assert postgres.psql(target, "SELECT order_total(1)") == postgres.psql(source_db, "SELECT order_total(1)")
    assert postgres.psql(target, "SELECT name FROM customers WHERE id = 1") == "Ayşe Yılmaz"  # noqa: RUF001
    assert postgres.psql(target, "SELECT encode(photo, 'hex') FROM customers WHERE id = 1") == "00ff10"
    with pytest.raises(subprocess.CalledProcessError) as refused:
        postgres.psql(target, "INSERT INTO orders (customer_id) VALUES (999999)")
    assert "foreign key" in refused.value.stderr


async def test_dump_is_plain_sql_and_reproducible(postgres: PostgresServer, source_db: str) -> None:
    engine = PostgreSQLEngine(restrict_key_seed=b"agent-identity")
    first = b"".join(await collect(engine, conn_for(postgres, source_db)))
    second = b"".join(await collect(engine, conn_for(postgres, source_db)))
    assert first.startswith(b"--\n-- PostgreSQL database dump")
    assert b"DROP TABLE IF EXISTS" in first
    assert b"OWNER TO" not in first and b"GRANT " not in first
    assert first == second


async def test_dump_streams_in_mebibyte_chunks(postgres: PostgresServer, big_db: str) -> None:
    chunks = await collect(PostgreSQLEngine(), conn_for(postgres, big_db))
    assert len(chunks) > 5
    assert all(len(chunk) == 1 << 20 for chunk in chunks[:-1])


async def test_restore_replaces_existing_tables(
    postgres: PostgresServer, source_db: str, source_dump: list[bytes]
) -> None:
    target = new_db(postgres, SOURCE_SCHEMA)
    postgres.psql(target, "DELETE FROM orders WHERE id > 10; UPDATE customers SET name = 'changed'")
    assert fingerprint(postgres, target) != fingerprint(postgres, source_db)

    await PostgreSQLEngine().restore(conn_for(postgres, target), replay(source_dump))

    assert fingerprint(postgres, target) == fingerprint(postgres, source_db)


@pytest.mark.parametrize(
    "fail_after", [1, 40_000, 150_000, b"DROP TABLE IF EXISTS public.customers;\n", b"\n\\.\n"]
)
async def test_restore_whose_input_fails_leaves_target_exactly_as_it_was(
    postgres: PostgresServer, source_dump: list[bytes], fail_after: int | bytes
) -> None:
    target = new_db(
        postgres,
        "CREATE TABLE customers (id int PRIMARY KEY, name text); INSERT INTO customers VALUES (1, 'keep me')",
    )
    before = fingerprint(postgres, target)
    assert isinstance(fail_after, bytes) or sum(map(len, source_dump)) > fail_after

    with pytest.raises(ArtifactTampered):
        await PostgreSQLEngine().restore(
            conn_for(postgres, target), replay_then_fail(source_dump, fail_after)
        )

    assert fingerprint(postgres, target) == before
    assert postgres.psql(target, "SELECT name FROM customers") == "keep me"
    # psql is gone: no session of it is left holding locks on the target
    assert (
        postgres.psql("postgres", f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{target}'")  # noqa: S608 == "0"
    )


async def test_cancelled_restore_leaves_target_as_it_was(
    postgres: PostgresServer, source_dump: list[bytes]
) -> None:
    target = new_db(postgres, "CREATE TABLE customers (id int); INSERT INTO customers VALUES (7)")
    before = fingerprint(postgres, target)
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield source_dump[0][:60_000]
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(PostgreSQLEngine().restore(conn_for(postgres, target), slow()))
    await started.wait()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fingerprint(postgres, target) == before


async def test_garbage_sql_is_tool_failed_and_target_unchanged(postgres: PostgresServer) -> None:
    target = new_db(postgres, "CREATE TABLE keep (v text); INSERT INTO keep VALUES ('x')")
    before = postgres.psql(target, "SELECT string_agg(v, ',') FROM keep")

    async def garbage() -> AsyncIterator[bytes]:
        yield b"DELETE FROM keep;\nCREATE TABLE half (id int);\n"
        yield b"THIS IS NOT SQL;\n"

    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().restore(conn_for(postgres, target), garbage())
    assert err.value.code == "tool_failed"
    assert "syntax error" in err.value.message
    assert postgres.password not in err.value.message
    assert postgres.psql(target, "SELECT string_agg(v, ',') FROM keep") == before
    assert postgres.psql(target, "SELECT to_regclass('half') IS NULL") == "t"


async def test_restore_with_wrong_password_is_auth_failed(
    postgres: PostgresServer, source_dump: list[bytes]
) -> None:
    target = new_db(postgres)
    with pytest.raises(EngineError) as err:
        await PostgreSQLEngine().restore(
            conn_for(postgres, target, password="Wrong-pw-99"), replay(source_dump)
        )
    assert err.value.code == "auth_failed"
    assert "Wrong-pw-99" not in err.value.message


async def test_dump_of_missing_database_fails_from_the_iterator(postgres: PostgresServer) -> None:
    async with PostgreSQLEngine().dump(conn_for(postgres, "missing_db")) as chunks:
        with pytest.raises(EngineError) as err:
            async for _ in chunks:
                pass
    assert err.value.code == "unknown_database"
    assert '"missing_db"' in err.value.message


async def test_dump_without_database_setting_is_bad_settings(postgres: PostgresServer) -> None:
    with pytest.raises(EngineError) as err:
        async with PostgreSQLEngine().dump(conn_for(postgres, None)):
            pass
    assert err.value.code == "bad_settings"
    assert "database" in err.value.message


async def test_password_stays_out_of_argv_and_in_the_child_env_only(
    postgres: PostgresServer, big_db: str
) -> None:
    engine = PostgreSQLEngine()
    async with engine.dump(conn_for(postgres, big_db)) as chunks:
        first = await anext(aiter(chunks))
        assert first
        children = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit()
            and _parent_of(pid) == os.getpid()
            and b"pg_dump" in _read(f"/proc/{pid}/cmdline")
        ]
        assert len(children) == 1
        cmdline = _read(f"/proc/{children[0]}/cmdline")
        assert postgres.password.encode() not in cmdline
        assert f"PGPASSWORD={postgres.password}".encode() in _read(f"/proc/{children[0]}/environ")
    assert "PGPASSWORD" not in os.environ
    # leaving the context early reaped the child
    assert _state(children[0]) in {"", "X"}


async def test_failed_dump_tool_never_looks_complete() -> None:
    def explain(status: int, stderr: str) -> EngineError:
        return EngineError("tool_failed", f"status {status}: {stderr}")

    script = "printf 'partial output'; echo 'boom, secret-Token-1 leaked' >&2; exit 3"
    async with stream_stdout(
        ["sh", "-c", script], env={}, explain=explain, secrets=["secret-Token-1"]
    ) as chunks:
        received = []
        with pytest.raises(EngineError) as err:
            async for chunk in chunks:
                received.append(chunk)
    assert received == [b"partial output"]
    assert err.value.message == "status 3: boom, *** leaked"


async def test_dump_has_backpressure() -> None:
    """A consumer that stops pulling stalls the tool instead of letting memory grow."""

    def explain(status: int, stderr: str) -> EngineError:
        return EngineError("tool_failed", stderr)

    async with stream_stdout(["head", "-c", "2000000000", "/dev/zero"], env={}, explain=explain) as chunks:
        assert len(await anext(aiter(chunks))) == 1 << 20
        await asyncio.sleep(1)
        children = [
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit()
            and _parent_of(pid) == os.getpid()
            and _read(f"/proc/{pid}/cmdline").startswith(b"head")
        ]
        # without backpressure head would have pushed its 2 GB into our memory and exited by now
        assert len(children) == 1
        assert _state(children[0]) in {"S", "D"}
    assert _state(children[0]) == ""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _stat_fields(pid: str) -> list[str]:
    stat = _read(f"/proc/{pid}/stat").decode()
    return stat.rsplit(")", 1)[1].split() if stat else []


def _parent_of(pid: str) -> int:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else -1


def _state(pid: str) -> str:
    fields = _stat_fields(pid)
    return fields[0] if fields else ""
