"""MS SQL Server: aioodbc for the connection test and listing; native BACKUP / RESTORE for dumps.

The agent runs on the SQL Server host. A backup asks the server to write a COPY_ONLY backup into
`backup_dir`, then streams that file through the pipeline in 1 MiB reads and removes it. A restore
writes the (already authenticated) stream into a .bak file in `backup_dir`, and only once it has
all arrived verifies it, learns its logical files, runs RESTORE … WITH REPLACE and removes the file.
So a truncated or tampered artifact never reaches RESTORE and the target stays as it was.

Database names and paths become SQL text only through `quote_identifier` / `quote_string`
(bracket-quoted identifiers with `]` doubled, N'…' literals with `'` doubled), so a name like
`x]; DROP DATABASE y--` is data. The password lives in the ODBC connection string in memory only
and is scrubbed from every error. Driver and host set-up: docs/mongodb-and-mssql.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets as random_tokens
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rahatback_agent.engines.base import Connection, EngineError, ErrorCode, NoExternalTools, TableCounts
from rahatback_agent.engines.process import CHUNK_SIZE

__all__ = [
    "DEFAULT_DRIVER",
    "MSSQLEngine",
    "MSSQLSettings",
    "backup_sql",
    "check_database_name",
    "connection_string",
    "move_targets",
    "quote_identifier",
    "quote_string",
    "restore_sql",
]

log = structlog.get_logger("rahatback_agent.engines.mssql")

DEFAULT_DRIVER = "ODBC Driver 18 for SQL Server"
SYSTEM_DATABASES = ("master", "tempdb", "model", "msdb")
LOGIN_TIMEOUT_S = 10
# how long a cancelled BACKUP/RESTORE may take to stop before its .bak file is removed anyway
CANCEL_WAIT_S = 30
_MAX_NAME = 128  # sysname
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HOST = re.compile(r"^[A-Za-z0-9._:\[\]\\-]+$")  # names, IPv4/IPv6, host\instance
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_-]+")

# an aioodbc-compatible connect: (connection string) -> connection with cursor()/close()
Connect = Callable[[str], Awaitable[Any]]


def check_database_name(name: str) -> str:
    """Any sysname SQL Server accepts except control characters and outer spaces (which SQL
    Server would silently trim): quoting makes every other character safe."""
    if not 1 <= len(name) <= _MAX_NAME:
        raise ValueError(f"database name must be 1 to {_MAX_NAME} characters long")
    if _CONTROL.search(name):
        raise ValueError("database name must not contain control characters")
    if name != name.strip():
        raise ValueError("database name must not start or end with spaces")
    return name


def quote_identifier(name: str) -> str:
    return "[" + check_database_name(name).replace("]", "]]") + "]"


def quote_string(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return "N'" + value.replace("'", "''") + "'"


def _absolute_path(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if not (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()):
        raise ValueError("must be an absolute path on the SQL Server host")
    return value


class MSSQLSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=1433, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=_MAX_NAME)
    # optional so databases can be listed before one is chosen; dump and restore require it
    database: str | None = None
    # the ODBC driver's name as registered in odbcinst.ini; "FreeTDS" works too
    driver: str = Field(default=DEFAULT_DRIVER, min_length=1, max_length=128)
    encrypt: bool = True
    trust_server_certificate: bool = False
    # a folder on the SQL Server host that both the server and the agent can read and write
    backup_dir: str | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not _HOST.match(value):
            raise ValueError("must be a host name or address (optionally host\\instance)")
        return value

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        return None if value is None else check_database_name(value)

    @field_validator("driver", "user")
    @classmethod
    def _no_control(cls, value: str) -> str:
        if _CONTROL.search(value):
            raise ValueError("must not contain control characters")
        return value

    @field_validator("driver")
    @classmethod
    def _driver(cls, value: str) -> str:
        # unixODBC's driver manager reads DRIVER= itself; keep its quoting trivial
        if "{" in value or "}" in value:
            raise ValueError("must not contain braces")
        return value

    @field_validator("backup_dir")
    @classmethod
    def _backup_dir(cls, value: str | None) -> str | None:
        return None if value is None else _absolute_path(value)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def freetds(self) -> bool:
        return "freetds" in self.driver.lower()


def parse_settings(raw: dict[str, Any]) -> MSSQLSettings:
    try:
        return MSSQLSettings.model_validate(raw)
    except ValidationError as exc:
        # only field names and rules: pydantic's own text echoes the input, which may hold a secret
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EngineError("bad_settings", f"invalid SQL Server settings: {problems}") from None


def _require(settings: MSSQLSettings) -> tuple[str, str]:
    if not settings.database:
        raise EngineError(
            "bad_settings", "invalid SQL Server settings: database: required to back up or restore"
        )
    if not settings.backup_dir:
        raise EngineError(
            "bad_settings", "invalid SQL Server settings: backup_dir: required to back up or restore"
        )
    return settings.database, settings.backup_dir


# ---------------------------------------------------------------- SQL and connection text


def _odbc_value(value: str, field: str, freetds: bool) -> str:
    if not freetds:
        # ODBC's quoting, as Microsoft's driver documents it: braces, a closing brace doubled
        return "{" + value.replace("}", "}}") + "}"
    # FreeTDS ends a braced value at the first "};" and does not undouble "}}" (its
    # odbc_parse_connect_string; the TDS fake in tests/agent/test_engine_mssql.py shows it)
    if "};" in value:
        raise EngineError(
            "bad_settings",
            f"the FreeTDS driver cannot be given a {field} containing '}};': use Microsoft's ODBC driver",
        )
    return "{" + value + "}"


def connection_string(settings: MSSQLSettings, password: str, database: str = "master") -> str:
    """The ODBC connection string. It holds the password: keep it in memory, never log it."""
    freetds = settings.freetds
    if freetds:
        # FreeTDS takes host and port apart and has its own encryption keyword
        parts = [
            f"DRIVER={_odbc_value(settings.driver, 'driver', freetds)}",
            f"SERVER={settings.host}",
            f"PORT={settings.port}",
            f"Encryption={'require' if settings.encrypt else 'request'}",
            "ClientCharset=UTF-8",
        ]
    else:
        parts = [
            f"DRIVER={_odbc_value(settings.driver, 'driver', freetds)}",
            f"SERVER=tcp:{settings.host},{settings.port}",
            f"Encrypt={'yes' if settings.encrypt else 'no'}",
            f"TrustServerCertificate={'yes' if settings.trust_server_certificate else 'no'}",
        ]
    parts += [
        f"UID={_odbc_value(settings.user, 'user', freetds)}",
        f"PWD={_odbc_value(password, 'password', freetds)}",
        f"DATABASE={_odbc_value(database, 'database name', freetds)}",
        "APP=rahatback",
    ]
    return ";".join(parts) + ";"


def backup_sql(database: str, path: str) -> str:
    return (
        f"BACKUP DATABASE {quote_identifier(database)} TO DISK = {quote_string(path)}"
        " WITH COPY_ONLY, CHECKSUM, INIT"
    )


def verifyonly_sql(path: str) -> str:
    return f"RESTORE VERIFYONLY FROM DISK = {quote_string(path)} WITH CHECKSUM"


def headeronly_sql(path: str) -> str:
    return f"RESTORE HEADERONLY FROM DISK = {quote_string(path)}"


def filelistonly_sql(path: str) -> str:
    return f"RESTORE FILELISTONLY FROM DISK = {quote_string(path)}"


DEFAULT_DIRS_SQL = (
    "SELECT CAST(SERVERPROPERTY('InstanceDefaultDataPath') AS nvarchar(4000)) AS data_dir,"
    " CAST(SERVERPROPERTY('InstanceDefaultLogPath') AS nvarchar(4000)) AS log_dir"
)
# online ones only (a database being restored can't be backed up), and no snapshots
LIST_DATABASES_SQL = (
    "SELECT name FROM sys.databases WHERE name NOT IN (N'master', N'tempdb', N'model', N'msdb')"
    " AND state = 0 AND source_database_id IS NULL ORDER BY name"
)


def restore_sql(target: str, path: str, moves: Sequence[tuple[str, str]] = ()) -> str:
    options = ["REPLACE", "CHECKSUM"] + [
        f"MOVE {quote_string(logical)} TO {quote_string(physical)}" for logical, physical in moves
    ]
    return (
        f"RESTORE DATABASE {quote_identifier(target)} FROM DISK = {quote_string(path)}"
        f" WITH {', '.join(options)}"
    )


@dataclass(frozen=True)
class BackupFile:
    """One row of RESTORE FILELISTONLY."""

    logical_name: str
    physical_name: str
    type: str  # D data, L log, S FILESTREAM, F full-text
    file_id: int


def _split_dir(path: str) -> tuple[str, str]:
    """(directory with its trailing separator, file name) of a path on either OS."""
    cut = max(path.rfind("/"), path.rfind("\\"))
    return path[: cut + 1], path[cut + 1 :]


def _join(directory: str, name: str) -> str:
    if directory.endswith(("/", "\\")):
        return directory + name
    separator = "\\" if "\\" in directory and "/" not in directory else "/"
    return directory + separator + name


def _file_stem(name: str) -> str:
    safe = _UNSAFE_FILE_CHARS.sub("_", name).strip("_")[:64] or "db"
    if safe != name:
        # two names that clean up alike ("a b", "a_b") must not share files
        safe += "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def move_targets(
    target: str, files: Sequence[BackupFile], data_dir: str | None, log_dir: str | None
) -> list[tuple[str, str]]:
    """New physical names for a restore under another database name: the source's files may be
    in use by the source database itself. Into the instance's default folders (or, if it has
    none, the folder each file came from), named after the target."""
    stem = _file_stem(target)
    moves: list[tuple[str, str]] = []
    used: set[str] = set()
    for file in files:
        original_dir, original_name = _split_dir(file.physical_name)
        directory = (log_dir if file.type == "L" else data_dir) or original_dir
        ext = ""
        if file.type in ("D", "L") and "." in original_name:
            ext = "." + original_name.rsplit(".", 1)[1]
        logical = _UNSAFE_FILE_CHARS.sub("_", file.logical_name).strip("_") or f"file{file.file_id}"
        name = f"{stem}_{logical}{ext}"
        if name.lower() in used:
            name = f"{stem}_{file.file_id}{ext}"
        used.add(name.lower())
        moves.append((file.logical_name, _join(directory, name)))
    return moves


# ---------------------------------------------------------------- errors


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _odbc_message(exc: BaseException) -> tuple[str, str]:
    """(SQLSTATE, readable message) of a pyodbc error: its args are (sqlstate, text), the text
    prefixed with "[state] [vendor][driver][SQL Server]" and suffixed with "(number) (SQLFunc)"."""
    args = [str(arg) for arg in exc.args]
    state = args[0] if len(args) > 1 else ""
    text = args[-1] if args else str(exc)
    readable = re.sub(r"\[[^\]]*\]\s*", "", text)
    readable = re.sub(r"\s*\(SQL\w+\)", "", readable).strip()
    return state, readable


def _odbc_error_types() -> tuple[type[BaseException], ...]:
    try:
        import pyodbc  # type: ignore[import-not-found]  # its pyodbc.pyi is not PEP 561 packaged
    except ImportError:
        return ()
    return (pyodbc.Error,)


def _translate(
    exc: BaseException, settings: MSSQLSettings, database: str, secrets: Sequence[str]
) -> EngineError:
    state, message = _odbc_message(exc)
    message = _scrub(message, secrets)
    address = settings.address
    code: ErrorCode = "error"
    if state == "IM002" or "Can't open lib" in message or "Data source name not found" in message:
        return EngineError(
            "tool_failed",
            f'ODBC driver "{settings.driver}" is not installed on the agent host: install Microsoft\'s'
            ' msodbcsql18 (or FreeTDS: tdsodbc) and set "driver" to its name in odbcinst.ini',
        )
    if state == "28000" or "(18456)" in message:
        return EngineError("auth_failed", f'login failed for user "{settings.user}" on {address}')
    if "(4060)" in message or "(911)" in message:
        return EngineError("unknown_database", f'database "{database}" does not exist on {address}')
    if state == "HYT00":
        return EngineError("timeout", f"no answer from {address} within {LOGIN_TIMEOUT_S} s")
    if state.startswith("08"):
        return EngineError("unreachable", f"cannot reach {address}: {message}")
    if "(3201)" in message:
        # "Cannot open backup device ... Operating system error 5(Access is denied.)"
        return EngineError(
            "bad_settings",
            f"SQL Server cannot use backup_dir {settings.backup_dir}: {message}"
            " — the SQL Server service account needs read/write access to it",
        )
    if "(3101)" in message:
        code = "tool_failed"
        message += " — close the other connections to the database (or set it SINGLE_USER) and retry"
    return EngineError(code, f"{address}: {message}")


# ---------------------------------------------------------------- files in backup_dir


def _check_backup_dir(backup_dir: str) -> None:
    if not os.path.isdir(backup_dir):
        raise EngineError(
            "bad_settings",
            f"backup_dir {backup_dir} does not exist on the agent's host: the agent must run on the"
            " SQL Server host, and backup_dir must be a folder there",
        )
    if not os.access(backup_dir, os.R_OK | os.W_OK | os.X_OK):
        raise EngineError(
            "bad_settings", f"the agent's user cannot read, write and remove files in backup_dir {backup_dir}"
        )


def _bak_path(backup_dir: str, database: str, purpose: str) -> str:
    safe = _UNSAFE_FILE_CHARS.sub("_", database).strip("_")[:40] or "db"
    return _join(backup_dir, f"rahatback_{purpose}_{safe}_{random_tokens.token_hex(8)}.bak")


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        # not fatal for the run, but the file is a whole copy of the database: say so loudly
        log.error(
            "could not remove a SQL Server backup file; remove it by hand", path=path, error=exc.strerror
        )


async def _write_bak(chunks: AsyncIterator[bytes], path: str) -> int:
    # 0640: readable by the group SQL Server's service account is in (docs/mongodb-and-mssql.md)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    written = 0
    with os.fdopen(fd, "wb") as fh:
        async for chunk in chunks:
            if chunk:
                await asyncio.to_thread(fh.write, chunk)
                written += len(chunk)
    return written


async def _read_bak(path: str) -> AsyncIterator[bytes]:
    try:
        fh = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        raise EngineError(
            "bad_settings",
            f"SQL Server wrote its backup to {path}, but the agent cannot see it there: the agent must"
            " run on the SQL Server host and backup_dir must name the same folder for both",
        ) from None
    except PermissionError:
        raise EngineError(
            "bad_settings",
            f"the agent's user may not read {path}, written by SQL Server: give it read access"
            " (e.g. add it to the mssql group and make backup_dir setgid to that group)",
        ) from None
    try:
        while chunk := await asyncio.to_thread(fh.read, CHUNK_SIZE):
            yield chunk
    finally:
        fh.close()


# ---------------------------------------------------------------- statements


async def _cancel_statement(cursor: Any) -> None:
    # aioodbc has no cancel(); pyodbc's Cursor.cancel() (ODBC SQLCancel) is meant to be called
    # from another thread than the one running the statement
    cancel = getattr(getattr(cursor, "_impl", None), "cancel", None)
    if cancel is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(cancel)


async def execute_to_end(cursor: Any, sql: str) -> None:
    """Run a statement and drain every result set and message it produces: BACKUP and RESTORE
    report progress as messages, and stop early if the client stops reading them.

    If the caller is cancelled, the statement is cancelled on the server and awaited (bounded),
    so the caller's cleanup never races a BACKUP still writing its file."""

    async def run() -> None:
        await cursor.execute(sql)
        while await cursor.nextset():
            pass

    task = asyncio.ensure_future(run())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            await _cancel_statement(cursor)
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: its failure is a consequence of the cancel
        else:
            task.cancel()
        raise


async def _rows(cursor: Any, sql: str) -> list[dict[str, Any]]:
    await cursor.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


# ---------------------------------------------------------------- engine


async def _aioodbc_connect(dsn: str) -> Any:
    try:
        import aioodbc  # type: ignore[import-untyped]  # aioodbc ships no type information
    except ImportError:
        # pyodbc loads libodbc.so.2 from unixODBC when imported
        raise EngineError(
            "tool_failed",
            "the ODBC runtime is missing on the agent host: install unixODBC (e.g. apt-get install"
            " unixodbc) and a SQL Server ODBC driver",
        ) from None
    # autocommit: BACKUP and RESTORE refuse to run inside a transaction
    return await aioodbc.connect(dsn=dsn, autocommit=True, timeout=LOGIN_TIMEOUT_S)


class MSSQLEngine(NoExternalTools):
    name = "mssql"
    dump_format = "mssql-native-backup"
    dump_extension = "bak"

    def __init__(self, connect: Connect | None = None) -> None:
        self._connect = connect or _aioodbc_connect

    @asynccontextmanager
    async def _session(
        self, settings: MSSQLSettings, conn: Connection, database: str = "master"
    ) -> AsyncIterator[Any]:
        password = conn.secrets.get("password", "")
        dsn = connection_string(settings, password, database)
        secrets = [dsn, password]
        odbc_errors = _odbc_error_types()
        try:
            db = await self._connect(dsn)
        except odbc_errors as exc:
            raise _translate(exc, settings, database, secrets) from None
        try:
            yield db
        except odbc_errors as exc:
            raise _translate(exc, settings, settings.database or database, secrets) from None
        finally:
            with contextlib.suppress(Exception):
                await db.close()

    async def test(self, conn: Connection) -> str:
        settings = parse_settings(conn.settings)
        async with self._session(settings, conn, settings.database or "master") as db:
            cursor = await db.cursor()
            try:
                await cursor.execute("SELECT @@VERSION")
                row = await cursor.fetchone()
            finally:
                await cursor.close()
        # "Microsoft SQL Server 2022 (RTM-CU12) (KB5033663) - 16.0.4115.5 (X64) \n\tMar  4 2024 ..."
        return str(row[0]).splitlines()[0].strip() if row else "unknown"

    async def list_databases(self, conn: Connection) -> list[str]:
        settings = parse_settings(conn.settings)
        async with self._session(settings, conn) as db:
            cursor = await db.cursor()
            try:
                rows = await _rows(cursor, LIST_DATABASES_SQL)
            finally:
                await cursor.close()
        return [str(row["name"]) for row in rows]

    def dump(
        self, conn: Connection, counts: TableCounts | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        # no row counts: the archive/backup file is opaque to the agent (docs/verification.md)
        return self._dump(conn)

    @asynccontextmanager
    async def _dump(self, conn: Connection) -> AsyncIterator[AsyncIterator[bytes]]:
        settings = parse_settings(conn.settings)
        database, backup_dir = _require(settings)
        await asyncio.to_thread(_check_backup_dir, backup_dir)
        path = _bak_path(backup_dir, database, "backup")
        stream = self._backup_then_read(settings, conn, database, path)
        try:
            yield stream
        finally:
            await stream.aclose()
            await asyncio.to_thread(_remove, path)

    async def _backup_then_read(
        self, settings: MSSQLSettings, conn: Connection, database: str, path: str
    ) -> AsyncGenerator[bytes, None]:
        async with self._session(settings, conn) as db:
            cursor = await db.cursor()
            try:
                await execute_to_end(cursor, backup_sql(database, path))
            finally:
                await cursor.close()
        # the connection is closed before streaming: the pipeline may take long over a big file
        async for chunk in _read_bak(path):
            yield chunk

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        settings = parse_settings(conn.settings)
        target, backup_dir = _require(settings)
        await asyncio.to_thread(_check_backup_dir, backup_dir)
        path = _bak_path(backup_dir, target, "restore")
        try:
            # the whole artifact first: a truncated or tampered one raises here, before RESTORE
            fed = await _write_bak(chunks, path)
            async with self._session(settings, conn) as db:
                cursor = await db.cursor()
                try:
                    # a backup this server cannot read fails here, before the target is touched
                    await execute_to_end(cursor, verifyonly_sql(path))
                    moves = await self._moves(cursor, target, path)
                    await execute_to_end(cursor, restore_sql(target, path, moves))
                finally:
                    await cursor.close()
        finally:
            await asyncio.to_thread(_remove, path)
        return fed

    @staticmethod
    async def _moves(cursor: Any, target: str, path: str) -> list[tuple[str, str]]:
        headers = await _rows(cursor, headeronly_sql(path))
        if len(headers) != 1:
            raise EngineError("error", f"the backup holds {len(headers)} backup sets; RahatBack writes one")
        source = str(headers[0]["DatabaseName"])
        # same name: restore over the database's own files. Another name: the source's files
        # may belong to a live database, so each file gets a new name
        if source.casefold() == target.casefold():
            return []
        files = [
            BackupFile(
                logical_name=str(row["LogicalName"]),
                physical_name=str(row["PhysicalName"]),
                type=str(row["Type"]),
                file_id=int(row["FileId"]),
            )
            for row in await _rows(cursor, filelistonly_sql(path))
        ]
        dirs = (await _rows(cursor, DEFAULT_DIRS_SQL))[0]
        return move_targets(target, files, dirs["data_dir"] or None, dirs["log_dir"] or None)
