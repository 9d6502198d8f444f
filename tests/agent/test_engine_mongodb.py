"""MongoDBEngine without a MongoDB server or the MongoDB Database Tools (neither can be installed here).

What is tested: the exact mongodump/mongorestore argv and `--config` YAML built for given settings
(the password only in a 0600 file that is gone afterwards, even on failure); streaming through the
real pipeline with stand-in `mongodump`/`mongorestore` executables put first on PATH (a backup →
restore round trip where the stand-in restore receives byte-identical data); the connection test
against mockupdb, a MongoDB wire-protocol fake (when installed), and against a closed port.
Not tested: real mongodump/mongorestore against a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bson
import pytest
import yaml
from rahatback_agent.engines import mongodb
from rahatback_agent.engines.base import Connection, EngineError
from rahatback_agent.engines.mongodb import (
    MongoDBEngine,
    MongoDBSettings,
    archive_databases,
    connection_args,
    dump_argv,
    restore_argv,
    tool_config,
)
from rahatback_agent.engines.process import CHUNK_SIZE
from rahatback_agent.engines.registry import get_engine
from rahatback_agent.pipeline import restore_stream, run_backup_pipeline
from rahatback_agent.storages.local import LocalStorage

PASSWORD = 'Pa$$: "w0rd" #not-a-comment \\ ünï'
JOB_KEY = os.urandom(32)


def make_archive(database: str, collections: list[str], body: bytes) -> bytes:
    """A mongodump archive prelude (mongo-tools common/archive/spec.md) followed by `body`."""
    prelude = struct.pack("<I", 0x8199E26D) + bson.encode(
        {"concurrent_collections": 4, "version": "0.1", "server_version": "7.0.2", "tool_version": "100.9.4"}
    )
    for name in collections:
        prelude += bson.encode({"db": database, "collection": name, "metadata": "{}", "size": 0, "type": ""})
    return prelude + b"\xff\xff\xff\xff" + body


# ---------------------------------------------------------------- argv and config


def settings_for(**values: Any) -> MongoDBSettings:
    return MongoDBSettings.model_validate(values)


def test_registry_hands_out_the_engine() -> None:
    assert get_engine("mongodb").name == "mongodb"


def test_dump_argv_for_host_settings() -> None:
    settings = settings_for(
        host="db.example.net", port=27018, user="backup", database="shop", tls=True, tls_ca_file="/etc/ca.pem"
    )
    assert dump_argv("/opt/mongodump", settings, "shop", Path("/tmp/rb/tool.yaml")) == [
        "/opt/mongodump",
        "--config=/tmp/rb/tool.yaml",
        "--archive",
        "--db=shop",
        "--host=db.example.net",
        "--port=27018",
        "--username=backup",
        "--authenticationDatabase=admin",
        "--ssl",
        "--sslCAFile=/etc/ca.pem",
    ]
    assert tool_config(settings, PASSWORD) is not None
    assert "uri" not in yaml.safe_load(tool_config(settings, PASSWORD) or "")


def test_uri_settings_put_the_uri_in_the_config_file_only() -> None:
    uri = "mongodb+srv://cluster0.example.net/?authSource=users&retryWrites=true"
    settings = settings_for(uri=uri, user="backup", database="shop")
    argv = dump_argv("mongodump", settings, "shop", Path("/c.yaml"))
    assert argv == [
        "mongodump",
        "--config=/c.yaml",
        "--archive",
        "--db=shop",
        "--username=backup",
        "--authenticationDatabase=users",
    ]
    assert not any(uri in arg for arg in argv)
    assert yaml.safe_load(tool_config(settings, PASSWORD) or "") == {"uri": uri, "password": PASSWORD}


def test_without_credentials_there_is_no_config_file() -> None:
    settings = settings_for(host="localhost", database="shop")
    assert tool_config(settings, None) is None
    assert connection_args(settings) == ["--host=localhost", "--port=27017"]
    assert dump_argv("mongodump", settings, "shop", None) == [
        "mongodump",
        "--archive",
        "--db=shop",
        "--host=localhost",
        "--port=27017",
    ]


@pytest.mark.parametrize(
    "password",
    [
        PASSWORD,
        "'single' and \"double\"",
        "- starts like a list",
        "null",
        "  spaces around  ",
        "tab\tnewline\ncr\r",
        "del\x7f c1\x85 nbsp\xa0",
        "emoji 🙂 and ✓",
        "{flow: [mapping]}",
        "&anchor *alias !tag %directive @at `tick`",
    ],
)
def test_any_password_survives_the_yaml_config(password: str) -> None:
    text = tool_config(settings_for(host="h", user="u"), password)
    assert text is not None
    assert yaml.safe_load(text) == {"password": password}


def test_restore_argv_renames_and_drops() -> None:
    settings = settings_for(host="h", user="u", auth_database="users", database="shop_copy")
    argv = restore_argv(
        "mongorestore", settings, Path("/s/a.archive"), "shop", "shop_copy", Path("/s/c.yaml")
    )
    assert argv == [
        "mongorestore",
        "--config=/s/c.yaml",
        "--archive=/s/a.archive",
        "--nsInclude=shop.*",
        "--nsFrom=shop.*",
        "--nsTo=shop_copy.*",
        "--drop",
        "--stopOnError",
        "--host=h",
        "--port=27017",
        "--username=u",
        "--authenticationDatabase=users",
    ]
    same = restore_argv("mongorestore", settings_for(host="h", drop=False), Path("/a"), "shop", "shop", None)
    assert same == [
        "mongorestore",
        "--archive=/a",
        "--nsInclude=shop.*",
        "--stopOnError",
        "--host=h",
        "--port=27017",
    ]


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"database": "d"}, "either uri or host"),
        ({"host": "h", "uri": "mongodb://h", "database": "d"}, "either uri or host"),
        ({"uri": "mongodb://u:hunter2-secret@h/", "database": "d"}, "must not contain credentials"),
        ({"uri": "mongodb://h/shop", "database": "d"}, "must not name a database"),
        ({"uri": "http://h", "database": "d"}, "mongodb://"),
        ({"uri": "mongodb://h/?authSource=a", "auth_database": "b"}, "authSource"),
        ({"host": "h", "database": "a.b"}, "must not contain"),
        ({"host": "h", "database": "x" * 64}, "1 to 63 bytes"),
        ({"host": "h", "port": 0}, "port"),
    ],
)
async def test_bad_settings_say_what_to_change_without_echoing(
    settings: dict[str, Any], problem: str
) -> None:
    with pytest.raises(EngineError) as err:
        await MongoDBEngine().test(Connection(settings))
    assert err.value.code == "bad_settings"
    assert problem in err.value.message
    assert "hunter2-secret" not in err.value.message


async def test_user_and_password_go_together() -> None:
    with pytest.raises(EngineError, match="password: required when user is set"):
        await MongoDBEngine().test(Connection({"host": "h", "user": "u"}))
    with pytest.raises(EngineError, match="user: required"):
        await MongoDBEngine().test(Connection({"host": "h"}, {"password": "p"}))


def test_archive_prelude_names_its_database() -> None:
    import io

    assert archive_databases(io.BytesIO(make_archive("shop", ["a", "b"], b"rest"))) == {"shop"}
    assert archive_databases(io.BytesIO(make_archive("shop", [], b""))) == set()
    for broken in (b"", b"\x00\x00\x00\x00", make_archive("shop", ["a"], b"")[:30]):
        with pytest.raises(EngineError):
            archive_databases(io.BytesIO(broken))


# ---------------------------------------------------------------- stand-in tools on PATH

STAND_IN = r"""#!{python}
# Stand-in for mongodump/mongorestore: records what it was given, then behaves as STANDIN_MODE says.
import json, os, shutil, stat, sys, time

tool = os.path.basename(sys.argv[0])
record_dir = os.environ["STANDIN_RECORD"]
config = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), None)
seen = {{"argv": sys.argv[1:], "config": config, "pid": os.getpid()}}
if config:
    seen["config_mode"] = stat.S_IMODE(os.stat(config).st_mode)
    seen["dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(config)).st_mode)
    seen["config_text"] = open(config, encoding="utf-8").read()
mode = os.environ.get("STANDIN_MODE", "ok")
if tool == "mongorestore":
    archive = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--archive="))
    seen["archive"] = archive
    seen["archive_mode"] = stat.S_IMODE(os.stat(archive).st_mode)
    if mode == "ok":
        shutil.copyfile(archive, os.path.join(record_dir, "restored.archive"))
with open(os.path.join(record_dir, tool + ".json"), "w") as fh:
    json.dump(seen, fh)
if mode == "hang":
    time.sleep(3600)
if mode == "auth":
    # real tools never print the password; this one does, to prove the agent scrubs it
    sys.stderr.write("Failed: auth error: password " + seen.get("config_text", "") + "\n")
    sys.stderr.write("(AuthenticationFailed) Authentication failed.\n")
    sys.exit(1)
if mode == "refused":
    sys.stderr.write("Failed: can't create session: server selection error: dial tcp 10.0.0.9:27017: "
                     "connect: connection refused\n")
    sys.exit(1)
if mode == "broken":
    sys.stderr.write("Failed: shop.orders: error restoring from archive: bad data\n")
    sys.exit(2)
if tool == "mongodump":
    with open(os.environ["STANDIN_ARCHIVE"], "rb") as fh:
        shutil.copyfileobj(fh, sys.stdout.buffer)
"""


@dataclass
class StandIn:
    bin_dir: Path
    record_dir: Path
    monkeypatch: pytest.MonkeyPatch

    def serve(self, archive: bytes) -> None:
        path = self.record_dir / "source.archive"
        path.write_bytes(archive)
        self.monkeypatch.setenv("STANDIN_ARCHIVE", str(path))

    def mode(self, mode: str) -> None:
        self.monkeypatch.setenv("STANDIN_MODE", mode)

    def seen(self, tool: str) -> dict[str, Any]:
        path = self.record_dir / f"{tool}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def restored(self) -> bytes:
        return (self.record_dir / "restored.archive").read_bytes()


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    bin_dir = tmp_path / "bin"
    record_dir = tmp_path / "record"
    bin_dir.mkdir()
    record_dir.mkdir()
    for tool in ("mongodump", "mongorestore"):
        script = bin_dir / tool
        script.write_text(STAND_IN.format(python=sys.executable))
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("RAHATBACK_MONGO_BIN", raising=False)
    monkeypatch.setenv("STANDIN_RECORD", str(record_dir))
    yield StandIn(bin_dir, record_dir, monkeypatch)


def conn_for(database: str = "shop", password: str | None = PASSWORD, **extra: Any) -> Connection:
    settings: dict[str, Any] = {"host": "10.0.0.9", "database": database, **extra}
    if password is not None:
        settings.setdefault("user", "backup")
    return Connection(settings, {"password": password} if password is not None else {})


async def collect(conn: Connection) -> list[bytes]:
    async with MongoDBEngine().dump(conn) as chunks:
        return [chunk async for chunk in chunks]


async def replay(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


class ArtifactTampered(Exception):
    pass


async def replay_then_fail(data: bytes, after: int) -> AsyncIterator[bytes]:
    yield data[:after]
    raise ArtifactTampered("chunk 2 failed authentication")


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def gone(path: str) -> bool:
    return not os.path.exists(path)


async def test_dump_streams_the_tools_stdout_with_the_password_only_in_a_private_file(
    stand_in: StandIn,
) -> None:
    archive = make_archive("shop", ["orders"], os.urandom(2 * CHUNK_SIZE + 99))
    stand_in.serve(archive)

    chunks = await collect(conn_for())

    assert b"".join(chunks) == archive
    assert all(len(c) == CHUNK_SIZE for c in chunks[:-1])
    seen = stand_in.seen("mongodump")
    config = seen["config"]
    assert seen["argv"] == [
        f"--config={config}",
        "--archive",
        "--db=shop",
        "--host=10.0.0.9",
        "--port=27017",
        "--username=backup",
        "--authenticationDatabase=admin",
    ]
    assert not any(PASSWORD in arg for arg in seen["argv"])
    assert yaml.safe_load(seen["config_text"]) == {"password": PASSWORD}
    assert seen["config_mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert gone(config) and gone(os.path.dirname(config))


async def test_failed_dump_is_auth_failed_scrubbed_and_cleaned_up(stand_in: StandIn) -> None:
    stand_in.mode("auth")
    async with MongoDBEngine().dump(conn_for()) as chunks:
        with pytest.raises(EngineError) as err:
            async for _ in chunks:
                pass
    assert err.value.code == "auth_failed"
    assert err.value.message == 'authentication failed for user "backup" (auth database admin)'
    assert gone(stand_in.seen("mongodump")["config"])


async def test_unreachable_server_during_dump(stand_in: StandIn) -> None:
    stand_in.mode("refused")
    with pytest.raises(EngineError) as err:
        await collect(conn_for())
    assert err.value.code == "unreachable"
    assert err.value.message.startswith("cannot reach 10.0.0.9:27017: ")
    assert "connection refused" in err.value.message


async def test_leaving_the_dump_early_removes_the_config(stand_in: StandIn) -> None:
    stand_in.serve(make_archive("shop", ["a"], os.urandom(4 * CHUNK_SIZE)))
    async with MongoDBEngine().dump(conn_for()) as chunks:
        assert await anext(aiter(chunks))
        config = stand_in.seen("mongodump")["config"]
        assert not gone(config)
    assert gone(os.path.dirname(config))


async def test_missing_tool_is_tool_failed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAHATBACK_MONGO_BIN", str(tmp_path))
    with pytest.raises(EngineError) as err:
        await collect(conn_for())
    assert err.value.code == "tool_failed"
    assert "mongodump not found" in err.value.message
    assert "MongoDB Database Tools" in err.value.message


async def test_backup_pipeline_restore_round_trip_is_byte_identical(
    stand_in: StandIn, tmp_path: Path
) -> None:
    archive = make_archive("shop", ["orders", "customers"], os.urandom(3 * CHUNK_SIZE + 4321))
    stand_in.serve(archive)
    (tmp_path / "storage").mkdir()
    storage = LocalStorage(tmp_path / "storage")
    writer = await storage.open_writer("shop/shop.archive.zst.rbk")
    async with MongoDBEngine().dump(conn_for()) as source:
        result = await run_backup_pipeline(
            source, writer, compression="zstd", level=3, job_key=JOB_KEY, key_id="job-1"
        )
    await writer.commit()

    spool = tmp_path / "spool"
    spool.mkdir()
    chunks = restore_stream(
        storage.read("shop/shop.archive.zst.rbk"),
        compression="zstd",
        job_key_lookup=JOB_KEY,
        expected_artifact_sha256=result.artifact_sha256,
        expected_dump_sha256=result.dump_sha256,
    )
    fed = await MongoDBEngine().restore(conn_for("shop_copy", spool_dir=str(spool)), chunks)

    assert fed == len(archive)
    assert stand_in.restored() == archive
    seen = stand_in.seen("mongorestore")
    assert seen["argv"] == [
        f"--config={seen['config']}",
        f"--archive={seen['archive']}",
        "--nsInclude=shop.*",
        "--nsFrom=shop.*",
        "--nsTo=shop_copy.*",
        "--drop",
        "--stopOnError",
        "--host=10.0.0.9",
        "--port=27017",
        "--username=backup",
        "--authenticationDatabase=admin",
    ]
    assert Path(seen["archive"]).parent.parent == spool
    assert seen["archive_mode"] == 0o600 and seen["config_mode"] == 0o600
    assert yaml.safe_load(seen["config_text"]) == {"password": PASSWORD}
    assert names_in(spool) == []


async def test_restore_whose_input_fails_never_starts_mongorestore(stand_in: StandIn, tmp_path: Path) -> None:
    archive = make_archive("shop", ["orders"], os.urandom(CHUNK_SIZE))
    with pytest.raises(ArtifactTampered):
        await MongoDBEngine().restore(
            conn_for(spool_dir=str(tmp_path)), replay_then_fail(archive, len(archive) // 2)
        )
    assert stand_in.seen("mongorestore") == {}
    assert names_in(tmp_path) == ["bin", "record"]


async def test_failed_restore_is_tool_failed_and_cleaned_up(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.mode("broken")
    archive = make_archive("shop", ["orders"], b"data")
    with pytest.raises(EngineError) as err:
        await MongoDBEngine().restore(conn_for("shop", spool_dir=str(tmp_path)), replay([archive]))
    assert err.value.code == "tool_failed"
    assert err.value.message.startswith("mongorestore exited with status 2: Failed: shop.orders")
    seen = stand_in.seen("mongorestore")
    assert "--nsFrom=shop.*" not in seen["argv"]  # same name: nothing to rename
    assert gone(seen["archive"]) and gone(seen["config"])


async def test_cancelled_restore_kills_mongorestore_and_cleans_up(stand_in: StandIn, tmp_path: Path) -> None:
    stand_in.mode("hang")
    archive = make_archive("shop", ["orders"], b"data")
    task = asyncio.create_task(
        MongoDBEngine().restore(conn_for("shop", spool_dir=str(tmp_path)), replay([archive]))
    )
    for _ in range(2000):
        if stand_in.seen("mongorestore"):
            break
        await asyncio.sleep(0.01)
    seen = stand_in.seen("mongorestore")
    task.cancel()
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)  # a restore tool left running would hang here
        with pytest.raises(ProcessLookupError):
            os.kill(seen["pid"], 0)  # killed and reaped
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(seen["pid"], signal.SIGKILL)
    assert gone(seen["archive"]) and gone(seen["config"])


async def test_restore_of_something_that_is_not_an_archive(stand_in: StandIn) -> None:
    with pytest.raises(EngineError) as err:
        await MongoDBEngine().restore(conn_for(), replay([b"-- PostgreSQL database dump\n"]))
    assert "not a mongodump archive" in err.value.message
    assert stand_in.seen("mongorestore") == {}


# ---------------------------------------------------------------- motor: connection test and listing


def test_client_options() -> None:
    engine = MongoDBEngine()
    options = engine.client_options(settings_for(host="h", port=27018, user="u", tls_ca_file="/ca.pem"), "pw")
    assert options == {
        "appname": "rahatback",
        "serverSelectionTimeoutMS": 10_000,
        "connectTimeoutMS": 10_000,
        "socketTimeoutMS": 10_000,
        "host": "h",
        "port": 27018,
        "directConnection": True,
        "username": "u",
        "password": "pw",
        "authSource": "admin",
        "tls": True,
        "tlsCAFile": "/ca.pem",
    }
    uri = "mongodb://a,b/?replicaSet=rs0"
    by_uri = engine.client_options(settings_for(uri=uri), None)
    assert by_uri["host"] == uri and "directConnection" not in by_uri and "username" not in by_uri


async def test_closed_port_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.servers import free_port

    monkeypatch.setattr(mongodb, "CONNECT_TIMEOUT_S", 1)
    port = free_port()
    conn = Connection({"host": "127.0.0.1", "port": port, "user": "u"}, {"password": PASSWORD})
    with pytest.raises(EngineError) as err:
        await MongoDBEngine().test(conn)
    assert err.value.code == "unreachable"
    assert err.value.message.startswith(f"cannot reach 127.0.0.1:{port}: ")
    assert "refused" in err.value.message
    assert PASSWORD not in err.value.message


@pytest.fixture
def mock_server() -> Iterator[Any]:
    mockupdb = pytest.importorskip(
        "mockupdb", reason="mockupdb (a MongoDB wire-protocol fake) is not installed"
    )
    server = mockupdb.MockupDB(auto_ismaster={"maxWireVersion": 21})
    server.run()
    yield server
    server.stop()


def mock_conn(server: Any, **extra: Any) -> Connection:
    return Connection(
        {"host": "127.0.0.1", "port": server.port, **extra}, {"password": PASSWORD} if extra else {}
    )


async def test_version_comes_from_build_info(mock_server: Any) -> None:
    mock_server.autoresponds("buildInfo", version="7.0.14", gitVersion="abc")
    assert await MongoDBEngine().test(mock_conn(mock_server)) == "7.0.14"


async def test_wrong_password_is_auth_failed(mock_server: Any) -> None:
    mock_server.autoresponds(
        "saslStart",
        {"ok": 0, "errmsg": "Authentication failed.", "code": 18, "codeName": "AuthenticationFailed"},
    )
    with pytest.raises(EngineError) as err:
        await MongoDBEngine().test(mock_conn(mock_server, user="backup", auth_database="users"))
    assert err.value.code == "auth_failed"
    assert err.value.message == 'authentication failed for user "backup" (auth database users)'


async def test_listing_leaves_out_system_databases(mock_server: Any) -> None:
    names = ["admin", "config", "local", "shop", "analytics"]
    requests: list[dict[str, Any]] = []

    def list_databases(request: Any) -> bool:
        requests.append(dict(request.doc))
        return bool(request.ok(databases=[{"name": n} for n in names]))

    mock_server.autoresponds("listDatabases", list_databases)
    assert await MongoDBEngine().list_databases(mock_conn(mock_server)) == ["analytics", "shop"]
    # a user without the listDatabases privilege still sees the databases it may use
    assert requests[0]["authorizedDatabases"] is True
    assert requests[0]["nameOnly"] is True
