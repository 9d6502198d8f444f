"""MySQLEngine against a real MariaDB 10.11: what a user restores is what they backed up."""

# ruff: noqa: S608, RUF001 - SQL built from names the tests made; Turkish dotless i is the point of the data

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import secrets
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from nats.aio.client import Client as NATS
from rahatback_agent.engines import mysql as mysql_engine
from rahatback_agent.engines.base import Connection, EngineError
from rahatback_agent.engines.mysql import MySQLEngine, MySQLSettings, MySQLTool, client_options
from rahatback_agent.engines.registry import get_engine
from rahatback_agent.pipeline import Manifest
from rahatback_api.databases.engines import ENGINES as API_ENGINES
from rahatback_contracts.messages import (
    BackupCommand,
    DatabaseTarget,
    EncryptionSpec,
    RestoreCommand,
    StorageTarget,
    seal_info,
)
from rahatback_contracts.sealing import seal

from tests.agent.conftest import running_agent
from tests.servers import MariaDBServer, NatsServer, free_port

pytestmark = pytest.mark.integration

_names = itertools.count()

ALL_BYTES = bytes(range(256))

# One statement per line, except the procedure, whose body needs its own delimiter.
SOURCE_SCHEMA = f"""
SET SESSION max_recursive_iterations = 100000;
CREATE TABLE customers (
    id INT AUTO_INCREMENT PRIMARY KEY,
    name VARCHAR(200) NOT NULL,
    note TEXT,
    photo BLOB,
    balance DECIMAL(18, 4),
    created_at DATETIME(6),
    born DATE,
    profile JSON,
    KEY customers_name_idx (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
CREATE TABLE orders (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    customer_id INT NOT NULL,
    amount DECIMAL(12, 2),
    placed_at TIMESTAMP NULL,
    CONSTRAINT orders_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id)
) ENGINE=InnoDB;
CREATE TABLE bytes (
    b SMALLINT PRIMARY KEY, one VARBINARY(1) NOT NULL, latin VARCHAR(10) CHARACTER SET latin1
);
CREATE TABLE audit (id INT AUTO_INCREMENT PRIMARY KEY, msg VARCHAR(300)) DEFAULT CHARSET=utf8mb4;
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
CREATE VIEW big_order_count AS SELECT COUNT(*) AS n FROM big_orders;
CREATE FUNCTION greeting(who VARCHAR(100)) RETURNS VARCHAR(200) CHARSET utf8mb4 DETERMINISTIC
    RETURN CONCAT('Merhaba, ', who, ' 👋');
CREATE TRIGGER customers_audit AFTER INSERT ON customers FOR EACH ROW
    INSERT INTO audit (msg) VALUES (CONCAT('yeni müşteri: ', NEW.name));
CREATE EVENT nightly_cleanup ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 03:00:00'
    DO DELETE FROM audit WHERE id < 0;
DELIMITER //
CREATE PROCEDURE order_total(IN c INT, OUT total DECIMAL(14, 2))
BEGIN
    DECLARE t DECIMAL(14, 2);
    SELECT COALESCE(SUM(amount), 0) INTO t FROM orders WHERE customer_id = c;
    SET total = t;
END//
DELIMITER ;
INSERT INTO customers (name, note, photo, balance, created_at, born, profile) VALUES
    ('Ayşe Yılmaz', 'çok önemli müşteri ✓ 😀🎉', X'{ALL_BYTES.hex()}', 12345.6789,
     '2026-11-26 10:00:00.123456', '1990-02-28', '{{"tier": "gold", "tags": ["a", "ü"]}}'),
    ('Bob "Tables"; DROP \\\\ it''s', 'multi\\nline\\ttext\\0nul', NULL, NULL, NULL, NULL, NULL),
    ('İĞÜŞÖÇ ığüşöç 日本語', '', X'', -0.0001, '1970-01-01 00:00:01', '2000-01-01', '[]');
INSERT INTO customers (name, balance)
    WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000)
    SELECT CONCAT('bulk ', n), n * 1.5 FROM g;
INSERT INTO orders (customer_id, amount, placed_at)
    WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 3000)
    SELECT (n % 50) + 1, n * 3.25, TIMESTAMP '2026-01-01 00:00:00' + INTERVAL n HOUR FROM g;
INSERT INTO bytes (b, one, latin)
    WITH RECURSIVE g(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM g WHERE n < 255)
    SELECT n, UNHEX(LPAD(HEX(n), 2, '0')), 'ÿéß£' FROM g;
"""

TABLES = ("customers", "orders", "bytes", "audit")


def new_db(m: MariaDBServer, schema: str | None = None, charset: str | None = "utf8mb4") -> str:
    """A database; `charset=None` leaves the server default (latin1 for this server)."""
    name = f"eng_{os.getpid()}_{next(_names)}"
    spec = f" CHARACTER SET {charset}" if charset else ""
    m.sql(None, f"CREATE DATABASE {name}{spec}")
    if schema:
        m.sql(name, schema)
    return name


def conn_for(
    m: MariaDBServer, database: str | None, password: str | None = None, **extra: object
) -> Connection:
    settings: dict[str, object] = {"host": m.host, "port": m.port, "user": m.user, **extra}
    if database is not None:
        settings["database"] = database
    return Connection(settings=settings, secrets={"password": m.password if password is None else password})


def _column_list(m: MariaDBServer, database: str, table: str) -> list[str]:
    out = m.sql(
        None,
        "SELECT COLUMN_NAME FROM information_schema.COLUMNS "
        f"WHERE TABLE_SCHEMA = '{database}' AND TABLE_NAME = '{table}' ORDER BY ORDINAL_POSITION",
    )
    return out.splitlines()


def fingerprint(m: MariaDBServer, database: str) -> dict[str, str]:
    """Per table: row count and a hash of every value's bytes, and its DDL; plus the definitions of
    every view, routine, trigger and event. Equal fingerprints = an identical database."""
    result: dict[str, str] = {}
    for table in TABLES:
        columns = _column_list(m, database, table)
        if not columns:
            result[table] = "absent"
            continue
        row = "MD5(CONCAT_WS('|', " + ", ".join(f"COALESCE(HEX(`{c}`), 'N')" for c in columns) + "))"
        result[table] = m.sql(
            database,
            "SET SESSION group_concat_max_len = 1073741824; "
            f"SELECT CONCAT(COUNT(*), ':', COALESCE(MD5(GROUP_CONCAT({row} ORDER BY {row})), '')) "
            f"FROM `{table}`",
        )
        result[f"{table} ddl"] = m.sql(database, f"SHOW CREATE TABLE `{table}`")
    result["tables"] = m.sql(
        None,
        "SELECT GROUP_CONCAT(CONCAT(TABLE_NAME, '/', TABLE_TYPE) ORDER BY TABLE_NAME) "
        f"FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{database}'",
    )
    for view in m.sql(
        None,
        f"SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = '{database}'",
    ).splitlines():
        result[f"view {view}"] = m.sql(database, f"SHOW CREATE VIEW `{view}`")
    result["routines"] = m.sql(
        None,
        "SELECT GROUP_CONCAT(CONCAT_WS('/', ROUTINE_NAME, ROUTINE_TYPE, MD5(ROUTINE_DEFINITION), "
        "DTD_IDENTIFIER, SQL_MODE, CHARACTER_SET_CLIENT, COLLATION_CONNECTION, DEFINER) "
        "ORDER BY ROUTINE_NAME) "
        f"FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = '{database}'",
    )
    result["triggers"] = m.sql(
        None,
        "SELECT GROUP_CONCAT(CONCAT_WS('/', TRIGGER_NAME, EVENT_OBJECT_TABLE, ACTION_TIMING, "
        "EVENT_MANIPULATION, MD5(ACTION_STATEMENT), SQL_MODE, CHARACTER_SET_CLIENT, DEFINER) "
        f"ORDER BY TRIGGER_NAME) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = '{database}'",
    )
    result["events"] = m.sql(
        None,
        "SELECT GROUP_CONCAT(CONCAT_WS('/', EVENT_NAME, MD5(EVENT_DEFINITION), INTERVAL_VALUE, "
        "INTERVAL_FIELD, STARTS, STATUS, SQL_MODE, DEFINER) ORDER BY EVENT_NAME) "
        f"FROM information_schema.EVENTS WHERE EVENT_SCHEMA = '{database}'",
    )
    return result


def scratch_databases(m: MariaDBServer) -> list[str]:
    return m.sql(None, "SHOW DATABASES LIKE 'rbk\\_%'").splitlines()


async def sessions_on(m: MariaDBServer, database: str) -> int:
    """Sessions using `database`, once closed ones had a moment to go (the server ends them async)."""
    query = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{database}'"
    for _ in range(50):
        if (count := int(m.sql(None, query))) == 0:
            break
        await asyncio.sleep(0.1)
    return count


async def collect(engine: MySQLEngine, conn: Connection) -> list[bytes]:
    async with engine.dump(conn) as chunks:
        return [chunk async for chunk in chunks]


async def replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class ArtifactTampered(Exception):
    pass


async def replay_then_fail(chunks: list[bytes], after: int | bytes) -> AsyncIterator[bytes]:
    # `after`: a byte count (usually mid-statement) or a marker to stop right behind, which ends
    # on a complete statement, so a client that reached EOF would have run everything it got
    after_bytes = after if isinstance(after, int) else b"".join(chunks).index(after) + len(after)
    sent = 0
    for chunk in chunks:
        piece = chunk[: max(after_bytes - sent, 0)]
        if piece:
            yield piece
            sent += len(piece)
        if sent >= after_bytes:
            # give the client time to run what it got, so a half-restored target would show
            await asyncio.sleep(0.3)
            raise ArtifactTampered("chunk 7 failed authentication")


@pytest.fixture(scope="module")
def source_db(mariadb: MariaDBServer) -> str:
    return new_db(mariadb, SOURCE_SCHEMA)


@pytest.fixture(scope="module")
def big_db(mariadb: MariaDBServer) -> str:
    """About 12 MB of dump: mariadb-dump is still writing while a test looks at it."""
    return new_db(
        mariadb,
        "SET SESSION max_recursive_iterations = 100000; CREATE TABLE t (g INT PRIMARY KEY, pad TEXT); "
        "INSERT INTO t WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < 40000) "
        "SELECT g, REPEAT(MD5(g), 8) FROM s",
    )


@pytest.fixture(scope="module")
async def source_dump(mariadb: MariaDBServer, source_db: str) -> list[bytes]:
    return await collect(MySQLEngine(), conn_for(mariadb, source_db))


@pytest.fixture
def no_scratch_left(mariadb: MariaDBServer) -> Iterator[None]:
    yield
    assert scratch_databases(mariadb) == []


def test_source_fixture_holds_what_the_tests_claim(mariadb: MariaDBServer, source_db: str) -> None:
    # guards against a schema typo silently leaving the interesting cases out
    assert mariadb.sql(source_db, "SELECT COUNT(*) FROM customers") == "2003"
    assert mariadb.sql(source_db, "SELECT COUNT(*) FROM audit") == "2003"  # the trigger fired
    assert mariadb.sql(source_db, "SELECT HEX(photo) FROM customers WHERE id = 1") == ALL_BYTES.hex().upper()
    assert mariadb.sql(source_db, "SELECT HEX(GROUP_CONCAT(one ORDER BY b SEPARATOR '')) FROM bytes") == (
        ALL_BYTES.hex().upper()
    )
    assert mariadb.sql(source_db, "SELECT note FROM customers WHERE id = 1") == "çok önemli müşteri ✓ 😀🎉"
    assert mariadb.sql(source_db, "SELECT HEX(note) FROM customers WHERE id = 2") == (
        b"multi\nline\ttext\0nul".hex().upper()
    )
    assert (
        mariadb.sql(source_db, "SELECT HEX(latin) FROM bytes WHERE b = 0")
        == "ÿéß£".encode("cp1252").hex().upper()
    )
    fp = fingerprint(mariadb, source_db)
    assert "absent" not in fp.values()
    assert "order_total/PROCEDURE" in fp["routines"] and "greeting/FUNCTION" in fp["routines"]
    assert fp["triggers"].startswith("customers_audit/customers/AFTER/INSERT")
    assert fp["events"].startswith("nightly_cleanup/")
    assert "big_order_count/VIEW" in fp["tables"] and "big_orders/VIEW" in fp["tables"]


async def test_registry_hands_out_the_engine() -> None:
    assert get_engine("mysql").name == "mysql"
    assert isinstance(get_engine("mysql"), MySQLEngine)


async def test_connection_test_returns_server_version(mariadb: MariaDBServer, source_db: str) -> None:
    version = await MySQLEngine().test(conn_for(mariadb, source_db))
    assert re.fullmatch(r"10\.11\.\d+-MariaDB", version), version


async def test_wrong_password_is_auth_failed_without_echoing_it(mariadb: MariaDBServer) -> None:
    wrong = "not-the-Pass-42"
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(conn_for(mariadb, None, password=wrong))
    assert err.value.code == "auth_failed"
    assert err.value.message.startswith(f'{mariadb.host}:{mariadb.port} refused the login of user "root"')
    assert "Access denied" in err.value.message
    assert wrong not in str(err.value)


async def test_closed_port_is_unreachable(mariadb: MariaDBServer) -> None:
    port = free_port()
    conn = Connection({"host": "127.0.0.1", "port": port, "user": "root"}, {"password": mariadb.password})
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(conn)
    assert err.value.code == "unreachable"
    assert f"cannot reach 127.0.0.1:{port}" in err.value.message
    assert mariadb.password not in err.value.message


async def test_unknown_host_is_unreachable(mariadb: MariaDBServer) -> None:
    conn = Connection({"host": "no-such-host.invalid", "user": "root"}, {"password": mariadb.password})
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(conn)
    assert err.value.code == "unreachable"
    assert "no-such-host.invalid:3306" in err.value.message
    assert "unknown host" in err.value.message


async def test_server_that_never_greets_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(mysql_engine, "CONNECT_TIMEOUT_S", 1)
    try:
        with pytest.raises(EngineError) as err:
            await MySQLEngine().test(Connection({"host": "127.0.0.1", "port": port, "user": "u"}, {}))
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted, "the engine never connected: the test proved nothing"
    assert err.value.code == "timeout"
    assert err.value.message == f"127.0.0.1:{port} did not answer within 1 s"


async def test_unknown_database(mariadb: MariaDBServer) -> None:
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(conn_for(mariadb, "nope_db"))
    assert err.value.code == "unknown_database"
    assert err.value.message == f'database "nope_db" does not exist on {mariadb.host}:{mariadb.port}'


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"port": 3306, "user": "u"}, "host"),
        ({"host": "h", "user": "u", "port": 70000}, "port"),
        ({"host": "h", "user": "u", "ssl_mode": "sometimes"}, "ssl_mode"),
        ({"host": "h"}, "user"),
        ({"host": "h", "user": "u", "database": "x" * 65}, "database"),
        ({"host": "h", "user": "u\x00x"}, "user"),
    ],
)
async def test_bad_settings_name_the_field(settings: dict[str, object], field: str) -> None:
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(Connection(settings, {"password": "pw-Never-Shown"}))
    assert err.value.code == "bad_settings"
    assert field in err.value.message
    assert "pw-Never-Shown" not in err.value.message


async def test_bad_settings_never_echo_values() -> None:
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(Connection({"host": "h", "user": "u", "port": "hunter2-secret"}))
    assert err.value.code == "bad_settings"
    assert "hunter2-secret" not in err.value.message


@pytest.mark.parametrize("mode", ["disabled", "preferred"])
async def test_ssl_modes_that_allow_plain_text_connect(mariadb: MariaDBServer, mode: str) -> None:
    assert (await MySQLEngine().test(conn_for(mariadb, None, ssl_mode=mode))).endswith("-MariaDB")


@pytest.mark.parametrize("mode", ["required", "verify_ca", "verify_identity"])
async def test_ssl_modes_that_need_tls_refuse_a_server_without_it(mariadb: MariaDBServer, mode: str) -> None:
    # this test server has no TLS: the login must not be sent at all
    with pytest.raises(EngineError) as err:
        await MySQLEngine().test(conn_for(mariadb, None, ssl_mode=mode))
    assert err.value.code == "error"
    assert f"does not offer TLS but ssl_mode is '{mode}'" in err.value.message


async def test_required_tls_is_checked_before_a_dump_too(mariadb: MariaDBServer, source_db: str) -> None:
    with pytest.raises(EngineError) as err:
        await collect(MySQLEngine(), conn_for(mariadb, source_db, ssl_mode="required"))
    assert "does not offer TLS" in err.value.message


async def test_list_databases_without_choosing_one(mariadb: MariaDBServer, source_db: str) -> None:
    names = await MySQLEngine().list_databases(conn_for(mariadb, None))
    assert source_db in names
    assert names == sorted(names)
    assert not {"mysql", "information_schema", "performance_schema", "sys"} & set(names)


@pytest.mark.parametrize("target_charset", ["utf8mb4", None], ids=["utf8mb4-target", "latin1-target"])
async def test_dump_then_restore_into_another_database_is_identical(
    mariadb: MariaDBServer,
    source_db: str,
    source_dump: list[bytes],
    target_charset: str | None,
    no_scratch_left: None,
) -> None:
    # latin1 (this server's default): every utf8mb4 table and column must take its charset from the dump
    target = new_db(mariadb, charset=target_charset)
    fed = await MySQLEngine().restore(conn_for(mariadb, target), replay(source_dump))

    assert fed == sum(map(len, source_dump))
    assert fingerprint(mariadb, target) == fingerprint(mariadb, source_db)
    sql = mariadb.sql
    assert sql(target, "SELECT name FROM customers WHERE id = 3") == "İĞÜŞÖÇ ığüşöç 日本語"
    assert sql(target, "SELECT note FROM customers WHERE id = 1") == "çok önemli müşteri ✓ 😀🎉"
    assert sql(target, "SELECT HEX(photo) FROM customers WHERE id = 1") == ALL_BYTES.hex().upper()
    assert sql(target, "SELECT HEX(GROUP_CONCAT(one ORDER BY b SEPARATOR '')) FROM bytes") == (
        ALL_BYTES.hex().upper()
    )
    # the objects behave, not just exist
    assert sql(target, "SELECT n FROM big_order_count") == sql(source_db, "SELECT n FROM big_order_count")
    assert sql(target, "CALL order_total(7, @t); SELECT @t") == sql(
        source_db, "CALL order_total(7, @t); SELECT @t"
    )
    # A routine parameter declared without a character set takes the database's default, as with
    # any restore of a mysqldump (the dump does not say which the source had): docs/mysql-dumps.md
    parameter_charset = sql(
        None,
        "SELECT CHARACTER_SET_NAME FROM information_schema.PARAMETERS "
        f"WHERE SPECIFIC_SCHEMA = '{target}' AND SPECIFIC_NAME = 'greeting' AND PARAMETER_NAME = 'who'",
    )
    if target_charset == "utf8mb4":
        assert parameter_charset == "utf8mb4"
        assert sql(target, "SELECT greeting('Çağrı')") == "Merhaba, Çağrı 👋"
    else:
        assert parameter_charset == "latin1"
    sql(target, "INSERT INTO customers (name) VALUES ('Şule')")
    assert sql(target, "SELECT msg FROM audit ORDER BY id DESC LIMIT 1") == "yeni müşteri: Şule"
    with pytest.raises(subprocess.CalledProcessError) as refused:
        sql(target, "INSERT INTO orders (customer_id) VALUES (999999)")
    assert "foreign key constraint fails" in refused.value.stderr
    assert "rbk_" not in sql(
        None,
        f"SELECT GROUP_CONCAT(TABLE_NAME) FROM information_schema.TABLES WHERE TABLE_SCHEMA = '{target}'",
    )


async def test_dump_is_one_database_in_plain_sql_and_reproducible(
    mariadb: MariaDBServer, source_db: str, source_dump: list[bytes]
) -> None:
    first = b"".join(source_dump)
    second = b"".join(await collect(MySQLEngine(), conn_for(mariadb, source_db)))
    assert first == second
    assert b"-- MariaDB dump" in first[:200]
    assert b"/*!40101 SET NAMES utf8mb4 */" in first
    assert b"DROP TABLE IF EXISTS `customers`" in first
    assert b"TRIGGER customers_audit AFTER INSERT ON customers" in first
    assert b"PROCEDURE `order_total`" in first and b"EVENT `nightly_cleanup`" in first
    assert ("0x" + ALL_BYTES.hex().upper()).encode() in first  # --hex-blob
    # nothing ties the dump to its source database's name
    assert b"CREATE DATABASE" not in first and b"\nUSE " not in first
    statements = b"\n".join(line for line in first.splitlines() if not line.startswith(b"--"))
    assert source_db.encode() in first and source_db.encode() not in statements


async def test_dump_streams_in_mebibyte_chunks(mariadb: MariaDBServer, big_db: str) -> None:
    chunks = await collect(MySQLEngine(), conn_for(mariadb, big_db))
    assert len(chunks) > 5
    assert all(len(chunk) == 1 << 20 for chunk in chunks[:-1])


async def test_restore_replaces_existing_objects_and_keeps_others(
    mariadb: MariaDBServer, source_db: str, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb, SOURCE_SCHEMA)
    mariadb.sql(
        target,
        "DELETE FROM orders WHERE id > 10; UPDATE customers SET name = 'changed'; "
        "CREATE TABLE keep_me (x INT); INSERT INTO keep_me VALUES (7); "
        "DROP VIEW big_order_count; CREATE TABLE big_order_count (n INT); "
        "DROP FUNCTION greeting; "
        "CREATE FUNCTION greeting(who VARCHAR(100)) RETURNS VARCHAR(200) RETURN 'old'",
    )
    assert fingerprint(mariadb, target) != fingerprint(mariadb, source_db)

    await MySQLEngine().restore(conn_for(mariadb, target), replay(source_dump))

    restored = fingerprint(mariadb, target)
    expected = fingerprint(mariadb, source_db)
    # keep_me was not in the dump: it stays, and is the only difference
    assert restored.pop("tables") == expected.pop("tables").replace(",orders/", ",keep_me/BASE TABLE,orders/")
    assert restored == expected
    assert mariadb.sql(target, "SELECT x FROM keep_me") == "7"
    assert mariadb.sql(target, "SELECT greeting('x')") == "Merhaba, x 👋"


async def test_restore_refuses_to_strand_a_foreign_key_of_a_table_not_in_the_dump(
    mariadb: MariaDBServer, source_db: str, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb, SOURCE_SCHEMA)
    mariadb.sql(
        target,
        "CREATE TABLE invoices (id INT PRIMARY KEY, customer_id INT, "
        "CONSTRAINT invoices_customer_fk FOREIGN KEY (customer_id) REFERENCES customers (id)); "
        "INSERT INTO invoices VALUES (1, 1); DELETE FROM orders",
    )
    before = fingerprint(mariadb, target)
    with pytest.raises(EngineError) as err:
        await MySQLEngine().restore(conn_for(mariadb, target), replay(source_dump))
    assert err.value.code == "error"
    assert err.value.message == (
        f"restore into {target} failed; the target is unchanged: table invoices is not in the backup but "
        "its foreign key invoices_customer_fk references customers, which the restore replaces; "
        "drop that key or table first"
    )
    assert fingerprint(mariadb, target) == before


async def test_restore_of_an_empty_database_dump(mariadb: MariaDBServer, no_scratch_left: None) -> None:
    empty = new_db(mariadb)
    dump = await collect(MySQLEngine(), conn_for(mariadb, empty))
    target = new_db(mariadb, "CREATE TABLE keep_me (x INT); INSERT INTO keep_me VALUES (1)")
    assert await MySQLEngine().restore(conn_for(mariadb, target), replay(dump)) == sum(map(len, dump))
    assert mariadb.sql(target, "SELECT x FROM keep_me") == "1"


@pytest.mark.parametrize(
    "fail_after",
    [
        1,
        40_000,
        150_000,
        b"UNLOCK TABLES;\n",  # the first table's data complete
        b"DELIMITER ;\n/*!50106 SET TIME_ZONE= @save_time_zone */ ;\n",  # tables and events done
        b"/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;\n",  # every statement of the dump is in
    ],
)
async def test_restore_whose_input_fails_leaves_target_exactly_as_it_was(
    mariadb: MariaDBServer, source_dump: list[bytes], fail_after: int | bytes, no_scratch_left: None
) -> None:
    target = new_db(
        mariadb,
        "CREATE TABLE customers (id INT PRIMARY KEY, name TEXT); INSERT INTO customers VALUES (1, 'keep me')",
    )
    before = fingerprint(mariadb, target)
    assert isinstance(fail_after, bytes) or sum(map(len, source_dump)) > fail_after

    with pytest.raises(ArtifactTampered):
        await MySQLEngine().restore(conn_for(mariadb, target), replay_then_fail(source_dump, fail_after))

    assert fingerprint(mariadb, target) == before
    assert mariadb.sql(target, "SELECT name FROM customers") == "keep me"
    assert await sessions_on(mariadb, target) == 0


async def test_cancelled_restore_leaves_target_as_it_was(
    mariadb: MariaDBServer, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb, "CREATE TABLE customers (id INT); INSERT INTO customers VALUES (7)")
    before = fingerprint(mariadb, target)
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield source_dump[0][:60_000]
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(MySQLEngine().restore(conn_for(mariadb, target), slow()))
    await started.wait()
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fingerprint(mariadb, target) == before


async def test_garbage_sql_is_tool_failed_and_target_unchanged(
    mariadb: MariaDBServer, no_scratch_left: None
) -> None:
    target = new_db(mariadb, "CREATE TABLE keep (v TEXT); INSERT INTO keep VALUES ('x')")

    async def garbage() -> AsyncIterator[bytes]:
        yield b"DROP TABLE IF EXISTS keep;\nCREATE TABLE keep (other INT);\nCREATE TABLE half (id INT);\n"
        yield b"THIS IS NOT SQL;\n"

    with pytest.raises(EngineError) as err:
        await MySQLEngine().restore(conn_for(mariadb, target), garbage())
    assert err.value.code == "tool_failed"
    assert "You have an error in your SQL syntax" in err.value.message
    assert mariadb.password not in err.value.message
    assert mariadb.sql(target, "SELECT v FROM keep") == "x"
    assert mariadb.sql(target, "SHOW TABLES") == "keep"


async def test_restore_with_wrong_password_is_auth_failed(
    mariadb: MariaDBServer, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb)
    with pytest.raises(EngineError) as err:
        await MySQLEngine().restore(conn_for(mariadb, target, password="Wrong-pw-99"), replay(source_dump))
    assert err.value.code == "auth_failed"
    assert "Wrong-pw-99" not in err.value.message


async def test_restore_into_a_missing_database_is_unknown_database(
    mariadb: MariaDBServer, source_dump: list[bytes], no_scratch_left: None
) -> None:
    with pytest.raises(EngineError) as err:
        await MySQLEngine().restore(conn_for(mariadb, "missing_target"), replay(source_dump))
    assert err.value.code == "unknown_database"
    assert '"missing_target"' in err.value.message


async def test_restore_by_a_user_who_may_not_create_databases_fails_clearly(
    mariadb: MariaDBServer, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb, "CREATE TABLE keep (v INT); INSERT INTO keep VALUES (5)")
    user = f"limited_{next(_names)}"
    mariadb.sql(None, f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'Limited-pw-1'")
    mariadb.sql(None, f"GRANT ALL ON `{target}`.* TO '{user}'@'127.0.0.1'")
    conn = Connection(
        {"host": mariadb.host, "port": mariadb.port, "user": user, "database": target},
        {"password": "Limited-pw-1"},
    )
    with pytest.raises(EngineError) as err:
        await MySQLEngine().restore(conn, replay(source_dump))
    assert err.value.code == "auth_failed"
    assert "needs CREATE and DROP on databases named rbk_%" in err.value.message
    assert mariadb.sql(target, "SELECT v FROM keep") == "5"


async def test_dump_of_missing_database_fails_from_the_iterator(mariadb: MariaDBServer) -> None:
    async with MySQLEngine().dump(conn_for(mariadb, "missing_db")) as chunks:
        with pytest.raises(EngineError) as err:
            async for _ in chunks:
                pass
    assert err.value.code == "unknown_database"
    assert '"missing_db"' in err.value.message


async def test_dump_with_wrong_password_fails_from_the_iterator(
    mariadb: MariaDBServer, source_db: str
) -> None:
    async with MySQLEngine().dump(conn_for(mariadb, source_db, password="Wrong-pw-98")) as chunks:
        with pytest.raises(EngineError) as err:
            async for _ in chunks:
                pass
    assert err.value.code == "auth_failed"
    assert "Wrong-pw-98" not in err.value.message


async def test_dump_without_database_setting_is_bad_settings(mariadb: MariaDBServer) -> None:
    with pytest.raises(EngineError) as err:
        async with MySQLEngine().dump(conn_for(mariadb, None)):
            pass
    assert err.value.code == "bad_settings"
    assert "database" in err.value.message


# ------------------------------------------------------------------ the password and the tools


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _children_running(tool: str) -> list[str]:
    def parent_of(pid: str) -> int:
        stat_line = _read(f"/proc/{pid}/stat").decode()
        return int(stat_line.rsplit(")", 1)[1].split()[1]) if stat_line else -1

    return [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit()
        and parent_of(pid) == os.getpid()
        and _read(f"/proc/{pid}/cmdline").split(b"\0")[0].endswith(tool.encode())
    ]


def _options_file_of(pid: str) -> Path:
    argv = _read(f"/proc/{pid}/cmdline").split(b"\0")
    assert argv[1].startswith(b"--defaults-extra-file="), argv  # the tools require it first
    return Path(argv[1].split(b"=", 1)[1].decode())


def _assert_private_options_file(path: Path, password: str) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().startswith("[client]\n")
    assert "password=" in path.read_text()
    assert password not in os.environ.get("MYSQL_PWD", "")


async def test_dump_password_is_in_a_private_options_file_never_in_argv_or_env(
    mariadb: MariaDBServer, big_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the agent's own MYSQL_* variables could redirect the tool or hand it another password
    monkeypatch.setenv("MYSQL_PWD", "agent-env-Pass-3")
    async with MySQLEngine().dump(conn_for(mariadb, big_db)) as chunks:
        assert await anext(aiter(chunks))
        (child,) = _children_running("mariadb-dump")
        assert mariadb.password.encode() not in _read(f"/proc/{child}/cmdline")
        environ = _read(f"/proc/{child}/environ")
        assert b"PATH=" in environ  # the environment was readable: the next checks mean something
        assert mariadb.password.encode() not in environ and b"MYSQL_PWD" not in environ
        options = _options_file_of(child)
        _assert_private_options_file(options, mariadb.password)
    # the context reaped the tool and removed the file with its directory
    assert _read(f"/proc/{child}/cmdline") == b""
    assert not options.exists() and not options.parent.exists()


async def test_restore_password_is_in_a_private_options_file_removed_even_on_failure(
    mariadb: MariaDBServer, source_dump: list[bytes], no_scratch_left: None
) -> None:
    target = new_db(mariadb)
    seen: list[tuple[str, Path, bytes, bytes]] = []

    async def watched() -> AsyncIterator[bytes]:
        yield source_dump[0][:50_000]
        await asyncio.sleep(0.2)
        (child,) = _children_running("mariadb")
        options = _options_file_of(child)
        _assert_private_options_file(options, mariadb.password)
        seen.append((child, options, _read(f"/proc/{child}/cmdline"), _read(f"/proc/{child}/environ")))
        raise ArtifactTampered("cut short")

    with pytest.raises(ArtifactTampered):
        await MySQLEngine().restore(conn_for(mariadb, target), watched())
    ((child, options, cmdline, environ),) = seen
    assert mariadb.password.encode() not in cmdline and mariadb.password.encode() not in environ
    assert b"--database=rbk_" in cmdline  # it loads into the scratch database, not the target
    assert not options.exists() and not options.parent.exists()
    assert _read(f"/proc/{child}/cmdline") == b""


async def test_a_password_with_every_awkward_character_works_for_aiomysql_and_the_tools(
    mariadb: MariaDBServer, source_db: str, source_dump: list[bytes], no_scratch_left: None
) -> None:
    # quotes, backslashes, comment and section characters, outer spaces, non-ASCII: option files
    # and aiomysql must agree on every byte
    password = " p#ss\"w\\o'rd;=[client] şifre\\ "
    user = f"awkward_{next(_names)}"
    literal = password.replace("\\", "\\\\").replace("'", "\\'")
    mariadb.sql(None, f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{literal}'")
    mariadb.sql(None, f"GRANT ALL ON *.* TO '{user}'@'127.0.0.1'")
    mariadb.sql(None, "SELECT 1", user=user, password=password)  # the server agrees on the password

    def as_user(database: str) -> Connection:
        return Connection(
            {"host": mariadb.host, "port": mariadb.port, "user": user, "database": database},
            {"password": password},
        )

    engine = MySQLEngine()
    assert (await engine.test(as_user(source_db))).endswith("-MariaDB")
    dump = await collect(engine, as_user(source_db))
    assert b"".join(dump) == b"".join(source_dump)
    target = new_db(mariadb)
    await engine.restore(as_user(target), replay(dump))
    assert fingerprint(mariadb, target)["customers"] == fingerprint(mariadb, source_db)["customers"]


def test_options_file_for_each_tool_flavor_and_ssl_mode() -> None:
    settings = MySQLSettings(
        host="db.example", port=3307, user='a"b', ssl_mode="verify_ca", ssl_ca="/etc/ca.pem"
    )
    mariadb_text = client_options(
        settings, "p\\w\n#", MySQLTool("/usr/bin/mariadb", True), connect_timeout=True
    )
    assert mariadb_text.splitlines() == [
        "[client]",
        'user="a\\"b"',
        'host="db.example"',
        "port=3307",
        "protocol=TCP",
        'password="p\\\\w\\n#"',
        "connect-timeout=10",
        "ssl",
        "ssl-verify-server-cert",
        'ssl-ca="/etc/ca.pem"',
    ]
    mysql_text = client_options(settings, None, MySQLTool("/usr/bin/mysqldump", False), connect_timeout=False)
    assert "ssl-mode=VERIFY_CA" in mysql_text.splitlines()
    assert "password" not in mysql_text and "connect-timeout" not in mysql_text
    disabled = settings.model_copy(update={"ssl_mode": "disabled"})
    assert (
        "skip-ssl" in client_options(disabled, "x", MySQLTool("m", True), connect_timeout=False).splitlines()
    )
    # a CA only matters when verifying
    preferred = settings.model_copy(update={"ssl_mode": "preferred"})
    assert "ssl-ca" not in client_options(preferred, "x", MySQLTool("m", True), connect_timeout=False)


def test_dump_argv_ends_options_before_the_database_name() -> None:
    argv = MySQLEngine.dump_argv(MySQLTool("/usr/bin/mariadb-dump", True), Path("/t/client.cnf"), "-x")
    assert argv[:2] == ["/usr/bin/mariadb-dump", "--defaults-extra-file=/t/client.cnf"]
    assert argv[-2:] == ["--", "-x"]
    assert "--databases" not in argv and "--set-gtid-purged=OFF" not in argv
    for flag in ("--single-transaction", "--quick", "--routines", "--triggers", "--events", "--hex-blob"):
        assert flag in argv
    assert "--set-gtid-purged=OFF" in MySQLEngine.dump_argv(MySQLTool("mysqldump", False), Path("f"), "d")


# ------------------------------------------------------------------ through the agent and the API schema


def _now() -> datetime:
    return datetime.now(UTC)


def _mysql_target(m: MariaDBServer, database: str, sealed_to: str, info: str) -> DatabaseTarget:
    return DatabaseTarget(
        name=database,
        engine="mysql",
        settings={"host": m.host, "port": m.port, "user": m.user, "database": database},
        secrets=seal(sealed_to, {"password": m.password}, info),
    )


async def test_backup_and_restores_through_the_agent(
    nats_server: NatsServer,
    api_nc: NATS,
    mariadb: MariaDBServer,
    source_db: str,
    tmp_path: Path,
    no_scratch_left: None,
) -> None:
    """The real supervisor and pipeline (zstd + encryption + local storage) over NATS: a backup, a
    restore into another database, and a tampered artifact that must leave its target alone."""
    target = new_db(mariadb)
    untouched = new_db(mariadb, "CREATE TABLE keep_me (x INT); INSERT INTO keep_me VALUES (7)")
    job_key = secrets.token_bytes(32)
    job_key_b64 = base64.b64encode(job_key).decode()
    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        run_id = uuid.uuid4().hex
        info = seal_info("run", run_id)
        backup = BackupCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=_now(),
            expires_at=_now() + timedelta(minutes=10),
            run_id=run_id,
            job_id=uuid.uuid4().hex,
            database=_mysql_target(mariadb, source_db, agent.public_key_b64, info),
            storage=StorageTarget(name="local", kind="local", settings={"path": str(agent.storage_dir)}),
            compression="zstd",
            encryption=EncryptionSpec(
                key_id="job-key-1",
                job_key=seal(agent.public_key_b64, {"key_b64": job_key_b64}, info),
            ),
        )
        await agent.send_command("job.execute", backup)
        done = await agent.reports.outcome("backup", "completed", "run_id", run_id)
        assert re.fullmatch(r"10\.11\.\d+-MariaDB", done["server_version"]), done
        assert done["storage_key"].endswith(f"_{run_id}.sql.zst.rbk")
        manifest = Manifest.from_json((agent.storage_dir / done["manifest_key"]).read_bytes())
        assert (manifest.engine, manifest.dump_format) == ("mysql", "mysql-sql")
        artifact = agent.storage_dir / done["storage_key"]
        assert "Ayşe".encode() not in artifact.read_bytes()  # encrypted

        async def restore_into(database: str) -> dict[str, Any]:
            restore_id = uuid.uuid4().hex
            info = seal_info("restore", restore_id)
            await agent.send_command(
                "restore.execute",
                RestoreCommand(
                    command_id=uuid.uuid4().hex,
                    org_id=agent.identity.org_id,
                    issued_at=_now(),
                    expires_at=_now() + timedelta(minutes=10),
                    restore_id=restore_id,
                    backup_run_id=run_id,
                    database=_mysql_target(mariadb, database, agent.public_key_b64, info),
                    storage=backup.storage,
                    storage_key=done["storage_key"],
                    compression="zstd",
                    encrypted=True,
                    encryption=EncryptionSpec(
                        key_id="job-key-1",
                        job_key=seal(agent.public_key_b64, {"key_b64": job_key_b64}, info),
                    ),
                ),
            )
            _, body = await agent.reports.wait_for(
                lambda subject, body: (
                    body.get("restore_id") == restore_id
                    and subject.rsplit(".", 1)[1] in ("completed", "failed")
                )
            )
            return body

        restored = await restore_into(target)
        assert restored["bytes_restored"] == done["dump_size"], restored

        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0x01
        artifact.write_bytes(bytes(data))
        tampered = await restore_into(untouched)
        assert "bytes_restored" not in tampered and tampered["error"], tampered

    assert fingerprint(mariadb, target) == fingerprint(mariadb, source_db)
    assert mariadb.sql(untouched, "SHOW TABLES") == "keep_me"
    assert mariadb.sql(untouched, "SELECT x FROM keep_me") == "7"
    assert agent.wiretap.messages, "the wiretap saw nothing: the test would prove nothing"
    for secret in (mariadb.password, job_key_b64):
        assert agent.wiretap.contains(secret) == []


def test_api_settings_schema_keeps_the_password_secret() -> None:
    spec = API_ENGINES["mysql"]
    settings, secret = spec.split(
        {"host": "db", "user": "app", "database": "shop", "ssl_mode": "verify_identity", "password": "pw"}
    )
    assert settings == {
        "host": "db",
        "port": 3306,
        "user": "app",
        "database": "shop",
        "ssl_mode": "verify_identity",
    }
    assert secret == {"password": "pw"}
    # what the API stores is what the agent accepts
    assert MySQLSettings.model_validate(settings).ssl_mode == "verify_identity"
    assert mysql_engine.parse_settings({**settings, "ssl_mode": None}).ssl_mode == "preferred"
    for bad in (
        {"database": "x" * 65},
        {"ssl_mode": "on"},
        {"ssl_ca": "relative/ca.pem"},
        {"sslmode": "require"},
    ):
        with pytest.raises(RequestValidationError):
            spec.split({"host": "db", "user": "app", "database": "shop", **bad})
