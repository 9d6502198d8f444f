"""MongoDB: motor for the connection test and listing, `mongodump --archive` / `mongorestore --archive`.

Commands, settings, what the agent host needs and the restore semantics: docs/mongodb-and-mssql.md.

Credentials never reach argv (visible in `ps`): the password, and the URI when one is used, go into
a YAML file passed with `--config`, written 0600 in a private temporary directory that is removed
whatever happens.

A restore first spools the whole (already authenticated) archive to a private file, and starts
mongorestore only once the artifact stream has ended cleanly: mongorestore drops and rewrites
collections as it reads, so feeding it a stream that later turns out truncated or tampered would
leave the target half-restored. The cost is free disk space for one uncompressed dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

import bson
from bson.errors import BSONError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pymongo import errors as mongo_errors

from rahatback_agent.engines.base import Connection, EngineError, TableCounts, ToolAction, ToolProblem
from rahatback_agent.engines.process import ExplainFailure, StderrTail, stream_stdout

__all__ = [
    "MongoDBEngine",
    "MongoDBSettings",
    "archive_databases",
    "find_mongo_tool",
    "mongo_tool_problem",
    "tool_config",
]

CONNECT_TIMEOUT_S = 10
SYSTEM_DATABASES = frozenset({"admin", "config", "local"})
# MongoDB's own rules (the Windows set, so a name is valid wherever the server runs), plus NUL;
# they also keep names free of the characters mongorestore's --ns* patterns treat specially.
_FORBIDDEN_IN_DB_NAME = set('/\\. "$*<>:|?\x00')
_MAX_DB_NAME_BYTES = 63
_ARCHIVE_MAGIC = 0x8199E26D
_ARCHIVE_TERMINATOR = 0xFFFFFFFF
_MAX_PRELUDE_BYTES = 64 << 20


def check_database_name(name: str, what: str = "database") -> str:
    bad = sorted(set(name) & _FORBIDDEN_IN_DB_NAME)
    if not name or bad or len(name.encode()) > _MAX_DB_NAME_BYTES:
        shown = " ".join(repr(c) for c in bad)
        reason = f"must not contain {shown}" if bad else f"must be 1 to {_MAX_DB_NAME_BYTES} bytes long"
        raise ValueError(f"{what} name {reason}")
    return name


def _uri_parts(uri: str) -> tuple[str, str, str, dict[str, str]]:
    """(userinfo, hosts, path database, query options) without any DNS lookup (mongodb+srv)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        raise ValueError("must start with mongodb:// or mongodb+srv://")
    authority, _, tail = rest.partition("/")
    if "?" in authority:  # "mongodb://host?opts" without a slash
        authority, _, query = authority.partition("?")
        path = ""
    else:
        path, _, query = tail.partition("?")
    userinfo, _, hosts = authority.rpartition("@")
    if not hosts:
        raise ValueError("names no host")
    return userinfo, hosts, path, {k.lower(): v for k, v in parse_qsl(query)}


class MongoDBSettings(BaseModel):
    # extra keys are ignored: the control plane may store display-only fields next to these
    model_config = ConfigDict(frozen=True, extra="ignore")

    # either a connection string (no credentials in it) or host/port
    uri: str | None = Field(default=None, min_length=1)
    host: str | None = Field(default=None, min_length=1)
    port: int = Field(default=27017, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1)
    # where the user is defined; default admin (or the URI's authSource)
    auth_database: str | None = Field(default=None, min_length=1)
    # optional so databases can be listed before one is chosen; dump and restore require it
    database: str | None = Field(default=None, min_length=1)
    tls: bool = False
    tls_ca_file: str | None = Field(default=None, min_length=1)
    # restore: drop each collection before restoring it (mongorestore --drop)
    drop: bool = True
    # restore: where the archive is spooled before mongorestore runs (default: the temp dir)
    spool_dir: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_address(self) -> MongoDBSettings:
        if (self.uri is None) == (self.host is None):
            raise ValueError("give either uri or host, not both")
        if self.uri is not None:
            userinfo, _, path, options = _uri_parts(self.uri)
            if userinfo:
                raise ValueError("uri must not contain credentials: use the user and password fields")
            if path:
                raise ValueError("uri must not name a database: use the database field")
            from_uri = options.get("authsource")
            if from_uri and self.auth_database and from_uri != self.auth_database:
                raise ValueError("auth_database differs from the uri's authSource")
        if self.database is not None:
            check_database_name(self.database)
        return self

    @property
    def address(self) -> str:
        if self.uri is not None:
            return _uri_parts(self.uri)[1]
        return f"{self.host}:{self.port}"

    @property
    def auth_source(self) -> str | None:
        if not self.user:
            return None
        from_uri = _uri_parts(self.uri)[3].get("authsource") if self.uri else None
        return self.auth_database or from_uri or "admin"

    @property
    def use_tls(self) -> bool:
        return self.tls or self.tls_ca_file is not None


def parse_settings(raw: dict[str, Any]) -> MongoDBSettings:
    try:
        return MongoDBSettings.model_validate(raw)
    except ValidationError as exc:
        # only field names and rules: pydantic's own text echoes the input, which may hold a secret
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EngineError("bad_settings", f"invalid MongoDB settings: {problems}") from None


def _require_database(settings: MongoDBSettings) -> str:
    if not settings.database:
        raise EngineError("bad_settings", "invalid MongoDB settings: database: required to dump or restore")
    return settings.database


def _password(settings: MongoDBSettings, conn: Connection) -> str | None:
    password = conn.secrets.get("password") or None
    if settings.user and password is None:
        # the tools would prompt for it on a terminal the agent does not have
        raise EngineError("bad_settings", "invalid MongoDB settings: password: required when user is set")
    if password is not None and not settings.user:
        raise EngineError("bad_settings", "invalid MongoDB settings: user: required when a password is set")
    return password


# ---------------------------------------------------------------- tools


def find_mongo_tool(name: str) -> str:
    """RAHATBACK_MONGO_BIN (a directory), else PATH."""
    override = os.environ.get("RAHATBACK_MONGO_BIN")
    if override:
        tool = Path(override) / name
        if tool.is_file() and os.access(tool, os.X_OK):
            return str(tool)
    elif on_path := shutil.which(name):
        return on_path
    where = f"RAHATBACK_MONGO_BIN={override}" if override else "PATH"
    raise EngineError(
        "tool_failed", f"{name} not found in {where}: install the MongoDB Database Tools (100.x)"
    )


def _series(version: str) -> tuple[int, int] | None:
    match = re.match(r"r?(\d+)\.(\d+)", version)  # the tools bundled with servers before 4.4 say "r4.2.8"
    return (int(match.group(1)), int(match.group(2))) if match else None


def mongo_tool_problem(
    tool: str, tool_version: str | None, server_version: str, *, found: bool
) -> ToolProblem | None:
    """The engine passes the password in `--config`, which the Database Tools read from 100.3.0 on
    (the tools bundled with servers before 4.4 never did); 100.20.0 dropped the servers before 4.2.
    Sources in docs/dump-tools.md."""
    package = "mongodb-database-tools (MongoDB Database Tools 100.x)"
    override = os.environ.get("RAHATBACK_MONGO_BIN")
    point = f" and point RAHATBACK_MONGO_BIN (now {override}) at its directory" if override else ""
    if not found:
        return ToolProblem("tool_missing", f"{tool} not found: install {package}{point}")
    have = _series(tool_version) if tool_version else None
    server = _series(server_version)
    if have is None:
        return None
    if have < (100, 3):
        return ToolProblem(
            "tool_too_old",
            f"{tool} {tool_version} cannot take the password from --config (Database Tools 100.3.0 "
            f"and later can): install {package}{point}",
        )
    if server is not None and have >= (100, 20) and server < (4, 2):
        return ToolProblem(
            "tool_missing",
            f"{tool} {tool_version} cannot serve server {server_version}: the Database Tools dropped "
            "servers before 4.2 in 100.20.0; install Database Tools 100.19 or earlier and point "
            "RAHATBACK_MONGO_BIN at its directory",
        )
    return None


def _yaml_string(value: str) -> str:
    """A YAML double-quoted scalar: every character outside the printable set escaped, so any
    password survives the tools' YAML parser unchanged."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code > 0xFFFF:
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def tool_config(settings: MongoDBSettings, password: str | None) -> str | None:
    """The `--config` file's YAML (the tools read `password` and `uri` from it), or None if
    there is nothing to keep out of argv."""
    lines = []
    if settings.uri is not None:
        lines.append(f"uri: {_yaml_string(settings.uri)}")
    if password is not None:
        lines.append(f"password: {_yaml_string(password)}")
    return "".join(line + "\n" for line in lines) or None


def connection_args(settings: MongoDBSettings) -> list[str]:
    args = [] if settings.uri is not None else [f"--host={settings.host}", f"--port={settings.port}"]
    if settings.user:
        args += [f"--username={settings.user}", f"--authenticationDatabase={settings.auth_source}"]
    if settings.use_tls:
        args.append("--ssl")
    if settings.tls_ca_file:
        args.append(f"--sslCAFile={settings.tls_ca_file}")
    return args


def dump_argv(tool: str, settings: MongoDBSettings, database: str, config: Path | None) -> list[str]:
    # --archive without a value writes to stdout; no --gzip: the pipeline compresses
    head = [tool] + ([f"--config={config}"] if config else [])
    return [*head, "--archive", f"--db={database}", *connection_args(settings)]


def restore_argv(
    tool: str,
    settings: MongoDBSettings,
    archive: Path,
    source: str | None,
    target: str,
    config: Path | None,
) -> list[str]:
    argv = [tool] + ([f"--config={config}"] if config else []) + [f"--archive={archive}"]
    if source is not None:
        argv.append(f"--nsInclude={source}.*")
        if source != target:
            argv += [f"--nsFrom={source}.*", f"--nsTo={target}.*"]
    if settings.drop:
        argv.append("--drop")
    # without it mongorestore skips documents it cannot insert and still exits 0
    argv.append("--stopOnError")
    return [*argv, *connection_args(settings)]


@contextlib.contextmanager
def _private_dir(parent: str | None = None) -> Iterator[Path]:
    """A 0700 directory (mkdtemp's mode) removed with everything in it, whatever happens."""
    try:
        path = Path(tempfile.mkdtemp(prefix="rahatback-mongo-", dir=parent))
    except OSError as exc:
        where = f"spool_dir {parent}" if parent else "the temporary directory"
        message = f"cannot create a private folder in {where}: {exc.strerror}"
        raise EngineError("bad_settings", message) from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def _write_config(workdir: Path, settings: MongoDBSettings, password: str | None) -> Path | None:
    text = tool_config(settings, password)
    if text is None:
        return None
    path = workdir / "tool.yaml"
    _write_private(path, text)
    return path


def _explain_tool_failure(tool: str, settings: MongoDBSettings) -> ExplainFailure:
    def explain(status: int, stderr: str) -> EngineError:
        address = settings.address
        last = stderr.splitlines()[-1] if stderr else ""
        if "AuthenticationFailed" in stderr or "Authentication failed" in stderr:
            return EngineError(
                "auth_failed",
                f'authentication failed for user "{settings.user}" (auth database {settings.auth_source})',
            )
        if any(
            hint in stderr
            for hint in (
                "server selection error",
                "no reachable servers",
                "connection refused",
                "no such host",
                "i/o timeout",
            )
        ):
            return EngineError("unreachable", f"cannot reach {address}: {last}")
        tail = "\n".join(stderr.splitlines()[-10:]) or "(no error output)"
        return EngineError("tool_failed", f"{tool} exited with status {status}: {tail}")

    return explain


async def _run_tool(argv: list[str], explain: ExplainFailure, secrets: list[str]) -> None:
    """Run a tool that reads no stdin to its end; cancelling kills it first."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
    except OSError as exc:
        raise EngineError("tool_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
    stderr = StderrTail(proc.stderr, secrets)
    try:
        status = await proc.wait()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        await stderr.finish()
        raise
    if status != 0:
        raise explain(status, await stderr.text())
    await stderr.finish()


# ---------------------------------------------------------------- archive prelude


def _read_exactly(fh: IO[bytes], size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise EngineError("error", "the dump is not a complete mongodump archive (it ends in its header)")
    return data


def archive_databases(fh: IO[bytes]) -> set[str]:
    """The databases a mongodump archive holds, from its prelude (magic number, header document,
    one metadata document per collection, terminator; mongo-tools common/archive/spec.md)."""
    (magic,) = struct.unpack("<I", _read_exactly(fh, 4))
    if magic != _ARCHIVE_MAGIC:
        raise EngineError("error", "the dump is not a mongodump archive (wrong magic number)")
    names: set[str] = set()
    seen = 4
    first = True
    while True:
        raw_size = _read_exactly(fh, 4)
        (size,) = struct.unpack("<I", raw_size)
        if size == _ARCHIVE_TERMINATOR:
            return names
        seen += size
        if size < 5 or seen > _MAX_PRELUDE_BYTES:
            raise EngineError("error", "the mongodump archive has a malformed header")
        try:
            document = bson.decode(raw_size + _read_exactly(fh, size - 4))
        except BSONError:
            raise EngineError("error", "the mongodump archive has a malformed header") from None
        if not first:
            names.add(str(document.get("db", "")))
        first = False


def _source_database(path: Path) -> str | None:
    with path.open("rb") as fh:
        names = archive_databases(fh)
    if not names:
        return None  # a dump of a database without collections: nothing to restore or rename
    if len(names) > 1:
        raise EngineError("error", f"the archive holds {len(names)} databases; RahatBack dumps one")
    (name,) = names
    try:
        return check_database_name(name, "the archive's database")
    except ValueError as exc:
        raise EngineError("error", str(exc)) from None


async def _spool(chunks: AsyncIterator[bytes], path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    written = 0
    with os.fdopen(fd, "wb") as fh:
        async for chunk in chunks:
            if chunk:
                await asyncio.to_thread(fh.write, chunk)
                written += len(chunk)
    return written


# ---------------------------------------------------------------- engine


def _describe_client_error(exc: mongo_errors.PyMongoError, settings: MongoDBSettings) -> EngineError:
    address = settings.address
    if isinstance(exc, mongo_errors.OperationFailure) and exc.code == 18:
        return EngineError(
            "auth_failed",
            f'authentication failed for user "{settings.user}" (auth database {settings.auth_source})',
        )
    if isinstance(exc, mongo_errors.OperationFailure) and exc.code == 13:
        reason = (exc.details or {}).get("errmsg", "not authorized")
        return EngineError("auth_failed", f'user "{settings.user}" may not do this on {address}: {reason}')
    if isinstance(exc, mongo_errors.ConfigurationError):
        return EngineError("bad_settings", f"invalid MongoDB settings: {exc}")
    if isinstance(exc, mongo_errors.ServerSelectionTimeoutError):
        # "host:27017: [Errno 111] Connection refused (configured timeouts: ...), Timeout: 10s, Topology ..."
        reason = str(exc).split(" (configured timeouts", 1)[0].split(", Timeout:", 1)[0]
        if "timed out" in reason and "refused" not in reason:
            return EngineError("timeout", f"no answer from {address} within {CONNECT_TIMEOUT_S} s: {reason}")
        return EngineError("unreachable", f"cannot reach {address}: {reason}")
    if isinstance(exc, mongo_errors.ExecutionTimeout | mongo_errors.NetworkTimeout):
        return EngineError("timeout", f"no answer from {address} within {CONNECT_TIMEOUT_S} s")
    if isinstance(exc, mongo_errors.ConnectionFailure):
        return EngineError("unreachable", f"cannot reach {address}: {exc}")
    return EngineError("error", f"{address}: {exc}")


class MongoDBEngine:
    name = "mongodb"
    dump_format = "mongodb-archive"
    dump_extension = "archive"
    tools: tuple[str, ...] = ("mongodump", "mongorestore")

    def locate_tool(self, name: str) -> str | None:
        try:
            return find_mongo_tool(name)
        except EngineError:
            return None

    def tool_problem(
        self, action: ToolAction, versions: Mapping[str, str | None], server_version: str
    ) -> ToolProblem | None:
        tool = "mongodump" if action == "dump" else "mongorestore"
        return mongo_tool_problem(tool, versions.get(tool), server_version, found=tool in versions)

    def client_options(self, settings: MongoDBSettings, password: str | None) -> dict[str, Any]:
        timeout_ms = CONNECT_TIMEOUT_S * 1000
        options: dict[str, Any] = {
            "appname": "rahatback",
            "serverSelectionTimeoutMS": timeout_ms,
            "connectTimeoutMS": timeout_ms,
            "socketTimeoutMS": timeout_ms,
        }
        if settings.uri is None:
            # like the tools with --host: talk to that server, not to the replica-set members it
            # advertises (their names may not resolve from the agent's host)
            options.update(host=settings.host, port=settings.port, directConnection=True)
        else:
            options["host"] = settings.uri
        if settings.user:
            options.update(username=settings.user, password=password, authSource=settings.auth_source)
        if settings.use_tls:
            options["tls"] = True
        if settings.tls_ca_file:
            options["tlsCAFile"] = settings.tls_ca_file
        return options

    @asynccontextmanager
    async def _client(self, conn: Connection) -> AsyncIterator[tuple[Any, MongoDBSettings]]:
        settings = parse_settings(conn.settings)
        password = _password(settings, conn)
        from motor.motor_asyncio import AsyncIOMotorClient

        try:
            client: Any = AsyncIOMotorClient(**self.client_options(settings, password))
        except mongo_errors.PyMongoError as exc:
            raise _describe_client_error(exc, settings) from None
        try:
            yield client, settings
        except mongo_errors.PyMongoError as exc:
            raise _describe_client_error(exc, settings) from None
        finally:
            client.close()

    async def test(self, conn: Connection) -> str:
        async with self._client(conn) as (client, _):
            info = await client.admin.command("buildInfo")
        return str(info.get("version", "unknown"))

    async def list_databases(self, conn: Connection) -> list[str]:
        async with self._client(conn) as (client, _):
            # authorizedDatabases: a user without the listDatabases privilege still sees theirs
            cursor = await client.list_databases(nameOnly=True, authorizedDatabases=True)
            names = [str(doc["name"]) for doc in await cursor.to_list(length=None)]
        return sorted(name for name in names if name not in SYSTEM_DATABASES)

    def dump(
        self, conn: Connection, counts: TableCounts | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        # no row counts: the archive/backup file is opaque to the agent (docs/verification.md)
        return self._dump(conn)

    @asynccontextmanager
    async def _dump(self, conn: Connection) -> AsyncIterator[AsyncIterator[bytes]]:
        settings = parse_settings(conn.settings)
        database = _require_database(settings)
        password = _password(settings, conn)
        tool = find_mongo_tool("mongodump")
        with _private_dir() as workdir:
            config = _write_config(workdir, settings, password)
            async with stream_stdout(
                dump_argv(tool, settings, database, config),
                env=os.environ,
                explain=_explain_tool_failure("mongodump", settings),
                secrets=list(conn.secrets.values()),
            ) as chunks:
                yield chunks

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        settings = parse_settings(conn.settings)
        target = _require_database(settings)
        password = _password(settings, conn)
        tool = find_mongo_tool("mongorestore")
        with _private_dir(settings.spool_dir) as workdir:
            archive = workdir / "restore.archive"
            # the whole artifact first: if it is truncated or tampered, this raises and
            # mongorestore never starts, so the target is untouched
            fed = await _spool(chunks, archive)
            source = await asyncio.to_thread(_source_database, archive)
            config = _write_config(workdir, settings, password)
            await _run_tool(
                restore_argv(tool, settings, archive, source, target, config),
                _explain_tool_failure("mongorestore", settings),
                list(conn.secrets.values()),
            )
        return fed
