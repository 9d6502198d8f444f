"""Dump tools: version parsing of real `--version` outputs, each engine's rules, detection of the real
binaries on this machine, and what a user sees when a tool is missing or too old: a backup that fails
at once naming the package, a connection test that works but warns, and a heartbeat listing the tools.

The "too old" tool is a stand-in `pg_dump` that says it is 13; the PostgreSQL engine looks in
RAHATBACK_PG_BIN first, then the newest /usr/lib/postgresql/<major>/bin, and only then PATH, so the
stand-in goes where the engine would find it. It records any call other than `--version`: a dump
refused by the check must never have started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from rahatback_agent import jobs, tools
from rahatback_agent.engines.base import NoExternalTools
from rahatback_agent.engines.mongodb import mongo_tool_problem
from rahatback_agent.engines.mysql import mysql_tool_problem
from rahatback_agent.engines.postgresql import find_pg_tool, pg_tool_problem
from rahatback_agent.engines.registry import ENGINES
from rahatback_agent.identity import public_key_b64
from rahatback_contracts import subjects
from rahatback_contracts.messages import (
    BackupCommand,
    BackupFailed,
    DatabaseTarget,
    DbTestRequest,
    EncryptionSpec,
    RestoreCommand,
    RestoreFailed,
    StorageTarget,
    seal_info,
)
from rahatback_contracts.sealing import seal

from tests.agent.conftest import running_agent
from tests.servers import PG_BIN, MariaDBServer, NatsServer, PostgresServer

OLD_PG_DUMP = "pg_dump (PostgreSQL) 13.16 (Debian 13.16-1.pgdg120+1)"
TOO_OLD = "pg_dump 13 cannot dump server 15: install postgresql-client-15"

# ------------------------------------------------------------------ parsing real outputs


@pytest.mark.parametrize(
    ("output", "version"),
    [
        ("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n", "15.18"),
        ("psql (PostgreSQL) 16.4 (Ubuntu 16.4-1.pgdg22.04+1)\n", "16.4"),
        ("pg_dump (PostgreSQL) 17beta1\n", "17beta1"),
        ("pg_dump (PostgreSQL) 9.6.24\n", "9.6.24"),
        (
            "mariadb-dump  Ver 10.19 Distrib 10.11.18-MariaDB, for debian-linux-gnu (x86_64)\n",
            "10.11.18-MariaDB",
        ),
        (
            "mariadb  Ver 15.1 Distrib 10.11.18-MariaDB, for debian-linux-gnu (x86_64) "
            "using  EditLine wrapper\n",
            "10.11.18-MariaDB",
        ),
        ("mariadb-dump from 11.4.2-MariaDB, client 10.19 for debian-linux-gnu (x86_64)\n", "11.4.2-MariaDB"),
        (
            "mysqldump: Deprecated program name. It will be removed in a future release, use "
            "'/usr/bin/mariadb-dump' instead\n"
            "mysqldump from 11.2.2-MariaDB, client 10.19 for linux-systemd (x86_64)\n",
            "11.2.2-MariaDB",
        ),
        ("mysqldump  Ver 8.0.36 for Linux on x86_64 (MySQL Community Server - GPL)\n", "8.0.36"),
        ("mysql  Ver 26.7.0 for Linux on x86_64 (MySQL Community Server - GPL)\n", "26.7.0"),
        ("mysqldump  Ver 10.13 Distrib 5.7.44, for Linux (x86_64)\n", "5.7.44"),
        (
            "mongodump version: 100.9.4\ngit version: 1f94fd3f7c8e5b4d1e0a0b7d1c4b0e1a2b3c4d5e\n"
            "Go version: go1.21.6\n   os: linux\n   arch: amd64\n   compiler: gc\n",
            "100.9.4",
        ),
        ("mongorestore version: r4.2.8\ngit version: 43d25964249164d76d5e04dd6cf38f6111e21f5f\n", "4.2.8"),
        ("some-tool 2.3\n", "2.3"),
        ("usage: pg_dump [OPTION]... [DBNAME]\n", None),
        ("", None),
    ],
)
def test_parse_version_of_real_outputs(output: str, version: str | None) -> None:
    assert tools.parse_version(output) == version


# ------------------------------------------------------------------ the rules, engine by engine


def test_postgresql_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAHATBACK_PG_BIN", raising=False)
    older = pg_tool_problem("pg_dump", "13.16", "15.18", found=True)
    assert older is not None and older.fatal and older.code == "tool_too_old"
    assert older.message == TOO_OLD
    assert pg_tool_problem("pg_dump", "15.1", "15.18", found=True) is None  # minor versions do not matter
    assert pg_tool_problem("pg_dump", "16.4", "15.18", found=True) is None  # newer dumps older
    assert pg_tool_problem("pg_dump", "17beta1", "16.4", found=True) is None
    before_10 = pg_tool_problem("pg_dump", "9.6.24", "10.23", found=True)
    assert before_10 is not None and before_10.message.startswith("pg_dump 9.6 cannot dump server 10:")
    assert pg_tool_problem("pg_dump", "9.6.24", "9.6.1", found=True) is None
    assert pg_tool_problem("pg_dump", "9.5.25", "9.6.1", found=True) is not None  # 9.5 and 9.6 differ
    psql = pg_tool_problem("psql", "13.16", "15.18", found=True)
    assert (
        psql is not None and psql.message == "psql 13 is older than server 15: install postgresql-client-15"
    )
    missing = pg_tool_problem("pg_dump", None, "15.18", found=False)
    assert missing is not None and missing.code == "tool_missing" and missing.fatal
    assert missing.message == "pg_dump not found: install postgresql-client-15"
    # a version it cannot read: no verdict, the tool's own error will say what is wrong
    assert pg_tool_problem("pg_dump", None, "15.18", found=True) is None

    monkeypatch.setenv("RAHATBACK_PG_BIN", "/opt/pg13/bin")
    pinned = pg_tool_problem("pg_dump", "13.16", "15.18", found=True)
    assert pinned is not None and pinned.message == (
        f"{TOO_OLD} and point RAHATBACK_PG_BIN (now /opt/pg13/bin) at /usr/lib/postgresql/15/bin"
    )


def test_mysql_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAHATBACK_MYSQL_BIN", raising=False)
    debian = {"mariadb-dump": "10.11.18-MariaDB", "mysqldump": "10.11.18-MariaDB"}
    assert mysql_tool_problem("dump", debian, "10.11.18-MariaDB") is None
    assert mysql_tool_problem("dump", debian, "10.6.21-MariaDB") is None  # older servers are fine
    assert mysql_tool_problem("dump", debian, "8.0.36") is None  # MySQL numbered below 10.3 too
    assert mysql_tool_problem("dump", debian, "9.7.2") is None

    # MySQL's year-numbered releases look like MariaDB >= 10.3 to mariadb-dump: it would ask for
    # stored packages and fail; whatever the MariaDB client's version, Oracle's is needed
    for server in ("26.7.0", "27.1.0-commercial"):
        year = mysql_tool_problem("dump", debian, server)
        assert year is not None and year.fatal and year.code == "tool_missing", server
        assert f"cannot dump MySQL {server}" in year.message and "Oracle's MySQL client" in year.message
        assert "RAHATBACK_MYSQL_BIN" in year.message
    assert mysql_tool_problem("dump", {"mariadb-dump": "12.3.2-MariaDB"}, "26.7.0") is not None
    assert mysql_tool_problem("dump", {"mysqldump": "26.7.0"}, "26.7.0") is None  # Oracle's own: fine
    # mariadb-dump is what the engine runs when both are there, so it is what is judged
    both = {"mariadb-dump": "10.11.18-MariaDB", "mysqldump": "26.7.0"}
    assert mysql_tool_problem("dump", both, "26.7.0") is not None

    # a tool of an older major than the server of the same kind: warned, not fatal
    older = mysql_tool_problem("dump", debian, "11.4.2-MariaDB")
    assert older is not None and not older.fatal and older.code == "tool_too_old"
    assert "MariaDB 10.11, older than the server (MariaDB 11.4)" in older.message
    oracle_older = mysql_tool_problem("dump", {"mysqldump": "8.0.36"}, "9.1.0")
    assert oracle_older is not None and not oracle_older.fatal

    missing = mysql_tool_problem("dump", {"mariadb": "10.11.18-MariaDB"}, "10.11.18-MariaDB")
    assert missing is not None and missing.fatal and missing.code == "tool_missing"
    assert missing.message == "mariadb-dump or mysqldump not found: install mariadb-client"
    no_client = mysql_tool_problem("restore", debian, "10.11.18-MariaDB")
    assert no_client is not None and no_client.message == "mariadb or mysql not found: install mariadb-client"
    # the client (restores) only has to be there
    assert mysql_tool_problem("restore", {"mysql": "10.11.18-MariaDB"}, "26.7.0") is None
    # unreadable versions: no verdict
    assert mysql_tool_problem("dump", {"mariadb-dump": None}, "26.7.0") is None


def test_mongodb_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAHATBACK_MONGO_BIN", raising=False)
    assert mongo_tool_problem("mongodump", "100.9.4", "7.0.5", found=True) is None
    assert mongo_tool_problem("mongorestore", "100.20.1", "9.0.1", found=True) is None
    # the engine passes the password in --config: the tools bundled with old servers, and 100.x
    # before 100.3.0, do not know it, whatever the server
    for old in ("4.2.8", "100.2.1"):
        for server in ("7.0.5", "4.2.1"):
            too_old = mongo_tool_problem("mongodump", old, server, found=True)
            assert too_old is not None and too_old.fatal and too_old.code == "tool_too_old", (old, server)
            assert "install mongodb-database-tools" in too_old.message
    assert mongo_tool_problem("mongodump", "100.3.0", "4.4.29", found=True) is None
    too_new = mongo_tool_problem("mongodump", "100.20.0", "4.0.28", found=True)
    assert too_new is not None and too_new.fatal and "100.19 or earlier" in too_new.message
    assert mongo_tool_problem("mongodump", "100.19.0", "4.0.28", found=True) is None
    missing = mongo_tool_problem("mongorestore", None, "7.0.5", found=False)
    assert missing is not None and missing.code == "tool_missing"
    assert missing.message.startswith("mongorestore not found: install mongodb-database-tools")


async def test_engines_without_tools_never_object() -> None:
    for name in ("sqlite", "mssql"):
        engine = ENGINES[name]
        assert isinstance(engine, NoExternalTools) and engine.tools == ()
        assert await tools.check_tools(engine, "dump", "1.0") is None
        assert await tools.check_tools(engine, "restore", "1.0") is None


# ------------------------------------------------------------------ detection on this machine


def write_tool(directory: Path, name: str, version_line: str, *, calls: Path | None = None) -> Path:
    """A stand-in that prints `version_line` for --version and records (then fails) any other call."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    record = f'echo "$@" >> "{calls}"\n' if calls else ""
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{version_line}"; exit 0; fi\n'
        f"{record}echo 'stand-in: not a real tool' >&2\nexit 1\n"
    )
    path.chmod(0o755)
    return path


def calls_of(log: Path) -> str:
    """What a stand-in was run with, other than --version ("" if never)."""
    return log.read_text() if log.exists() else ""


def real_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True).stdout
    return out.split()[2]  # "pg_dump (PostgreSQL) 15.18 (Debian ...)"


async def test_detects_the_real_tools_where_the_engines_find_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAHATBACK_PG_BIN", raising=False)
    monkeypatch.delenv("RAHATBACK_MYSQL_BIN", raising=False)
    monkeypatch.setenv("RAHATBACK_MONGO_BIN", str(tmp_path / "no-mongo-tools-here"))
    # a pg_dump 13 first on PATH changes nothing: the engine takes the newest installed major first
    monkeypatch.setenv(
        "PATH", f"{write_tool(tmp_path / 'path', 'pg_dump', OLD_PG_DUMP).parent}:{os.environ['PATH']}"
    )

    reported = await tools.detect_tools(refresh=True)

    assert find_pg_tool("pg_dump") == str(PG_BIN / "pg_dump")
    assert reported["pg_dump"] == real_version(PG_BIN / "pg_dump")
    assert reported["pg_dump"].startswith("15.")
    assert reported["psql"] == real_version(PG_BIN / "psql")
    assert "mongodump" not in reported and "mongorestore" not in reported
    if shutil.which("mariadb-dump"):  # installed by .ci/run with the MariaDB server
        assert reported["mariadb-dump"].endswith("-MariaDB")
        assert reported["mariadb"] == reported["mariadb-dump"]
    assert tools.reported_tools() == reported


async def test_odbc_drivers_are_reported() -> None:
    pyodbc = pytest.importorskip("pyodbc")
    drivers = pyodbc.drivers()
    reported = await tools.detect_tools()
    assert {name for name in reported if name.startswith("odbc:")} == {f"odbc:{name}" for name in drivers}
    if not drivers:
        pytest.skip("no ODBC driver installed here (apt-get install tdsodbc)")


async def test_a_changed_binary_is_asked_again_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAHATBACK_PG_BIN", str(tmp_path))
    engine = ENGINES["postgresql"]
    write_tool(tmp_path, "pg_dump", OLD_PG_DUMP)
    first = await tools.check_tools(engine, "dump", "15.18")
    assert first is not None and first.message.startswith(TOO_OLD)
    assert tools.reported_tools()["pg_dump"] == "13.16"
    # "install postgresql-client-15": the next run sees it, and so does the heartbeat
    write_tool(tmp_path, "pg_dump", "pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1) upgraded")
    assert await tools.check_tools(engine, "dump", "15.18") is None
    assert tools.reported_tools()["pg_dump"] == "15.18"
    (tmp_path / "pg_dump").unlink()
    gone = await tools.check_tools(engine, "dump", "15.18")
    assert gone is not None and gone.code == "tool_missing"
    assert "pg_dump" not in tools.reported_tools()


async def test_a_tool_that_hangs_is_unknown_not_a_hung_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tools, "VERSION_TIMEOUT_S", 0.5)
    monkeypatch.setenv("RAHATBACK_PG_BIN", str(tmp_path))
    hang = tmp_path / "pg_dump"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    engine = ENGINES["postgresql"]
    started = asyncio.get_running_loop().time()
    await tools.detect_tools([engine])
    assert asyncio.get_running_loop().time() - started < 10
    assert tools.reported_tools()["pg_dump"] == tools.UNKNOWN_VERSION
    # an unreadable version blocks nothing: the tool's own error will tell
    assert await tools.check_tools(engine, "dump", "15.18") is None


# ------------------------------------------------------------------ runs and tests that a user sees

KEY = X25519PrivateKey.generate()


def now() -> datetime:
    return datetime.now(UTC)


def pg_target(
    pg: PostgresServer, database: str, info: str, public_key: str = public_key_b64(KEY)
) -> DatabaseTarget:
    return DatabaseTarget(
        name=database,
        engine="postgresql",
        settings={"host": pg.host, "port": pg.port, "user": pg.user, "database": database},
        secrets=seal(public_key, {"password": pg.password}, info),
    )


def backup_command(
    pg: PostgresServer, storage_dir: Path, public_key: str = public_key_b64(KEY), org_id: str = "o"
) -> BackupCommand:
    run_id = uuid.uuid4().hex
    return BackupCommand(
        command_id=uuid.uuid4().hex,
        org_id=org_id,
        issued_at=now(),
        expires_at=now() + timedelta(minutes=10),
        run_id=run_id,
        job_id=uuid.uuid4().hex,
        database=pg_target(pg, "postgres", seal_info("run", run_id), public_key),
        storage=StorageTarget(name="local", kind="local", settings={"path": str(storage_dir)}),
        encryption=EncryptionSpec(enabled=False),
    )


@pytest.fixture
def old_pg_dump(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RAHATBACK_PG_BIN with a pg_dump that says 13 (and the real psql 15); returns its call log."""
    bin_dir = tmp_path / "pg13-bin"
    calls = tmp_path / "pg_dump-calls"
    write_tool(bin_dir, "pg_dump", OLD_PG_DUMP, calls=calls)
    (bin_dir / "psql").symlink_to(PG_BIN / "psql")
    monkeypatch.setenv("RAHATBACK_PG_BIN", str(bin_dir))
    return calls


@pytest.mark.integration
async def test_backup_with_a_missing_pg_dump_fails_at_once_naming_the_package(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("RAHATBACK_PG_BIN", str(empty))
    storage = tmp_path / "storage"
    storage.mkdir()
    command = backup_command(postgres, storage)
    report = await jobs.run_backup(
        command,
        agent_id="a",
        private_key=KEY,
        progress=jobs.ProgressState(kind="backup", run_id=command.run_id),
    )
    assert isinstance(report, BackupFailed), report
    assert report.stage == "dumping"
    assert report.error == (
        f"pg_dump not found: install postgresql-client-15 and point RAHATBACK_PG_BIN (now {empty}) "
        "at /usr/lib/postgresql/15/bin"
    )
    assert list(storage.iterdir()) == []  # nothing was uploaded


@pytest.mark.integration
async def test_restore_with_a_too_old_psql_fails_before_downloading(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    write_tool(
        bin_dir, "psql", "psql (PostgreSQL) 13.16 (Debian 13.16-1.pgdg120+1)", calls=tmp_path / "calls"
    )
    monkeypatch.setenv("RAHATBACK_PG_BIN", str(bin_dir))
    restore_id = uuid.uuid4().hex
    command = RestoreCommand(
        command_id=uuid.uuid4().hex,
        org_id="o",
        issued_at=now(),
        expires_at=now() + timedelta(minutes=10),
        restore_id=restore_id,
        backup_run_id=uuid.uuid4().hex,
        database=pg_target(postgres, "postgres", seal_info("restore", restore_id)),
        storage=StorageTarget(name="local", kind="local", settings={"path": str(tmp_path)}),
        storage_key="there/is/no/such/artifact.sql.zst",  # the check comes first: never read
        compression="zstd",
        encrypted=False,
    )
    report = await jobs.run_restore(
        command, agent_id="a", private_key=KEY, progress=jobs.ProgressState(kind="restore", run_id=restore_id)
    )
    assert isinstance(report, RestoreFailed), report
    assert report.error == (
        f"psql 13 is older than server 15: install postgresql-client-15 and point RAHATBACK_PG_BIN "
        f"(now {bin_dir}) at /usr/lib/postgresql/15/bin"
    )
    assert calls_of(tmp_path / "calls") == ""  # the stand-in psql never ran as a restore


@pytest.mark.integration
async def test_an_old_pg_dump_fails_the_backup_and_warns_the_connection_test_over_nats(
    nats_server: NatsServer, api_nc: NATS, postgres: PostgresServer, tmp_path: Path, old_pg_dump: Path
) -> None:
    beats: list[dict[str, Any]] = []
    beat = asyncio.Event()
    async with running_agent(nats_server, api_nc, tmp_path) as agent:

        async def on_beat(msg: Msg) -> None:
            beats.append(json.loads(msg.data))
            beat.set()

        sub = await api_nc.subscribe(subjects.agent_heartbeat(agent.agent_id), cb=on_beat)
        try:
            request_id = uuid.uuid4().hex
            reply = await agent.request(
                "db.test",
                DbTestRequest(
                    request_id=request_id,
                    database=pg_target(
                        postgres, "postgres", seal_info("rpc", request_id), agent.public_key_b64
                    ),
                ),
            )
            # the connection works; what would not is said, with the package to install
            assert reply["ok"] is True, reply
            assert reply["server_version"].startswith("15.")
            assert reply["error_code"] == "tool_too_old"
            assert reply["warning"].startswith(TOO_OLD), reply
            assert reply["error"] is None

            command = backup_command(
                postgres, agent.storage_dir, agent.public_key_b64, org_id=agent.identity.org_id
            )
            await agent.send_command("job.execute", command)
            failed = await agent.reports.outcome("backup", "failed", "run_id", command.run_id)
            assert failed["error"].startswith(TOO_OLD), failed
            assert failed["stage"] == "dumping"
            assert list(agent.storage_dir.iterdir()) == []
            assert calls_of(old_pg_dump) == ""  # never started as a dump

            # the heartbeat shows the tools found at start-up: this pg_dump 13 and the real psql
            await asyncio.wait_for(beat.wait(), 10)
            assert beats[-1]["tools"]["pg_dump"] == "13.16"
            assert beats[-1]["tools"]["psql"] == real_version(PG_BIN / "psql")
        finally:
            await sub.unsubscribe()


@pytest.mark.integration
async def test_heartbeat_carries_the_real_tools_and_a_good_connection_test_has_no_warning(
    nats_server: NatsServer,
    api_nc: NATS,
    postgres: PostgresServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAHATBACK_PG_BIN", raising=False)
    monkeypatch.setenv("RAHATBACK_MONGO_BIN", str(tmp_path / "no-mongo-tools-here"))
    beats: dict[str, dict[str, Any]] = {}  # the first of each agent
    beat = asyncio.Event()

    async def on_beat(msg: Msg) -> None:
        body = json.loads(msg.data)
        beats.setdefault(body["agent_id"], body)
        beat.set()

    sub = await api_nc.subscribe(subjects.ALL_HEARTBEATS, cb=on_beat)
    try:
        async with running_agent(nats_server, api_nc, tmp_path) as agent:
            while agent.agent_id not in beats:  # running_agent returns once it has beaten
                beat.clear()
                await asyncio.wait_for(beat.wait(), 10)
            reported = beats[agent.agent_id]["tools"]
            assert reported["pg_dump"] == real_version(PG_BIN / "pg_dump")
            assert reported["psql"] == real_version(PG_BIN / "psql")
            assert "mongodump" not in reported  # absent = not found

            request_id = uuid.uuid4().hex
            reply = await agent.request(
                "db.test",
                DbTestRequest(
                    request_id=request_id,
                    database=pg_target(
                        postgres, "postgres", seal_info("rpc", request_id), agent.public_key_b64
                    ),
                ),
            )
            assert reply["ok"] is True and reply["warning"] is None and reply["error_code"] is None, reply
    finally:
        await sub.unsubscribe()


@pytest.mark.integration
async def test_connection_test_to_mariadb_warns_of_an_older_major_but_blocks_nothing(
    mariadb: MariaDBServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def request() -> DbTestRequest:
        request_id = uuid.uuid4().hex
        return DbTestRequest(
            request_id=request_id,
            database=DatabaseTarget(
                name="mysql",
                engine="mysql",
                settings={"host": mariadb.host, "port": mariadb.port, "user": mariadb.user},
                secrets=seal(
                    public_key_b64(KEY), {"password": mariadb.password}, seal_info("rpc", request_id)
                ),
            ),
        )

    monkeypatch.delenv("RAHATBACK_MYSQL_BIN", raising=False)
    good = await jobs.test_database(request(), private_key=KEY)
    assert good.ok and good.server_version and good.server_version.endswith("-MariaDB"), good
    assert good.warning is None and good.error_code is None, good

    series = ".".join(good.server_version.split(".")[:2])  # "10.11"
    # CentOS 7's mysqldump is MariaDB 5.5's: a dump should still work, so only a warning
    bin_dir = tmp_path / "mariadb-5.5"
    write_tool(bin_dir, "mysqldump", "mysqldump  Ver 10.14 Distrib 5.5.68-MariaDB, for Linux (x86_64)")
    (bin_dir / "mysql").symlink_to(shutil.which("mariadb") or "/usr/bin/mariadb")
    monkeypatch.setenv("RAHATBACK_MYSQL_BIN", str(bin_dir))
    old = await jobs.test_database(request(), private_key=KEY)
    assert old.ok and old.error_code is None, old
    assert old.warning is not None and old.warning.startswith(
        f"mysqldump is from MariaDB 5.5, older than the server (MariaDB {series}"
    ), old.warning
