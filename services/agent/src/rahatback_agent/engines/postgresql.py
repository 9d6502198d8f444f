"""PostgreSQL: asyncpg for the connection test, plain-format pg_dump for backups, psql for restores.

Why plain SQL, the exact flags and how a restore stays all-or-nothing: docs/postgresql-dumps.md.
Row counts for the manifest are counted from the dump's own COPY sections as they stream past
(CopyRowCounter); scratch databases of test restores: docs/verification.md.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import shutil
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rahatback_agent.engines.base import Connection, EngineError, TableCounts, ToolAction, ToolProblem
from rahatback_agent.engines.process import ExplainFailure, feed_stdin, stream_stdout

__all__ = ["PostgreSQLEngine", "PostgreSQLSettings", "find_pg_tool", "pg_major", "pg_tool_problem"]

log = structlog.get_logger("rahatback_agent.engines.postgresql")

CONNECT_TIMEOUT_S = 10
_PG_ROOT = Path("/usr/lib/postgresql")

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


# the maintenance database and the cloud providers' own: never part of "every database on the server"
SYSTEM_DATABASES = frozenset({"postgres", "rdsadmin", "azure_maintenance", "azure_sys", "cloudsqladmin"})


class PostgreSQLSettings(BaseModel):
    # extra keys are ignored: the control plane may store display-only fields next to these
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = Field(min_length=1)
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(min_length=1)
    # optional so databases can be listed before one is chosen; dump and restore require it
    database: str | None = Field(default=None, min_length=1)
    sslmode: SslMode | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_settings(raw: dict[str, Any]) -> PostgreSQLSettings:
    try:
        return PostgreSQLSettings.model_validate(raw)
    except ValidationError as exc:
        # only field names and rules: pydantic's own text echoes the input, which may hold a secret
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EngineError("bad_settings", f"invalid PostgreSQL settings: {problems}") from None


def _pg_bin_dirs() -> list[Path]:
    """Newest installed major first: pg_dump refuses servers newer than itself, never older ones."""
    if not _PG_ROOT.is_dir():
        return []
    majors = [p for p in _PG_ROOT.iterdir() if p.name.isdigit() and (p / "bin").is_dir()]
    return [p / "bin" for p in sorted(majors, key=lambda p: int(p.name), reverse=True)]


def find_pg_tool(name: str) -> str:
    """RAHATBACK_PG_BIN, else the newest /usr/lib/postgresql/<major>/bin, else PATH."""
    override = os.environ.get("RAHATBACK_PG_BIN")
    candidates = [Path(override)] if override else _pg_bin_dirs()
    for directory in candidates:
        tool = directory / name
        if tool.is_file() and os.access(tool, os.X_OK):
            return str(tool)
    if not override and (on_path := shutil.which(name)):
        return on_path
    where = f"RAHATBACK_PG_BIN={override}" if override else f"{_PG_ROOT}/<version>/bin or PATH"
    raise EngineError("tool_failed", f"{name} not found in {where}: install the PostgreSQL client tools")


def pg_major(version: str) -> str | None:
    """The major of a version: 15.18 -> 15, 17beta1 -> 17, 9.6.24 -> 9.6 (two parts before 10)."""
    match = re.match(r"(\d+)(?:\.(\d+))?", version)
    if not match:
        return None
    first = int(match.group(1))
    return str(first) if first >= 10 else f"{first}.{int(match.group(2) or 0)}"


def _major_key(major: str) -> tuple[int, ...]:
    return tuple(int(part) for part in major.split("."))


def pg_tool_problem(
    tool: str, tool_version: str | None, server_version: str, *, found: bool
) -> ToolProblem | None:
    """pg_dump refuses a server of a newer major than its own; psql gets the same rule so that it
    understands everything such a pg_dump writes. Both come in postgresql-client-<major>."""
    server = pg_major(server_version)
    package = f"postgresql-client-{server}" if server else "postgresql-client"
    override = os.environ.get("RAHATBACK_PG_BIN")
    # the newest /usr/lib/postgresql/<major>/bin is found by itself; an override must be moved by hand
    point = f" and point RAHATBACK_PG_BIN (now {override}) at {_PG_ROOT}/{server}/bin" if override else ""
    if not found:
        return ToolProblem("tool_missing", f"{tool} not found: install {package}{point}")
    have = pg_major(tool_version) if tool_version else None
    if server is None or have is None or _major_key(have) >= _major_key(server):
        return None  # an unreadable version: let the tool try, its own error is explained
    what = f"cannot dump server {server}" if tool == "pg_dump" else f"is older than server {server}"
    return ToolProblem("tool_too_old", f"{tool} {have} {what}: install {package}{point}")


_restrict_key_support: dict[str, bool] = {}


async def _supports_restrict_key(pg_dump: str) -> bool:
    if pg_dump not in _restrict_key_support:
        proc = await asyncio.create_subprocess_exec(
            pg_dump, "--help", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        _restrict_key_support[pg_dump] = b"--restrict-key" in out
    return _restrict_key_support[pg_dump]


def _explain_tool_failure(tool: str, settings: PostgreSQLSettings) -> ExplainFailure:
    def explain(status: int, stderr: str) -> EngineError:
        user, address = settings.user, settings.address
        if "password authentication failed" in stderr:
            return EngineError("auth_failed", f'password authentication failed for user "{user}"')
        missing = re.search(r'database "([^"]*)" does not exist', stderr)
        if missing:
            return EngineError(
                "unknown_database", f'database "{missing.group(1)}" does not exist on {address}'
            )
        if "server version mismatch" in stderr:
            return EngineError(
                "tool_failed",
                f"{tool} is older than the server on {address}; install a newer PostgreSQL client "
                f"or point RAHATBACK_PG_BIN at one: {stderr.splitlines()[-1]}",
            )
        if any(
            hint in stderr
            for hint in (
                "Connection refused",
                "could not translate host name",
                "timeout expired",
                "No route to host",
            )
        ):
            last = stderr.splitlines()[-1] if stderr else ""
            return EngineError("unreachable", f"cannot reach {address}: {last}")
        tail = "\n".join(stderr.splitlines()[-10:]) or "(no error output)"
        return EngineError("tool_failed", f"{tool} exited with status {status}: {tail}")

    return explain


# The tables whose rows pg_dump writes as data, named as SQL would (`public."Orders"`): ordinary and
# unlogged tables (partitions included, partitioned parents have no rows of their own) outside the
# system schemas (`pg_*` is reserved), minus extension members, whose rows their extension makes.
_TABLES_SQL = r"""
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence IN ('p', 'u')
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND NOT EXISTS (
    SELECT 1 FROM pg_catalog.pg_depend d
    WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
  )
ORDER BY 1
"""
_COUNT_BATCH = 50


async def count_tables(db: Any) -> dict[str, int]:
    """Rows per table in what `db` (an asyncpg connection) sees: its transaction's snapshot, if any."""
    names = [str(row[0]) for row in await db.fetch(_TABLES_SQL)]
    counts: dict[str, int] = {}
    for start in range(0, len(names), _COUNT_BATCH):
        batch = names[start : start + _COUNT_BATCH]
        # the names are the server's own quote_ident() output, so they are safe to splice in
        sql = " UNION ALL ".join(
            f"SELECT {i}, count(*) FROM {name}"  # noqa: S608
            for i, name in enumerate(batch)
        )
        for index, rows in await db.fetch(sql):
            counts[batch[index]] = int(rows)
    return counts


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# `COPY public.items (id, label) FROM stdin;` — the table named as quote_ident() names it
_COPY_HEADER = re.compile(
    rb'COPY ((?:"(?:[^"]|"")*"|[^" .]+)\.(?:"(?:[^"]|"")*"|[^" .(]+))(?: \(.*\))? FROM stdin;'
)
# extension members' rows are their extension's business (see _TABLES_SQL)
_EXTENSION_TABLES_SQL = r"""
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
WHERE d.deptype = 'e'
"""


class CopyRowCounter:
    """Rows per table counted from pg_dump's plain output itself, as it streams past.

    Every table's data is one `COPY <table> (…) FROM stdin;` line, then one line per row (the text
    format escapes newlines inside values as `\\n`), then a line `\\.`. Counting lines costs no
    second read of the tables and sees exactly the dump's own snapshot. Only C-level byte searches
    run per chunk; a partial line waits in `_tail` for the next chunk.
    """

    def __init__(self, skip: frozenset[str] = frozenset()) -> None:
        self.tables: dict[str, int] = {}
        self._skip = skip
        self._in_data = False  # inside a table's data section
        self._table: str | None = None  # whose rows are counted (None: skipped)
        self._rows = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        pos = 0  # always at the start of a line
        while pos < len(data):
            if self._in_data:
                end = data.find(b"\\.\n", pos)
                while end > pos and data[end - 1] != 0x0A:  # `\\.` inside a value, not the end line
                    end = data.find(b"\\.\n", end + 1)
                if end == -1:
                    last = data.rfind(b"\n", pos)
                    if last != -1:
                        self._rows += data.count(b"\n", pos, last + 1)
                        pos = last + 1
                    break
                self._rows += data.count(b"\n", pos, end)
                if self._table is not None:
                    self.tables[self._table] = self.tables.get(self._table, 0) + self._rows
                self._in_data, self._rows, pos = False, 0, end + 3
                continue
            header = data.find(b"COPY ", pos)
            while header > pos and data[header - 1] != 0x0A:
                header = data.find(b"COPY ", header + 1)
            if header == -1:
                last = data.rfind(b"\n", pos)
                pos = last + 1 if last != -1 else pos
                break
            eol = data.find(b"\n", header)
            if eol == -1:
                pos = header
                break
            match = _COPY_HEADER.fullmatch(data, header, eol)
            pos = eol + 1
            if match is not None:
                name = match.group(1).decode("utf-8", "replace")
                self._in_data, self._table = True, None if name in self._skip else name
        self._tail = data[pos:]

    def result(self) -> dict[str, int] | None:
        """The counts; None if the stream ended inside a data section (it was cut short)."""
        return None if self._in_data else dict(self.tables)


class _CountingChunks:
    """pg_dump's chunks, counted on their way; the counts are filled in when the dump ends normally."""

    def __init__(self, chunks: AsyncIterator[bytes], counter: CopyRowCounter, counts: TableCounts) -> None:
        self._chunks = chunks
        self._counter = counter
        self._counts = counts

    def __aiter__(self) -> _CountingChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            self._counts.tables = self._counter.result()
            if self._counts.tables is None:
                log.warning("the dump ended inside a table's data: row counts are not recorded")
            raise
        self._counter.feed(chunk)
        return chunk


class PostgreSQLEngine:
    name = "postgresql"
    dump_format = "postgresql-plain-sql"
    dump_extension = "sql"
    tools: tuple[str, ...] = ("pg_dump", "psql")

    def __init__(self, restrict_key_seed: bytes | None = None) -> None:
        # The \restrict key guards a psql restore against meta-commands smuggled into the dump by a
        # hostile source server, so it must not be guessable from the server's side. A keyed hash of
        # the database name keeps dumps from this seed byte-identical for identical data; without a
        # seed one is drawn per process (the registry's default).
        self._restrict_key_seed = restrict_key_seed or os.urandom(32)

    def locate_tool(self, name: str) -> str | None:
        try:
            return find_pg_tool(name)
        except EngineError:
            return None

    def tool_problem(
        self, action: ToolAction, versions: Mapping[str, str | None], server_version: str
    ) -> ToolProblem | None:
        tool = "pg_dump" if action == "dump" else "psql"
        return pg_tool_problem(tool, versions.get(tool), server_version, found=tool in versions)

    def _restrict_key(self, database: str) -> str:
        return hmac.new(self._restrict_key_seed, database.encode(), hashlib.sha256).hexdigest()[:32]

    async def test(self, conn: Connection) -> str:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, settings.database or "postgres")
        try:
            version = await db.fetchval("SHOW server_version")
        finally:
            await db.close()
        # "15.18 (Debian 15.18-0+deb12u1)" -> "15.18"
        return str(version).split()[0]

    async def list_databases(self, conn: Connection) -> list[str]:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, settings.database or "postgres")
        try:
            rows = await db.fetch(
                "SELECT datname FROM pg_database WHERE NOT datistemplate AND datallowconn ORDER BY datname"
            )
        finally:
            await db.close()
        return [str(row["datname"]) for row in rows if row["datname"] not in SYSTEM_DATABASES]

    async def _connect(self, settings: PostgreSQLSettings, conn: Connection, database: str) -> Any:
        address = settings.address
        try:
            return await asyncpg.connect(
                host=settings.host,
                port=settings.port,
                user=settings.user,
                password=conn.secrets.get("password"),
                database=database,
                ssl=settings.sslmode,
                timeout=CONNECT_TIMEOUT_S,
            )
        except asyncpg.InvalidPasswordError:
            raise EngineError(
                "auth_failed", f'password authentication failed for user "{settings.user}"'
            ) from None
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            # unknown role, or no pg_hba.conf entry for this host/user/database
            raise EngineError("auth_failed", f"{address} refused the login: {exc.args[0]}") from None
        except asyncpg.InvalidCatalogNameError:
            raise EngineError(
                "unknown_database", f'database "{database}" does not exist on {address}'
            ) from None
        except TimeoutError:
            raise EngineError(
                "unreachable", f"cannot reach {address}: no answer within {CONNECT_TIMEOUT_S} s"
            ) from None
        except socket.gaierror as exc:
            raise EngineError(
                "unreachable", f"cannot reach {address}: unknown host ({exc.strerror})"
            ) from None
        except OSError as exc:
            raise EngineError("unreachable", f"cannot reach {address}: {exc.strerror or exc}") from None
        except asyncpg.PostgresError as exc:
            raise EngineError("error", f"{address} refused the connection: {exc.args[0]}") from None

    def _tool_env(self, settings: PostgreSQLSettings, conn: Connection, database: str) -> dict[str, str]:
        # Connection parameters go in the environment, not argv: the password must stay out of ps,
        # and a -d argument is parsed as a connection string if it looks like one.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env.update(
            PGHOST=settings.host,
            PGPORT=str(settings.port),
            PGUSER=settings.user,
            PGDATABASE=database,
            PGCONNECT_TIMEOUT=str(CONNECT_TIMEOUT_S),
            PGAPPNAME="rahatback",
            # --if-exists makes psql chatty with "does not exist, skipping" notices
            PGOPTIONS="-c client_min_messages=warning",
        )
        if settings.sslmode:
            env["PGSSLMODE"] = settings.sslmode
        if password := conn.secrets.get("password"):
            env["PGPASSWORD"] = password
        return env

    @staticmethod
    def _require_database(settings: PostgreSQLSettings) -> str:
        if not settings.database:
            raise EngineError(
                "bad_settings", "invalid PostgreSQL settings: database: required to dump or restore"
            )
        return settings.database

    async def dump_argv(self, database: str) -> list[str]:
        pg_dump = find_pg_tool("pg_dump")
        argv = [
            pg_dump,
            "--format=plain",
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--no-password",
        ]
        if await _supports_restrict_key(pg_dump):
            argv.append(f"--restrict-key={self._restrict_key(database)}")
        return argv

    @staticmethod
    def restore_argv() -> list[str]:
        return [
            find_pg_tool("psql"),
            "--no-psqlrc",
            "--quiet",
            "--no-password",
            "--single-transaction",
            "--set=ON_ERROR_STOP=1",
            "--file=-",
        ]

    def dump(
        self, conn: Connection, counts: TableCounts | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._dump(conn, counts)

    @asynccontextmanager
    async def _dump(
        self, conn: Connection, counts: TableCounts | None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        settings = parse_settings(conn.settings)
        database = self._require_database(settings)
        argv = await self.dump_argv(database)
        skip = await self._extension_tables(settings, conn, database) if counts is not None else None
        async with stream_stdout(
            argv,
            env=self._tool_env(settings, conn, database),
            explain=_explain_tool_failure("pg_dump", settings),
            secrets=list(conn.secrets.values()),
        ) as chunks:
            if skip is None or counts is None:
                yield chunks
            else:
                yield _CountingChunks(chunks, CopyRowCounter(skip), counts)

    async def _extension_tables(
        self, settings: PostgreSQLSettings, conn: Connection, database: str
    ) -> frozenset[str] | None:
        """Tables whose rows are not counted (extension members); None: counting is not possible."""
        try:
            db = await self._connect(settings, conn, database)
            try:
                rows = await db.fetch(_EXTENSION_TABLES_SQL)
            finally:
                await db.close()
        except Exception as exc:  # e.g. a pooler in front of the server: dump without counts
            log.warning("cannot read the catalog: row counts are not recorded", reason=str(exc))
            return None
        return frozenset(str(row[0]) for row in rows)

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        settings = parse_settings(conn.settings)
        database = self._require_database(settings)
        return await feed_stdin(
            self.restore_argv(),
            chunks,
            env=self._tool_env(settings, conn, database),
            explain=_explain_tool_failure("psql", settings),
            secrets=list(conn.secrets.values()),
        )

    # ------------------------------------------------------------ scratch databases (test restores)

    def _maintenance(self, settings: PostgreSQLSettings) -> str:
        # CREATE/DROP DATABASE may run from any database: the configured one is the one the user
        # surely may connect to (a session in it writes nothing to it)
        return settings.database or "postgres"

    async def create_scratch(self, conn: Connection, name: str) -> Connection:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, self._maintenance(settings))
        try:
            # template0: nothing a DBA added to template1 can show up as a restored table; the
            # source's encoding and locale, so the dump loads exactly as it would into the source
            options = ""
            if settings.database:
                row = await db.fetchrow(
                    "SELECT pg_catalog.pg_encoding_to_char(encoding), datcollate, datctype"
                    " FROM pg_catalog.pg_database WHERE datname = $1",
                    settings.database,
                )
                if row is not None:
                    encoding, collate, ctype = (_literal(value) for value in row)
                    options = f" ENCODING {encoding} LC_COLLATE {collate} LC_CTYPE {ctype}"
            await db.execute(f"CREATE DATABASE {_ident(name)} TEMPLATE template0{options}")
        except asyncpg.InsufficientPrivilegeError:
            raise EngineError(
                "auth_failed",
                f'user "{settings.user}" may not create databases on {settings.address}: grant it '
                "CREATEDB, or give test restores a scratch server",
            ) from None
        except asyncpg.PostgresError as exc:
            raise EngineError(
                "error", f"cannot create the scratch database {name} on {settings.address}: {exc.args[0]}"
            ) from None
        finally:
            await db.close()
        return Connection(settings={**conn.settings, "database": name}, secrets=conn.secrets)

    async def drop_scratch(self, conn: Connection, name: str) -> None:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, self._maintenance(settings))
        try:
            # a psql killed mid-restore may leave its session behind for a moment
            await db.execute(
                "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_catalog.pg_backend_pid()",
                name,
            )
            force = " WITH (FORCE)" if db.get_server_version().major >= 13 else ""
            await db.execute(f"DROP DATABASE IF EXISTS {_ident(name)}{force}")
        except asyncpg.PostgresError as exc:
            raise EngineError(
                "error", f"cannot drop the scratch database {name} on {settings.address}: {exc.args[0]}"
            ) from None
        finally:
            await db.close()

    async def list_scratch(self, conn: Connection, prefix: str) -> list[str]:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, self._maintenance(settings))
        try:
            pattern = prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
            rows = await db.fetch(
                "SELECT datname FROM pg_catalog.pg_database WHERE datname LIKE $1 ORDER BY 1", pattern
            )
        finally:
            await db.close()
        return [str(row[0]) for row in rows]

    async def count_rows(self, conn: Connection) -> dict[str, int]:
        settings = parse_settings(conn.settings)
        db = await self._connect(settings, conn, self._require_database(settings))
        try:
            return await count_tables(db)
        finally:
            await db.close()

    async def check_restored(self, conn: Connection) -> list[str]:
        # psql restored in one transaction with ON_ERROR_STOP: every constraint, unique index and
        # foreign key of the dump was built and checked against the loaded rows already
        return []
