"""MSSQLEngine without a SQL Server (none can run here).

What is tested: the SQL text built for hostile names (checked with a T-SQL tokenizer: names and
paths come back as data, the statement skeleton never changes), the ODBC connection strings, the
MOVE clauses, the .bak file streaming and its removal in every case (a fake connection at the
aioodbc boundary writes a .bak when it sees BACKUP DATABASE and reads it on RESTORE), and a
backup → pipeline → restore round trip. Then the same engine through the real aioodbc, pyodbc,
unixODBC and FreeTDS driver against a small fake TDS server: the login as it reaches the wire,
the statements as the server receives them, result sets, errors and a cancel (attention).

Not tested: a real SQL Server, and Microsoft's ODBC driver (its "}}" escaping follows its docs).
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyodbc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rahatback_agent.engines.base import Connection, EngineError
from rahatback_agent.engines.mssql import (
    DEFAULT_DIRS_SQL,
    LIST_DATABASES_SQL,
    SYSTEM_DATABASES,
    BackupFile,
    MSSQLEngine,
    MSSQLSettings,
    backup_sql,
    check_database_name,
    connection_string,
    move_targets,
    quote_identifier,
    quote_string,
    restore_sql,
)
from rahatback_agent.engines.process import CHUNK_SIZE
from rahatback_agent.engines.registry import get_engine
from rahatback_agent.pipeline import restore_stream, run_backup_pipeline
from rahatback_agent.storages.local import LocalStorage

NASTY = "x]; DROP DATABASE y--"
PASSWORD = "Pa;ss}w{o=rd'--"
JOB_KEY = os.urandom(32)

# T-SQL's two quoted token kinds: [identifier] with ]] for ], and N'string' with '' for '
_QUOTED = re.compile(r"\[(?:[^\]]|\]\])*\]|N'(?:[^']|'')*'")


def tokenize(sql: str) -> tuple[str, list[str]]:
    """(statement with every quoted token replaced by <id>/<str>, the unquoted values)."""
    values: list[str] = []

    def take(match: re.Match[str]) -> str:
        token = match.group(0)
        if token.startswith("["):
            values.append(token[1:-1].replace("]]", "]"))
            return "<id>"
        values.append(token[2:-1].replace("''", "'"))
        return "<str>"

    return _QUOTED.sub(take, sql), values


# ---------------------------------------------------------------- SQL text


def test_registry_hands_out_the_engine() -> None:
    assert get_engine("mssql").name == "mssql"


def test_hostile_name_is_quoted_as_data() -> None:
    sql = backup_sql(NASTY, "/var/opt/mssql/backup/o'brien.bak")
    assert sql == (
        "BACKUP DATABASE [x]]; DROP DATABASE y--] TO DISK = N'/var/opt/mssql/backup/o''brien.bak'"
        " WITH COPY_ONLY, CHECKSUM, INIT"
    )
    skeleton, values = tokenize(sql)
    assert skeleton == "BACKUP DATABASE <id> TO DISK = <str> WITH COPY_ONLY, CHECKSUM, INIT"
    assert values == [NASTY, "/var/opt/mssql/backup/o'brien.bak"]


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=128).filter(
    lambda s: s == s.strip()
)


@settings(database=None, max_examples=300, deadline=None)
@given(name=names, path=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1))
def test_any_name_or_path_stays_data(name: str, path: str) -> None:
    skeleton, values = tokenize(backup_sql(name, path))
    assert skeleton == "BACKUP DATABASE <id> TO DISK = <str> WITH COPY_ONLY, CHECKSUM, INIT"
    assert values == [name, path]

    skeleton, values = tokenize(restore_sql(name, path, [(name, path + "'x")]))
    assert skeleton == "RESTORE DATABASE <id> FROM DISK = <str> WITH REPLACE, CHECKSUM, MOVE <str> TO <str>"
    assert values == [name, path, name, path + "'x"]


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "1 to 128"),
        ("x" * 129, "1 to 128"),
        ("a\x00b", "control"),
        ("line\nbreak", "control"),
        (" padded", "spaces"),
        ("padded ", "spaces"),
    ],
)
def test_unusable_names_are_refused(name: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        check_database_name(name)
    with pytest.raises(ValueError):
        quote_identifier(name)


def test_quoting_examples() -> None:
    assert quote_identifier("a]]b") == "[a]]]]b]"
    assert quote_identifier("[x") == "[[x]"
    assert quote_string("it's") == "N'it''s'"
    assert quote_string("ünïcode ✓") == "N'ünïcode ✓'"
    with pytest.raises(ValueError):
        quote_string("a\x00b")


def test_restore_sql_with_moves() -> None:
    sql = restore_sql(
        "new'db]",
        "/b/r.bak",
        [("shop", "/data/new_db_ab12cd34_shop.mdf"), ("shop_log", "/log/new_db_ab12cd34_shop_log.ldf")],
    )
    assert sql == (
        "RESTORE DATABASE [new'db]]] FROM DISK = N'/b/r.bak' WITH REPLACE, CHECKSUM,"
        " MOVE N'shop' TO N'/data/new_db_ab12cd34_shop.mdf',"
        " MOVE N'shop_log' TO N'/log/new_db_ab12cd34_shop_log.ldf'"
    )
    assert restore_sql("shop", "/b/r.bak") == (
        "RESTORE DATABASE [shop] FROM DISK = N'/b/r.bak' WITH REPLACE, CHECKSUM"
    )


def test_list_databases_sql_leaves_out_system_databases() -> None:
    skeleton, values = tokenize(LIST_DATABASES_SQL)
    assert values == list(SYSTEM_DATABASES)
    assert skeleton.startswith(
        "SELECT name FROM sys.databases WHERE name NOT IN (<str>, <str>, <str>, <str>)"
    )


SHOP_FILES = [
    BackupFile("shop", "C:\\Program Files\\MSSQL\\DATA\\shop.mdf", "D", 1),
    BackupFile("shop_log", "C:\\Program Files\\MSSQL\\DATA\\shop_log.ldf", "L", 2),
    BackupFile("shop archive", "C:\\Program Files\\MSSQL\\DATA\\shop_2.ndf", "D", 3),
    BackupFile("shop_archive", "C:\\Program Files\\MSSQL\\DATA\\shop_3.ndf", "D", 4),
    BackupFile("docs", "C:\\Program Files\\MSSQL\\DATA\\docs_fs", "S", 65537),
]


def test_move_targets_rename_every_file_after_the_target() -> None:
    moves = move_targets("shop_copy", SHOP_FILES, "/var/opt/mssql/data/", "/var/opt/mssql/log/")
    assert moves == [
        ("shop", "/var/opt/mssql/data/shop_copy_shop.mdf"),
        ("shop_log", "/var/opt/mssql/log/shop_copy_shop_log.ldf"),
        ("shop archive", "/var/opt/mssql/data/shop_copy_shop_archive.ndf"),
        # cleans up like the one before: the file id keeps it apart
        ("shop_archive", "/var/opt/mssql/data/shop_copy_4.ndf"),
        ("docs", "/var/opt/mssql/data/shop_copy_docs"),
    ]


def test_move_targets_without_default_folders_stay_beside_the_originals() -> None:
    moves = move_targets(NASTY, SHOP_FILES[:2], None, None)
    stem = moves[0][1].split("\\")[-1].removesuffix("_shop.mdf")
    # a name that had to be cleaned up gets a hash, so "a b" and "a_b" never share files
    assert re.fullmatch(r"x_DROP_DATABASE_y--_[0-9a-f]{8}", stem)
    assert moves == [
        ("shop", f"C:\\Program Files\\MSSQL\\DATA\\{stem}_shop.mdf"),
        ("shop_log", f"C:\\Program Files\\MSSQL\\DATA\\{stem}_shop_log.ldf"),
    ]
    assert move_targets("a b", SHOP_FILES[:1], "/d", None) != move_targets("a_b", SHOP_FILES[:1], "/d", None)


# ---------------------------------------------------------------- connection strings


def settings_for(**overrides: Any) -> MSSQLSettings:
    base: dict[str, Any] = {"host": "db.example.net", "user": "backup", "database": "shop"}
    return MSSQLSettings.model_validate({**base, **overrides})


def test_connection_string_for_microsofts_driver() -> None:
    dsn = connection_string(settings_for(port=14330), PASSWORD, NASTY)
    assert dsn == (
        "DRIVER={ODBC Driver 18 for SQL Server};SERVER=tcp:db.example.net,14330;Encrypt=yes;"
        "TrustServerCertificate=no;UID={backup};PWD={Pa;ss}}w{o=rd'--};DATABASE={x]; DROP DATABASE y--};"
        "APP=rahatback;"
    )
    relaxed = connection_string(settings_for(encrypt=False, trust_server_certificate=True), "pw")
    assert "Encrypt=no;TrustServerCertificate=yes;" in relaxed
    assert "DATABASE={master};" in relaxed


def test_connection_string_for_freetds() -> None:
    dsn = connection_string(settings_for(driver="FreeTDS", encrypt=False), "p}w", "shop")
    assert dsn == (
        "DRIVER={FreeTDS};SERVER=db.example.net;PORT=1433;Encryption=request;ClientCharset=UTF-8;"
        "UID={backup};PWD={p}w};DATABASE={shop};APP=rahatback;"
    )
    assert "Encryption=require;" in connection_string(settings_for(driver="FreeTDS"), "pw")
    with pytest.raises(EngineError) as err:
        connection_string(settings_for(driver="FreeTDS"), "secret};part")
    assert err.value.code == "bad_settings"
    assert "password" in err.value.message and "secret" not in err.value.message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"host": "h;DRIVER={evil}"}, "host"),
        ({"host": "h o"}, "host"),
        ({"port": 0}, "port"),
        ({"database": "a\nb"}, "database"),
        ({"driver": "x};PWD={y"}, "driver"),
        ({"backup_dir": "relative/dir"}, "backup_dir"),
    ],
)
async def test_bad_settings_name_the_field(overrides: dict[str, Any], field: str) -> None:
    settings_ = {"host": "h", "user": "u", "database": "d", "backup_dir": "/b", **overrides}
    with pytest.raises(EngineError) as err:
        await MSSQLEngine().test(Connection(settings_, {"password": "pw-Never-Shown"}))
    assert err.value.code == "bad_settings"
    assert field in err.value.message
    assert "pw-Never-Shown" not in err.value.message


# ---------------------------------------------------------------- a fake server at the aioodbc boundary


@dataclass
class FakeMSSQL:
    """Plays SQL Server at the aioodbc boundary: records connection strings and statements,
    writes `backup` to the .bak path when it sees BACKUP DATABASE, reads it back on RESTORE."""

    backup: bytes = b""
    source_name: str = "shop"
    files: list[BackupFile] = field(default_factory=lambda: SHOP_FILES[:2])
    fail: dict[str, BaseException] = field(default_factory=dict)  # statement prefix -> error
    block_backup: bool = False
    dsns: list[str] = field(default_factory=list)
    statements: list[str] = field(default_factory=list)
    restored: bytes | None = None
    opened: int = 0
    closed: int = 0
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    backup_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self, dsn: str) -> FakeConnection:
        self.dsns.append(dsn)
        if "connect" in self.fail:
            raise self.fail["connect"]
        self.opened += 1
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, server: FakeMSSQL) -> None:
        self.server = server

    async def cursor(self) -> FakeCursor:
        return FakeCursor(self.server)

    async def close(self) -> None:
        self.server.closed += 1


class _RawCursor:
    """What aioodbc keeps as `_impl`: the pyodbc cursor, whose cancel() works from any thread."""

    def __init__(self, server: FakeMSSQL, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.loop = server, loop

    def cancel(self) -> None:
        self.loop.call_soon_threadsafe(self.server.cancelled.set)


class FakeCursor:
    def __init__(self, server: FakeMSSQL) -> None:
        self.server = server
        self._impl = _RawCursor(server, asyncio.get_running_loop())
        self.description: list[tuple[str]] | None = None
        self._rows: list[tuple[Any, ...]] = []
        self._messages = 0

    def _result(self, columns: list[str], rows: list[tuple[Any, ...]]) -> None:
        self.description = [(name,) for name in columns]
        self._rows = rows

    async def execute(self, sql: str) -> FakeCursor:
        self.server.statements.append(sql)
        skeleton, values = tokenize(sql)
        for prefix, error in self.server.fail.items():
            if sql.startswith(prefix):
                if prefix.startswith("BACKUP") and values:
                    write(values[1], b"half a backup")
                raise error
        if skeleton.startswith("BACKUP DATABASE"):
            write(values[1], self.server.backup[: len(self.server.backup) // 2])
            self.server.backup_started.set()
            if self.server.block_backup:
                await self.server.cancelled.wait()
                raise pyodbc.Error("HY008", "[HY008] [FakeDriver]Operation canceled (0) (SQLExecDirectW)")
            write(values[1], self.server.backup)
            self._messages = 3  # "10 percent processed." ... as further result sets
        elif skeleton.startswith("RESTORE VERIFYONLY"):
            assert values[0] in [str(p) for p in files_in(Path(values[0]).parent)]
        elif skeleton.startswith("RESTORE HEADERONLY"):
            self._result(["BackupName", "DatabaseName"], [(None, self.server.source_name)])
        elif skeleton.startswith("RESTORE FILELISTONLY"):
            self._result(
                ["LogicalName", "PhysicalName", "Type", "FileGroupName", "FileId"],
                [(f.logical_name, f.physical_name, f.type, "PRIMARY", f.file_id) for f in self.server.files],
            )
        elif sql == DEFAULT_DIRS_SQL:
            self._result(["data_dir", "log_dir"], [("/var/opt/mssql/data/", "/var/opt/mssql/log/")])
        elif skeleton.startswith("RESTORE DATABASE"):
            self.server.restored = read(values[1])
        elif sql == "SELECT @@VERSION":
            self._result(
                [""],
                [("Microsoft SQL Server 2022 (RTM-CU12) (KB5033663) - 16.0.4115.5 (X64) \n\tMar  4 2024",)],
            )
        elif sql == LIST_DATABASES_SQL:
            self._result(["name"], [("shop",), (NASTY,)])
        else:
            raise AssertionError(f"unexpected statement {sql!r}")
        return self

    async def nextset(self) -> bool:
        if self._messages:
            self._messages -= 1
            return True
        return False

    async def fetchall(self) -> list[tuple[Any, ...]]:
        return self._rows

    async def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    async def close(self) -> None:
        pass


def files_in(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def write(path: str, data: bytes) -> None:
    Path(path).write_bytes(data)


def read(path: str) -> bytes:
    return Path(path).read_bytes()


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    # a space and a quote: the path goes into SQL as an N'...' literal
    path = tmp_path / "o'brien backups"
    path.mkdir()
    return path


def conn_for(backup_dir: Path, database: str = "shop", **extra: Any) -> Connection:
    return Connection(
        {"host": "127.0.0.1", "user": "sa", "database": database, "backup_dir": str(backup_dir), **extra},
        {"password": PASSWORD},
    )


async def collect(engine: MSSQLEngine, conn: Connection) -> list[bytes]:
    async with engine.dump(conn) as chunks:
        return [chunk async for chunk in chunks]


async def replay(data: bytes, size: int = 300_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class ArtifactTampered(Exception):
    pass


async def replay_then_fail(data: bytes, after: int) -> AsyncIterator[bytes]:
    yield data[:after]
    raise ArtifactTampered("chunk 3 failed authentication")


def odbc_error(state: str, text: str) -> pyodbc.Error:
    return pyodbc.Error(state, f"[{state}] [Microsoft][ODBC Driver 18 for SQL Server][SQL Server]{text}")


async def test_version_and_listing(backup_dir: Path) -> None:
    server = FakeMSSQL()
    engine = MSSQLEngine(connect=server.connect)
    version = await engine.test(conn_for(backup_dir))
    assert version == "Microsoft SQL Server 2022 (RTM-CU12) (KB5033663) - 16.0.4115.5 (X64)"
    assert await engine.list_databases(conn_for(backup_dir)) == ["shop", NASTY]
    # the test logs into the chosen database, the listing into master
    assert "DATABASE={shop};" in server.dsns[0] and "DATABASE={master};" in server.dsns[1]
    assert server.opened == server.closed == 2


async def test_backup_streams_the_bak_in_chunks_and_removes_it(backup_dir: Path) -> None:
    data = os.urandom(3 * CHUNK_SIZE + 12345)
    server = FakeMSSQL(backup=data)
    chunks = await collect(MSSQLEngine(connect=server.connect), conn_for(backup_dir, NASTY))

    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [CHUNK_SIZE] * 3 + [12345]
    (statement,) = server.statements
    skeleton, (name, path) = tokenize(statement)
    assert skeleton == "BACKUP DATABASE <id> TO DISK = <str> WITH COPY_ONLY, CHECKSUM, INIT"
    assert name == NASTY
    assert Path(path).parent == backup_dir and path.endswith(".bak")
    assert files_in(backup_dir) == []
    assert server.opened == server.closed == 1


async def test_consumer_stopping_early_still_removes_the_bak(backup_dir: Path) -> None:
    server = FakeMSSQL(backup=os.urandom(3 * CHUNK_SIZE))
    async with MSSQLEngine(connect=server.connect).dump(conn_for(backup_dir)) as chunks:
        first = await anext(aiter(chunks))
        assert len(first) == CHUNK_SIZE
        assert len(files_in(backup_dir)) == 1
    assert files_in(backup_dir) == []


@pytest.mark.parametrize(
    ("error", "code", "hint"),
    [
        (
            odbc_error(
                "42000",
                "Cannot open backup device '/x/y.bak'. Operating system error 5(Access is denied.). (3201)",
            ),
            "bad_settings",
            "service account needs read/write access",
        ),
        (
            odbc_error(
                "42000", "Database 'shop' does not exist. Make sure that the name is entered correctly. (911)"
            ),
            "unknown_database",
            'database "shop" does not exist on 127.0.0.1:1433',
        ),
        (
            odbc_error("42000", f"Something odd about {PASSWORD} happened. (50000)"),
            "error",
            "Something odd about *** happened",
        ),
    ],
)
async def test_failed_backup_is_reported_and_its_file_removed(
    backup_dir: Path, error: pyodbc.Error, code: str, hint: str
) -> None:
    server = FakeMSSQL(backup=b"x" * 100, fail={"BACKUP DATABASE": error})
    with pytest.raises(EngineError) as err:
        await collect(MSSQLEngine(connect=server.connect), conn_for(backup_dir))
    assert err.value.code == code
    assert hint in err.value.message
    assert PASSWORD not in err.value.message
    assert files_in(backup_dir) == []
    assert server.opened == server.closed == 1


async def test_cancelled_backup_is_cancelled_on_the_server_and_its_file_removed(backup_dir: Path) -> None:
    server = FakeMSSQL(backup=os.urandom(1000), block_backup=True)

    async def run() -> None:
        await collect(MSSQLEngine(connect=server.connect), conn_for(backup_dir))

    task = asyncio.create_task(run())
    await server.backup_started.wait()
    assert len(files_in(backup_dir)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.cancelled.is_set()  # SQLCancel reached the statement
    assert files_in(backup_dir) == []
    assert server.closed == 1


async def test_login_failure_is_auth_failed_and_scrubbed(backup_dir: Path) -> None:
    server = FakeMSSQL(
        fail={
            "connect": odbc_error(
                "28000", f"Login failed for user 'sa'. pwd={PASSWORD} (18456) (SQLDriverConnect)"
            )
        }
    )
    with pytest.raises(EngineError) as err:
        await MSSQLEngine(connect=server.connect).test(conn_for(backup_dir))
    assert err.value.code == "auth_failed"
    assert err.value.message == 'login failed for user "sa" on 127.0.0.1:1433'


async def test_missing_backup_dir_is_bad_settings(tmp_path: Path) -> None:
    server = FakeMSSQL()
    with pytest.raises(EngineError) as err:
        await collect(MSSQLEngine(connect=server.connect), conn_for(tmp_path / "nope"))
    assert err.value.code == "bad_settings"
    assert "must run on the SQL Server host" in err.value.message
    assert server.dsns == []


async def test_dump_and_restore_require_database_and_backup_dir(backup_dir: Path) -> None:
    engine = MSSQLEngine(connect=FakeMSSQL().connect)
    without_dir = Connection({"host": "h", "user": "u", "database": "d"}, {"password": "p"})
    with pytest.raises(EngineError, match="backup_dir: required"):
        await collect(engine, without_dir)
    without_db = Connection({"host": "h", "user": "u", "backup_dir": str(backup_dir)}, {"password": "p"})
    with pytest.raises(EngineError, match="database: required"):
        await engine.restore(without_db, replay(b"x"))


# ---------------------------------------------------------------- restore


async def backup_through_pipeline(
    engine: MSSQLEngine, conn: Connection, storage: LocalStorage
) -> tuple[str, str]:
    writer = await storage.open_writer("shop/shop.bak.zst.rbk")
    async with engine.dump(conn) as source:
        result = await run_backup_pipeline(
            source, writer, compression="zstd", level=3, job_key=JOB_KEY, key_id="job-1"
        )
    await writer.commit()
    return result.artifact_sha256, result.dump_sha256


async def test_backup_pipeline_restore_round_trip_into_another_database(
    backup_dir: Path, tmp_path: Path
) -> None:
    data = os.urandom(2 * CHUNK_SIZE + 777)
    server = FakeMSSQL(backup=data, source_name="shop")
    engine = MSSQLEngine(connect=server.connect)
    (tmp_path / "storage").mkdir()
    storage = LocalStorage(tmp_path / "storage")
    artifact_sha, dump_sha = await backup_through_pipeline(engine, conn_for(backup_dir), storage)
    server.statements.clear()

    chunks = restore_stream(
        storage.read("shop/shop.bak.zst.rbk"),
        compression="zstd",
        job_key_lookup=JOB_KEY,
        expected_artifact_sha256=artifact_sha,
        expected_dump_sha256=dump_sha,
    )
    target = "shop copy]"
    fed = await engine.restore(conn_for(backup_dir, target), chunks)

    assert fed == len(data)
    assert server.restored == data
    verify, header, filelist, dirs, restore = server.statements
    bak = tokenize(verify)[1][0]
    assert Path(bak).parent == backup_dir
    assert verify == f"RESTORE VERIFYONLY FROM DISK = {quote_string(bak)} WITH CHECKSUM"
    assert header == f"RESTORE HEADERONLY FROM DISK = {quote_string(bak)}"
    assert filelist == f"RESTORE FILELISTONLY FROM DISK = {quote_string(bak)}"
    assert dirs == DEFAULT_DIRS_SQL
    stem = (
        move_targets(target, SHOP_FILES[:1], "/d/", None)[0][1].removeprefix("/d/").removesuffix("_shop.mdf")
    )
    assert restore == (
        f"RESTORE DATABASE [shop copy]]] FROM DISK = {quote_string(bak)} WITH REPLACE, CHECKSUM,"
        f" MOVE N'shop' TO N'/var/opt/mssql/data/{stem}_shop.mdf',"
        f" MOVE N'shop_log' TO N'/var/opt/mssql/log/{stem}_shop_log.ldf'"
    )
    assert files_in(backup_dir) == []


async def test_restore_under_the_same_name_needs_no_moves(backup_dir: Path) -> None:
    server = FakeMSSQL(source_name="SHOP")  # SQL Server names compare case-insensitively
    await MSSQLEngine(connect=server.connect).restore(conn_for(backup_dir, "shop"), replay(b"bak" * 1000))
    assert [tokenize(s)[0].split(" FROM")[0] for s in server.statements] == [
        "RESTORE VERIFYONLY",
        "RESTORE HEADERONLY",
        "RESTORE DATABASE <id>",
    ]
    assert server.statements[-1].endswith("WITH REPLACE, CHECKSUM")
    assert server.restored == b"bak" * 1000


async def test_restore_whose_input_fails_never_reaches_sql_server(backup_dir: Path) -> None:
    server = FakeMSSQL()
    with pytest.raises(ArtifactTampered):
        await MSSQLEngine(connect=server.connect).restore(
            conn_for(backup_dir), replay_then_fail(os.urandom(50_000), 20_000)
        )
    assert server.dsns == [] and server.statements == []
    assert files_in(backup_dir) == []


async def test_failed_restore_explains_and_removes_the_file(backup_dir: Path) -> None:
    in_use = odbc_error(
        "42000",
        "Exclusive access could not be obtained because the database is in use. (3101)",
    )
    server = FakeMSSQL(fail={"RESTORE DATABASE": in_use})
    with pytest.raises(EngineError) as err:
        await MSSQLEngine(connect=server.connect).restore(conn_for(backup_dir), replay(b"bak"))
    assert err.value.code == "tool_failed"
    assert "close the other connections" in err.value.message
    assert PASSWORD not in err.value.message
    assert files_in(backup_dir) == []
    assert server.opened == server.closed == 1


# ---------------------------------------------------------------- the real ODBC stack


def _drivers() -> list[str]:
    return list(pyodbc.drivers())


needs_freetds = pytest.mark.skipif(
    "FreeTDS" not in _drivers(), reason="FreeTDS ODBC driver not installed (apt-get install tdsodbc)"
)


async def test_missing_odbc_driver_is_reported_with_what_to_install(backup_dir: Path) -> None:
    # real aioodbc → pyodbc → unixODBC; Microsoft's driver cannot be installed here
    assert "ODBC Driver 18 for SQL Server" not in _drivers()
    with pytest.raises(EngineError) as err:
        await MSSQLEngine().test(conn_for(backup_dir))
    assert err.value.code == "tool_failed"
    assert 'ODBC driver "ODBC Driver 18 for SQL Server" is not installed' in err.value.message
    assert "msodbcsql18" in err.value.message


@needs_freetds
async def test_closed_port_is_unreachable_through_freetds(backup_dir: Path) -> None:
    from tests.servers import free_port

    port = free_port()
    conn = conn_for(backup_dir, driver="FreeTDS", port=port, encrypt=False)
    with pytest.raises(EngineError) as err:
        await MSSQLEngine().test(conn)
    assert err.value.code == "unreachable"
    assert f"cannot reach 127.0.0.1:{port}" in err.value.message
    assert PASSWORD not in err.value.message


def _b_varchar(text: str) -> bytes:
    return bytes([len(text)]) + text.encode("utf-16-le")


def _us_varchar(text: str) -> bytes:
    return struct.pack("<H", len(text)) + text.encode("utf-16-le")


def _done(status: int = 0, command: int = 0, rows: int = 0) -> bytes:
    return b"\xfd" + struct.pack("<HHQ", status, command, rows)


def _message(number: int, text: str, severity: int) -> bytes:
    """An INFO (severity ≤ 10) or ERROR token."""
    body = (
        struct.pack("<iBB", number, 1, severity)
        + _us_varchar(text)
        + _b_varchar("fake")
        + _b_varchar("")
        + struct.pack("<i", 1)
    )
    return (b"\xab" if severity <= 10 else b"\xaa") + struct.pack("<H", len(body)) + body


def _table(columns: list[str], rows: list[list[str]]) -> bytes:
    """A result set of NVARCHAR(4000) columns."""
    out = b"\x81" + struct.pack("<H", len(columns))
    for name in columns:
        out += struct.pack("<IH", 0, 0x0001) + b"\xe7" + struct.pack("<H", 8000) + b"\x09\x04\xd0\x00\x34"
        out += _b_varchar(name)
    for row in rows:
        out += b"\xd1"
        for value in row:
            raw = value.encode("utf-16-le")
            out += struct.pack("<H", len(raw)) + raw
    return out + _done(0x0010, 0xC1, len(rows))


class FakeTdsServer:
    """Just enough of SQL Server's TDS 7.4 for the real FreeTDS driver behind aioodbc and pyodbc:
    PRELOGIN (no encryption), LOGIN7 (decoded and kept; a wrong password gets error 18456), SQL
    batches (kept; answered like FakeMSSQL: BACKUP writes the .bak, RESTORE reads it) and
    attention (cancel) packets."""

    def __init__(self, password: str = PASSWORD, backup: bytes = b"", source_name: str = "shop") -> None:
        self.password = password
        self.backup = backup
        self.source_name = source_name
        self.fail_backup: bytes | None = None  # an ERROR token to answer BACKUP with
        self.hang_backup = False
        self.logins: list[dict[str, str]] = []
        self.batches: list[str] = []
        self.restored: bytes | None = None
        self.attentions = 0

    @staticmethod
    def _packet(payload: bytes) -> bytes:
        return struct.pack(">BBHHBB", 0x04, 0x01, len(payload) + 8, 0, 1, 0) + payload

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
        data = b""
        while True:
            header = await reader.readexactly(8)
            kind, status, length = struct.unpack(">BBH", header[:4])
            data += await reader.readexactly(length - 8)
            if status & 0x01:  # end of message
                return kind, data

    @staticmethod
    def _prelogin_reply() -> bytes:
        version = struct.pack(">IH", 0x10000FA0, 0)
        start = 2 * 5 + 1
        options = (
            b"\x00" + struct.pack(">HH", start, 6) + b"\x01" + struct.pack(">HH", start + 6, 1) + b"\xff"
        )
        return options + version + b"\x02"  # ENCRYPT_NOT_SUP

    @staticmethod
    def _decode_login(data: bytes) -> dict[str, str]:
        fields = {}
        for index, name in enumerate(("host", "user", "password", "app", "server")):
            offset, chars = struct.unpack_from("<HH", data, 36 + 4 * index)
            raw = data[offset : offset + 2 * chars]
            if name == "password":  # TDS: every byte nibble-swapped, then XOR 0xA5
                raw = bytes((((b ^ 0xA5) & 0x0F) << 4) | ((b ^ 0xA5) >> 4) for b in raw)
            fields[name] = raw.decode("utf-16-le")
        offset, chars = struct.unpack_from("<HH", data, 36 + 4 * 8)  # ibDatabase
        fields["database"] = data[offset : offset + 2 * chars].decode("utf-16-le")
        return fields

    @staticmethod
    def _login_ack() -> bytes:
        body = (
            b"\x01" + struct.pack(">I", 0x74000004) + _b_varchar("Microsoft SQL Server") + b"\x10\x00\x0f\xa0"
        )
        return b"\xad" + struct.pack("<H", len(body)) + body + _done()

    def _answer(self, sql: str) -> bytes | None:
        skeleton, values = tokenize(sql)
        if sql == "SELECT @@VERSION":
            return _table([""], [["Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64) \n\tOct  8 2022"]])
        if sql == LIST_DATABASES_SQL:
            return _table(["name"], [["shop"], [NASTY]])
        if skeleton.startswith("BACKUP DATABASE"):
            write(values[1], self.backup[: len(self.backup) // 2])
            if self.hang_backup:
                return None
            if self.fail_backup is not None:
                return self.fail_backup + _done(0x0002)
            write(values[1], self.backup)
            return (
                _message(3211, "100 percent processed.", 0)
                + _done(0x0001)
                + _message(3014, "BACKUP DATABASE successfully processed.", 0)
                + _done()
            )
        if skeleton.startswith("RESTORE VERIFYONLY"):
            return _message(3262, "The backup set on file 1 is valid.", 0) + _done()
        if skeleton.startswith("RESTORE HEADERONLY"):
            return _table(["BackupName", "DatabaseName"], [["", self.source_name]])
        if skeleton.startswith("RESTORE FILELISTONLY"):
            return _table(
                ["LogicalName", "PhysicalName", "Type", "FileId"],
                [[f.logical_name, f.physical_name, f.type, str(f.file_id)] for f in SHOP_FILES[:2]],
            )
        if sql == DEFAULT_DIRS_SQL:
            return _table(["data_dir", "log_dir"], [["/var/opt/mssql/data/", "/var/opt/mssql/log/"]])
        if skeleton.startswith("RESTORE DATABASE"):
            self.restored = read(values[1])
            return _message(3014, "RESTORE DATABASE successfully processed.", 0) + _done()
        return _done()  # what the driver sends by itself (sp_datatype_info_100 ...)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._read(reader)
            writer.write(self._packet(self._prelogin_reply()))
            login = self._decode_login((await self._read(reader))[1])
            self.logins.append(login)
            if login["password"] != self.password:
                refusal = _message(18456, f"Login failed for user '{login['user']}'.", 14) + _done(0x0002)
                writer.write(self._packet(refusal))
                return
            writer.write(self._packet(self._login_ack()))
            while True:
                kind, data = await self._read(reader)
                if kind == 0x06:  # attention: acknowledge the cancel
                    self.attentions += 1
                    writer.write(self._packet(_done(0x0020)))
                    continue
                (headers,) = struct.unpack_from("<I", data)
                sql = data[headers:].decode("utf-16-le")
                self.batches.append(sql)
                answer = self._answer(sql)
                if answer is not None:
                    writer.write(self._packet(answer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def tds() -> AsyncIterator[tuple[FakeTdsServer, int]]:
    fake = FakeTdsServer()
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    yield fake, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def freetds_conn(port: int, backup_dir: Path, database: str = "shop", password: str = PASSWORD) -> Connection:
    return Connection(
        {
            "host": "127.0.0.1",
            "port": port,
            "user": "sa]x",
            "database": database,
            "driver": "FreeTDS",
            "encrypt": False,
            "backup_dir": str(backup_dir),
        },
        {"password": password},
    )


@needs_freetds
@pytest.mark.parametrize("password", [PASSWORD, "ends with }", "ünïcödé ✓ 'q' \"d\"", "{braced}"])
async def test_credentials_reach_the_wire_exactly_through_freetds(
    backup_dir: Path, tds: tuple[FakeTdsServer, int], password: str
) -> None:
    fake, port = tds
    fake.password = password
    version = await MSSQLEngine().test(freetds_conn(port, backup_dir, NASTY, password))

    assert version == "Microsoft SQL Server 2022 (RTM) - 16.0.1000.6 (X64)"
    (login,) = fake.logins
    assert {k: login[k] for k in ("user", "password", "database", "app")} == {
        "user": "sa]x",
        "password": password,
        "database": NASTY,
        "app": "rahatback",
    }


@needs_freetds
async def test_wrong_password_is_auth_failed_through_freetds(
    backup_dir: Path, tds: tuple[FakeTdsServer, int]
) -> None:
    fake, port = tds
    with pytest.raises(EngineError) as err:
        await MSSQLEngine().test(freetds_conn(port, backup_dir, password="Wrong-pw-99"))
    assert err.value.code == "auth_failed"
    assert err.value.message == f'login failed for user "sa]x" on 127.0.0.1:{port}'
    assert fake.logins[0]["password"] == "Wrong-pw-99"


@needs_freetds
async def test_a_password_freetds_cannot_carry_is_refused_before_connecting(
    backup_dir: Path, tds: tuple[FakeTdsServer, int]
) -> None:
    fake, port = tds
    with pytest.raises(EngineError) as err:
        await MSSQLEngine().test(freetds_conn(port, backup_dir, password="abc};PWD={other"))
    assert err.value.code == "bad_settings"
    assert "abc" not in err.value.message
    assert fake.logins == []


@needs_freetds
async def test_listing_through_freetds(backup_dir: Path, tds: tuple[FakeTdsServer, int]) -> None:
    fake, port = tds
    assert await MSSQLEngine().list_databases(freetds_conn(port, backup_dir)) == ["shop", NASTY]
    assert fake.batches[-1] == LIST_DATABASES_SQL
    assert fake.logins[0]["database"] == "master"


@needs_freetds
async def test_backup_and_restore_through_freetds(backup_dir: Path, tds: tuple[FakeTdsServer, int]) -> None:
    fake, port = tds
    fake.backup = os.urandom(2 * CHUNK_SIZE + 5)
    chunks = await collect(MSSQLEngine(), freetds_conn(port, backup_dir, NASTY))
    assert b"".join(chunks) == fake.backup
    (backup,) = [sql for sql in fake.batches if sql.startswith("BACKUP")]
    bak = tokenize(backup)[1][1]
    assert backup == backup_sql(NASTY, bak)
    assert files_in(backup_dir) == []

    fake.batches.clear()
    fed = await MSSQLEngine().restore(freetds_conn(port, backup_dir, "shop copy"), replay(fake.backup))
    assert fed == len(fake.backup)
    assert fake.restored == fake.backup
    statements = [sql for sql in fake.batches if not sql.startswith("sp_datatype_info")]
    assert [tokenize(sql)[0].split(" FROM")[0] for sql in statements] == [
        "RESTORE VERIFYONLY",
        "RESTORE HEADERONLY",
        "RESTORE FILELISTONLY",
        DEFAULT_DIRS_SQL,
        "RESTORE DATABASE <id>",
    ]
    assert "MOVE N'shop' TO N'/var/opt/mssql/data/shop_copy_" in statements[-1]
    assert files_in(backup_dir) == []


@needs_freetds
async def test_backup_error_through_freetds(backup_dir: Path, tds: tuple[FakeTdsServer, int]) -> None:
    fake, port = tds
    fake.backup = b"x" * 1000
    fake.fail_backup = _message(
        3201, "Cannot open backup device '/x.bak'. Operating system error 5(Access is denied.).", 16
    ) + _message(3013, "BACKUP DATABASE is terminating abnormally.", 16)
    with pytest.raises(EngineError) as err:
        await collect(MSSQLEngine(), freetds_conn(port, backup_dir))
    assert err.value.code == "bad_settings"
    assert "Cannot open backup device" in err.value.message
    assert PASSWORD not in err.value.message
    assert files_in(backup_dir) == []


@needs_freetds
async def test_cancelled_backup_sends_a_cancel_through_freetds(
    backup_dir: Path, tds: tuple[FakeTdsServer, int]
) -> None:
    fake, port = tds
    fake.backup = b"y" * 1000
    fake.hang_backup = True
    task = asyncio.create_task(collect(MSSQLEngine(), freetds_conn(port, backup_dir)))
    for _ in range(2000):
        if any(sql.startswith("BACKUP") for sql in fake.batches):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert fake.attentions == 1  # SQLCancel through aioodbc's pyodbc cursor reached the server
    assert files_in(backup_dir) == []
