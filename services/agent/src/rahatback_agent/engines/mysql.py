"""MySQL/MariaDB: aiomysql for the connection test and listing, mariadb-dump for backups, and the
mariadb client into a scratch database that replaces the target's tables in one RENAME TABLE.

Why these flags, how the password reaches the tools, and what a restore guarantees: docs/mysql-dumps.md.
Row counts for the manifest are read from the dump stream itself (the only place that sees exactly
the dump's snapshot), scratch databases of test restores: docs/verification.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomysql  # type: ignore[import-untyped]  # aiomysql ships no type information
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pymysql.charset import charset_by_name  # type: ignore[import-untyped]
from pymysql.constants import CLIENT  # type: ignore[import-untyped]

from rahatback_agent.engines.base import Connection, EngineError, TableCounts, ToolAction, ToolProblem
from rahatback_agent.engines.process import ExplainFailure, feed_stdin, stream_stdout

__all__ = [
    "MySQLEngine",
    "MySQLSettings",
    "MySQLTool",
    "find_mysql_tool",
    "locate_mysql_tool",
    "mysql_tool_problem",
]

log = structlog.get_logger("rahatback_agent.engines.mysql")

CONNECT_TIMEOUT_S = 10
SYSTEM_SCHEMAS = frozenset({"information_schema", "performance_schema", "mysql", "sys"})
# scratch databases of restores: `rbk_<16 hex>_restore`; a DBA grants CREATE/DROP on `rbk\_%`
SCRATCH_PREFIX = "rbk_"

SslMode = Literal["disabled", "preferred", "required", "verify_ca", "verify_identity"]


class MySQLSettings(BaseModel):
    # extra keys are ignored: the control plane may store display-only fields next to these
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = Field(min_length=1)
    port: int = Field(default=3306, ge=1, le=65535)
    user: str = Field(min_length=1)
    # optional so databases can be listed before one is chosen; dump and restore require it
    database: str | None = Field(default=None, min_length=1, max_length=64)
    ssl_mode: SslMode = "preferred"  # None (the control plane's "not set") means preferred too
    ssl_ca: str | None = Field(default=None, min_length=1)  # a CA bundle on the agent's host

    @field_validator("ssl_mode", mode="before")
    @classmethod
    def _unset_is_preferred(cls, value: object) -> object:
        return "preferred" if value is None else value

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_settings(raw: dict[str, Any]) -> MySQLSettings:
    try:
        settings = MySQLSettings.model_validate(raw)
    except ValidationError as exc:
        # only field names and rules: pydantic's own text echoes the input, which may hold a secret
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EngineError("bad_settings", f"invalid MySQL settings: {problems}") from None
    for name in ("host", "user", "database", "ssl_ca"):
        if "\x00" in (getattr(settings, name) or ""):
            raise EngineError("bad_settings", f"invalid MySQL settings: {name}: contains a NUL character")
    return settings


def _require_database(settings: MySQLSettings) -> str:
    if not settings.database:
        raise EngineError("bad_settings", "invalid MySQL settings: database: required to dump or restore")
    return settings.database


def _ident(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


# ------------------------------------------------------------------ the client tools


@dataclass(frozen=True)
class MySQLTool:
    path: str
    mariadb: bool  # MariaDB's programs; False for Oracle MySQL's (other option names)


_tool_flavors: dict[str, bool] = {}


def locate_mysql_tool(name: str) -> str | None:
    """`name` in RAHATBACK_MYSQL_BIN if set, else on PATH."""
    override = os.environ.get("RAHATBACK_MYSQL_BIN")
    if override:
        candidate = Path(override) / name
        return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None
    return shutil.which(name)


async def find_mysql_tool(*names: str) -> MySQLTool:
    """The first of `names` in RAHATBACK_MYSQL_BIN if set, else on PATH (mariadb-dump before mysqldump)."""
    override = os.environ.get("RAHATBACK_MYSQL_BIN")
    path = next((found for name in names if (found := locate_mysql_tool(name))), None)
    if path is None:
        where = f"RAHATBACK_MYSQL_BIN={override}" if override else "PATH"
        raise EngineError(
            "tool_failed",
            f"{' or '.join(names)} not found in {where}: install the MariaDB client tools (mariadb-client)",
        )
    if path not in _tool_flavors:
        # Debian's mysqldump is a link to mariadb-dump: the version text, not the name, tells them apart
        proc = await asyncio.create_subprocess_exec(
            path, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await proc.communicate()
        _tool_flavors[path] = b"MariaDB" in out
    return MySQLTool(path, _tool_flavors[path])


DUMP_TOOLS = ("mariadb-dump", "mysqldump")  # in the order find_mysql_tool prefers them
CLIENT_TOOLS = ("mariadb", "mysql")
_ORACLE_CLIENT = "Oracle's MySQL client (mysql-client from MySQL's APT repository)"


def _series(version: str) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def mysql_tool_problem(
    action: ToolAction, versions: Mapping[str, str | None], server_version: str
) -> ToolProblem | None:
    """Rules in docs/dump-tools.md. The one hard rule beyond presence: mariadb-dump takes every
    server numbered 10.3 or later for MariaDB and then asks it for stored packages (client/mysqldump.c,
    dump_routines_for_db), so with --routines it cannot dump MySQL's year-numbered releases (26.x)."""
    names = DUMP_TOOLS if action == "dump" else CLIENT_TOOLS
    server = _series(server_version)
    server_mariadb = "mariadb" in server_version.lower()
    oracle_needed = not server_mariadb and server is not None and server >= (10, 3)
    point = " and point RAHATBACK_MYSQL_BIN at its directory" if os.environ.get("RAHATBACK_MYSQL_BIN") else ""
    chosen = next((name for name in names if name in versions), None)
    if chosen is None:
        package = _ORACLE_CLIENT if oracle_needed else "mariadb-client"
        return ToolProblem("tool_missing", f"{' or '.join(names)} not found: install {package}{point}")
    version = versions[chosen]
    have = _series(version) if version else None
    if action != "dump" or version is None or have is None or server is None:
        return None
    tool_mariadb = "mariadb" in version.lower()
    if tool_mariadb and oracle_needed:
        return ToolProblem(
            "tool_missing",
            f"{chosen} (MariaDB {have[0]}.{have[1]}) cannot dump MySQL {server_version}: it takes a "
            "server numbered 10.3 or later for MariaDB and asks it for stored packages; install "
            f"{_ORACLE_CLIENT} and point RAHATBACK_MYSQL_BIN at the directory of its mysqldump",
        )
    if tool_mariadb == server_mariadb and have[0] < server[0]:
        flavor = "MariaDB" if tool_mariadb else "MySQL"
        package = (
            f"mariadb-client {server[0]}.{server[1]} (MariaDB's repository)"
            if tool_mariadb
            else f"mysql-client {server[0]}.x (MySQL's APT repository)"
        )
        return ToolProblem(
            "tool_too_old",
            f"{chosen} is from {flavor} {have[0]}.{have[1]}, older than the server ({flavor} "
            f"{server[0]}.{server[1]}): a dump may lack what the newer server added; "
            f"install {package}{point}",
            fatal=False,
        )
    return None


def _option_value(value: str) -> str:
    # Option files strip unquoted spaces and treat `#` as a comment: quote, and escape what the
    # option-file reader unescapes (\\ \" \n \r \t), so any password reads back byte for byte.
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def client_options(
    settings: MySQLSettings, password: str | None, tool: MySQLTool, *, connect_timeout: bool
) -> str:
    """The `[client]` options file a tool reads its login from. Each tool rejects options it does
    not know (mariadb-dump has no connect-timeout), so the file is written per tool."""
    lines = [
        "[client]",
        f"user={_option_value(settings.user)}",
        f"host={_option_value(settings.host)}",
        f"port={settings.port}",
        # "localhost" would otherwise mean the Unix socket, not the TCP port aiomysql used
        "protocol=TCP",
    ]
    if password is not None:
        lines.append(f"password={_option_value(password)}")
    if connect_timeout:
        lines.append(f"connect-timeout={CONNECT_TIMEOUT_S}")
    mode = settings.ssl_mode
    if tool.mariadb:
        # MariaDB 10.x clients: --ssl tries TLS and falls back to plain text; only
        # --ssl-verify-server-cert insists on TLS, and it checks the CA and the host name together.
        if mode == "disabled":
            lines.append("skip-ssl")
        elif mode in ("preferred", "required"):
            lines += ["ssl", "skip-ssl-verify-server-cert"]
        else:
            lines += ["ssl", "ssl-verify-server-cert"]
    else:
        lines.append(f"ssl-mode={mode.upper()}")
    if settings.ssl_ca and mode in ("verify_ca", "verify_identity"):
        lines.append(f"ssl-ca={_option_value(settings.ssl_ca)}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _options_file(text: str) -> Iterator[Path]:
    """A 0600 file in a fresh 0700 directory, gone when the block ends however it ends."""
    directory = Path(tempfile.mkdtemp(prefix="rahatback-mysql-"))
    try:
        path = directory / "client.cnf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _tool_env() -> dict[str, str]:
    # MYSQL_HOST, MYSQL_TCP_PORT, MYSQL_PWD, MYSQL_HOME, ... of the agent must not redirect the tool
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("MYSQL", "MARIADB", "LIBMYSQL"))
    }


def _explain_tool_failure(tool: str, settings: MySQLSettings) -> ExplainFailure:
    def explain(status: int, stderr: str) -> EngineError:
        address = settings.address
        last = stderr.splitlines()[-1] if stderr else ""
        if "Access denied for user" in stderr:
            return EngineError(
                "auth_failed", f'{address} refused the login of user "{settings.user}": {last}'
            )
        missing = re.search(r"Unknown database '([^']*)'", stderr)
        if missing:
            return EngineError(
                "unknown_database", f'database "{missing.group(1)}" does not exist on {address}'
            )
        if any(
            hint in stderr
            for hint in ("Can't connect to", "Unknown server host", "Unknown MySQL server host")
        ):
            return EngineError("unreachable", f"cannot reach {address}: {last}")
        if "SSL" in stderr and ("2026" in stderr or "TLS" in stderr):
            return EngineError("error", f"TLS with {address} failed: {last}")
        tail = "\n".join(stderr.splitlines()[-10:]) or "(no error output)"
        return EngineError("tool_failed", f"{tool} exited with status {status}: {tail}")

    return explain


# ------------------------------------------------------------------ aiomysql


class _TlsNotOffered(Exception):
    pass


class _Connection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
    """An aiomysql connection that refuses to log in without TLS when TLS is required.

    aiomysql sends the login in the clear whenever the server does not offer TLS; the check has to
    sit between the server's greeting and the login, which is this (private) hook.
    """

    def __init__(self, *args: Any, tls_required: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_required = tls_required

    async def _request_authentication(self) -> None:
        if self._tls_required and not self.server_capabilities & CLIENT.SSL:
            raise _TlsNotOffered
        await super()._request_authentication()


class _QuietCursor(aiomysql.Cursor):  # type: ignore[misc]  # aiomysql is untyped
    # aiomysql turns every server warning ("DROP ... IF EXISTS: unknown table") into a Python
    # warning; the restore reads what it needs from the server and warnings are not errors here
    async def _show_warnings(self, conn: Any) -> None:
        return None


def _ssl_context(settings: MySQLSettings) -> ssl.SSLContext | None:
    mode = settings.ssl_mode
    if mode == "disabled":
        return None
    if mode in ("preferred", "required"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        context = ssl.create_default_context(cafile=settings.ssl_ca)
    except (OSError, ssl.SSLError) as exc:
        raise EngineError(
            "bad_settings", f"invalid MySQL settings: ssl_ca: cannot load {settings.ssl_ca}: {exc}"
        ) from None
    context.check_hostname = mode == "verify_identity"
    return context


def _wire_password(password: str) -> str:
    # aiomysql encodes the password as latin-1 while the mariadb client sends the option file's
    # bytes (UTF-8): hand aiomysql the UTF-8 bytes in latin-1 clothing so both send the same bytes
    return password.encode("utf-8").decode("latin-1")


async def _connect(settings: MySQLSettings, conn: Connection, database: str | None) -> Any:
    address = settings.address
    db = _Connection(
        host=settings.host,
        port=settings.port,
        user=settings.user,
        password=_wire_password(conn.secrets.get("password") or ""),
        db=database,
        charset="utf8mb4",
        autocommit=True,
        connect_timeout=CONNECT_TIMEOUT_S,
        ssl=_ssl_context(settings),
        cursorclass=_QuietCursor,
        tls_required=settings.ssl_mode in ("required", "verify_ca", "verify_identity"),
    )
    try:
        # aiomysql's connect_timeout covers the TCP connect only, not a server that never greets
        await asyncio.wait_for(db._connect(), CONNECT_TIMEOUT_S)
    except TimeoutError:
        db.close()
        raise EngineError("timeout", f"{address} did not answer within {CONNECT_TIMEOUT_S} s") from None
    except _TlsNotOffered:
        raise EngineError(
            "error",
            f"{address} does not offer TLS but ssl_mode is {settings.ssl_mode!r}: "
            "enable TLS on the server or choose ssl_mode 'preferred' or 'disabled'",
        ) from None
    except aiomysql.OperationalError as exc:
        raise _login_error(exc, settings, database) from None
    return db


def _login_error(exc: Any, settings: MySQLSettings, database: str | None) -> EngineError:
    address = settings.address
    code = exc.args[0] if exc.args else 0
    message = exc.args[1] if len(exc.args) > 1 else str(exc)
    if code in (1044, 1045, 1130, 1698):
        return EngineError("auth_failed", f'{address} refused the login of user "{settings.user}": {message}')
    if code == 1049:
        return EngineError("unknown_database", f'database "{database}" does not exist on {address}')
    cause = exc.__cause__
    if isinstance(cause, TimeoutError):
        return EngineError("timeout", f"cannot reach {address}: no answer within {CONNECT_TIMEOUT_S} s")
    if isinstance(cause, socket.gaierror):
        return EngineError("unreachable", f"cannot reach {address}: unknown host ({cause.strerror})")
    if isinstance(cause, ssl.SSLError):
        return EngineError("error", f"TLS with {address} failed: {cause.reason or cause}")
    if isinstance(cause, OSError):
        return EngineError("unreachable", f"cannot reach {address}: {cause.strerror or cause}")
    return EngineError("error", f"{address} refused the connection: {message}")


@asynccontextmanager
async def _session(settings: MySQLSettings, conn: Connection, database: str | None) -> AsyncIterator[Any]:
    db = await _connect(settings, conn, database)
    try:
        yield db
    finally:
        try:
            await db.ensure_closed()  # says goodbye, so the server ends the session at once
        except Exception:
            db.close()


async def _rows(db: Any, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    async with db.cursor() as cursor:
        await cursor.execute(sql, args)
        return list(await cursor.fetchall())


# ------------------------------------------------------------------ restore: scratch, then swap


@dataclass(frozen=True)
class _Definition:
    """A view, trigger, routine or event as SHOW CREATE gives it, with the session it was made in."""

    kind: str  # VIEW, TRIGGER, PROCEDURE, FUNCTION, EVENT
    name: str
    create: str | None  # None: the user may not see it (not the routine's definer, no privilege)
    sql_mode: str | None
    client_charset: str
    collation: str
    time_zone: str | None = None
    table: str | None = None  # a trigger's table


async def _definitions(db: Any, schema: str) -> list[_Definition]:
    """Everything of `schema` a RENAME TABLE cannot move to another database. `schema` must be the
    session's database: SHOW CREATE VIEW then leaves its name out of the view's query."""
    found: list[_Definition] = []
    for (name,) in await _rows(
        db,
        "SELECT TABLE_NAME FROM information_schema.VIEWS WHERE TABLE_SCHEMA = %s ORDER BY TABLE_NAME",
        (schema,),
    ):
        # with the scratch database as the default one, SHOW CREATE VIEW leaves its name out
        _, create, charset, collation = (await _rows(db, f"SHOW CREATE VIEW {_ident(name)}"))[0]
        found.append(_Definition("VIEW", name, create, None, charset, collation))
    for name, table in await _rows(
        db,
        "SELECT TRIGGER_NAME, EVENT_OBJECT_TABLE FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = %s "
        "ORDER BY EVENT_OBJECT_TABLE, EVENT_MANIPULATION, ACTION_TIMING, ACTION_ORDER",
        (schema,),
    ):
        row = (await _rows(db, f"SHOW CREATE TRIGGER {_ident(name)}"))[0]
        found.append(_Definition("TRIGGER", name, row[2], row[1], row[3], row[4], table=table))
    for name, kind in await _rows(
        db,
        "SELECT ROUTINE_NAME, ROUTINE_TYPE FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = %s "
        "AND ROUTINE_TYPE IN ('PROCEDURE', 'FUNCTION') ORDER BY ROUTINE_TYPE, ROUTINE_NAME",
        (schema,),
    ):
        row = (await _rows(db, f"SHOW CREATE {kind} {_ident(name)}"))[0]
        found.append(_Definition(kind, name, row[2], row[1], row[3], row[4]))
    for (name,) in await _rows(
        db,
        "SELECT EVENT_NAME FROM information_schema.EVENTS WHERE EVENT_SCHEMA = %s ORDER BY EVENT_NAME",
        (schema,),
    ):
        row = (await _rows(db, f"SHOW CREATE EVENT {_ident(name)}"))[0]
        found.append(_Definition("EVENT", name, row[3], row[1], row[4], row[5], time_zone=row[2]))
    return found


_CHARSET_NAME = re.compile(r"\w+")


async def _create(db: Any, definition: _Definition) -> None:
    """Run a SHOW CREATE statement in the session it was written in: sql_mode changes how it parses
    (ANSI_QUOTES), the connection collation is what its string comparisons use."""
    if definition.create is None or not all(
        _CHARSET_NAME.fullmatch(name) for name in (definition.client_charset, definition.collation)
    ):
        raise EngineError("error", f"unexpected character set of {definition.kind} {definition.name}")
    context = [
        f"character_set_client = {definition.client_charset}",
        f"collation_connection = {definition.collation}",
    ]
    if definition.sql_mode is not None:
        context.append(f"sql_mode = {db.escape(definition.sql_mode)}")
    if definition.time_zone is not None:
        context.append(f"time_zone = {db.escape(definition.time_zone)}")
    try:
        encoding = charset_by_name(definition.client_charset).encoding
    except KeyError:
        encoding = "utf-8"
    await db.query("SET SESSION " + ", ".join(context))
    try:
        # the statement's bytes in the character set the session now declares
        await db.query(definition.create.encode(encoding))
    finally:
        await db.query("SET NAMES utf8mb4")


async def _create_views(db: Any, views: list[_Definition]) -> None:
    # a view may select from another view: create what can be created until nothing is left
    pending = list(views)
    while pending:
        failed: list[_Definition] = []
        last_error: Exception | None = None
        for view in pending:
            try:
                await _create(db, view)
            except aiomysql.ProgrammingError as exc:  # 1146: a view it selects from is not there yet
                failed.append(view)
                last_error = exc
        if len(failed) == len(pending):
            raise EngineError("error", f"cannot create view {failed[0].name}: {last_error}")
        pending = failed


async def _kill_sessions_in(db: Any, database: str) -> None:
    """End what a killed mariadb client left running on the server, so DROP DATABASE need not wait."""
    for (thread_id,) in await _rows(
        db,
        "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s AND ID <> CONNECTION_ID()",
        (database,),
    ):
        with contextlib.suppress(aiomysql.Error):
            await db.query(f"KILL CONNECTION {int(thread_id)}")


async def _drop_databases(settings: MySQLSettings, conn: Connection, *names: str) -> None:
    """Best effort: a leftover scratch database must not hide why the restore failed (or turn a
    completed restore into a failed one); it is logged and can be dropped by hand."""
    try:
        async with _session(settings, conn, None) as db:
            await db.query("SET SESSION foreign_key_checks = 0")
            for name in names:
                await _kill_sessions_in(db, name)
                await db.query(f"DROP DATABASE IF EXISTS {_ident(name)}")
    except (aiomysql.Error, EngineError) as exc:
        reason = exc.message if isinstance(exc, EngineError) else exc.args[-1]
        log.warning("restore scratch database not dropped", databases=names, reason=str(reason))


async def _swap_then_drop(settings: MySQLSettings, conn: Connection, scratch: str, target: str) -> None:
    replaced = f"{scratch}_replaced"  # the target's old tables, dropped at the end
    try:
        await _swap_into(settings, conn, scratch, target, replaced)
    finally:
        await _drop_databases(settings, conn, scratch, replaced)


async def _tables(db: Any, schema: str) -> dict[str, str]:
    rows = await _rows(
        db, "SELECT TABLE_NAME, TABLE_TYPE FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s", (schema,)
    )
    return {str(name): str(kind) for name, kind in rows}


async def _swap_into(
    settings: MySQLSettings, conn: Connection, scratch: str, target: str, replaced_db: str
) -> None:
    """Move the complete, loaded scratch database into the target.

    The tables (the data) switch in one RENAME TABLE, which the server applies all or nothing:
    before it the target is untouched, after it the target holds every restored table. The target's
    tables of the same names move into `replaced_db` in the same statement (in another database their
    foreign key names cannot clash with the new tables'). Views, triggers, routines and events cannot
    move between databases: they are recreated right after, from their definitions.
    """
    unchanged = f"restore into {target} failed; the target is unchanged"
    async with _session(settings, conn, scratch) as db:
        await db.query("SET SESSION foreign_key_checks = 0")
        try:
            new_tables = sorted(name for name, kind in (await _tables(db, scratch)).items() if kind != "VIEW")
            definitions = await _definitions(db, scratch)
            if hidden := [d.name for d in definitions if d.create is None]:
                raise EngineError(
                    "error",
                    f"{unchanged}: the server does not show the definitions of {', '.join(hidden)} "
                    f"to user {settings.user}",
                )
            views = [d for d in definitions if d.kind == "VIEW"]
            existing = await _tables(db, target)
            names = [*new_tables, *(view.name for view in views)]
            old_tables = [name for name in names if existing.get(name, "VIEW") != "VIEW"]
            old_views = [name for name in names if existing.get(name) == "VIEW"]
            await _refuse_dangling_foreign_keys(db, target, old_tables, unchanged)
            await db.select_db(target)
            old_triggers = [
                d for d in await _definitions(db, target) if d.kind == "TRIGGER" and d.table in old_tables
            ]
            await db.select_db(scratch)
            # a table with triggers cannot change database: the new tables' triggers are recreated
            # with the rest; the old tables' go just before the switch (they would go with them)
            for trigger in (d for d in definitions if d.kind == "TRIGGER"):
                await db.query(f"DROP TRIGGER {_ident(trigger.name)}")
            if old_tables:
                await db.query(f"CREATE DATABASE {_ident(replaced_db)}")
        except aiomysql.Error as exc:
            raise EngineError("error", f"{unchanged}: {exc.args[-1]}") from None

        into, out_of, away = _ident(target), _ident(scratch), _ident(replaced_db)
        aside = {name: f"{replaced_db}_view_{i}"[:64] for i, name in enumerate(old_views)}
        renames = [f"{into}.{_ident(name)} TO {into}.{_ident(new)}" for name, new in aside.items()]
        renames += [f"{into}.{_ident(name)} TO {away}.{_ident(name)}" for name in old_tables]
        renames += [f"{out_of}.{_ident(name)} TO {into}.{_ident(name)}" for name in new_tables]
        dropped: list[_Definition] = []
        try:
            await db.select_db(target)
            for trigger in old_triggers:
                await db.query(f"DROP TRIGGER {_ident(trigger.name)}")
                dropped.append(trigger)
            if renames:
                await db.query("RENAME TABLE " + ", ".join(renames))
        except aiomysql.Error as exc:
            for trigger in dropped:  # the switch did not happen: the old tables get their triggers back
                with contextlib.suppress(aiomysql.Error, EngineError):
                    await _create(db, trigger)
            raise EngineError("error", f"{unchanged}: {exc.args[-1]}") from None

        try:
            for old in aside.values():
                await db.query(f"DROP VIEW {_ident(old)}")
            await _create_views(db, views)
            for definition in definitions:
                if definition.kind != "VIEW":
                    await db.query(f"DROP {definition.kind} IF EXISTS {_ident(definition.name)}")
                    await _create(db, definition)
        except (aiomysql.Error, EngineError) as exc:
            reason = exc.message if isinstance(exc, EngineError) else exc.args[-1]
            raise EngineError(
                "error",
                f"the tables of {target} were replaced, but recreating its views, triggers, routines "
                f"or events failed: {reason}",
            ) from None


async def _refuse_dangling_foreign_keys(db: Any, target: str, old_tables: list[str], unchanged: str) -> None:
    """A table the dump does not have, with a foreign key to one it replaces, would be left pointing
    at the dropped old table: refuse, as PostgreSQL refuses to drop a referenced table."""
    for table, constraint, referenced in await _rows(
        db,
        "SELECT TABLE_NAME, CONSTRAINT_NAME, REFERENCED_TABLE_NAME "
        "FROM information_schema.REFERENTIAL_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = %s "
        "AND UNIQUE_CONSTRAINT_SCHEMA = %s ORDER BY TABLE_NAME, CONSTRAINT_NAME",
        (target, target),
    ):
        if referenced in old_tables and table not in old_tables:
            raise EngineError(
                "error",
                f"{unchanged}: table {table} is not in the backup but its foreign key {constraint} "
                f"references {referenced}, which the restore replaces; drop that key or table first",
            )


# ------------------------------------------------------------------ row counts from the dump stream

# mariadb-dump/mysqldump write each table's rows between `LOCK TABLES `t` WRITE;` and
# `UNLOCK TABLES;` (--add-locks, on by default) as extended INSERTs, one row per line (MariaDB) or
# many per line (MySQL). Nothing else is ever inside that bracket but DISABLE/ENABLE KEYS, and
# stored programs (which may hold INSERT lines of their own) cannot contain LOCK TABLES.
#
# Inside an INSERT, strings are escaped by the tool itself (it sets its own sql_mode, and the dump is
# utf8mb4, where no multibyte character holds a 0x5C or 0x27 byte): a backslash always starts a
# two-byte escape and a raw newline never occurs. So deleting `\\` and then `\'` leaves only the
# quotes that open and close strings, outside of which every `(` starts a row (values are numbers,
# NULL, 0x... with --hex-blob, or b'...'), and the first `);\n` ends the statement.
_LOCK_LINE = re.compile(rb"LOCK TABLES `((?:[^`]|``)+)` WRITE;")
_HEAD_CAP = 1 << 16  # bytes of a line kept to recognise it; INSERT heads with column lists fit
_STATEMENT_END = b");\n"


def _insert_head(table: bytes) -> re.Pattern[bytes]:
    """`INSERT INTO `t` VALUES`, with the column list mariadb-dump adds for generated columns."""
    columns = rb"(?: \((?:`(?:[^`]|``)*+`,? ?)*+\))?"
    return re.compile(re.escape(b"INSERT INTO `" + table + b"`") + columns + rb" ?VALUES")


class DumpRowCounter:
    """Counts the rows of every table in a mariadb-dump/mysqldump stream fed to it in any pieces.

    A dump it cannot follow is never guessed at: `result()` is then None (and `problem` says why).
    The work is a few passes of bytes methods per piece, far faster than the dump tool; memory is
    one line head (_HEAD_CAP) whatever the rows hold.
    """

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}
        self.problem: str | None = None
        self._pending = b""  # held back for the next piece: a line's start, or an INSERT's last bytes
        self._skipping = False  # in a long line outside table data: skip to its end
        self._table: str | None = None  # inside LOCK TABLES `t` ... UNLOCK TABLES
        self._head: re.Pattern[bytes] | None = None
        self._in_values = False
        self._in_string = False
        self._opens = 0
        self._closes = 0
        self._created = 0

    def feed(self, data: bytes) -> None:
        if self.problem is not None:
            return
        try:
            self._feed(self._pending + data if self._pending else data)
        except Exception as exc:  # pragma: no cover - a bug here must cost the counts, not the backup
            self._fail(f"unexpected {type(exc).__name__}: {exc}")

    def result(self) -> dict[str, int] | None:
        if self.problem is None and self._pending and not self._pending.strip():
            self._pending = b""
        if self.problem is None and (self._table is not None or self._in_values or self._pending):
            self._fail("the dump ends inside the data of a table")
        if self.problem is None and self._created and not self.tables:
            self._fail("the dump has tables but no LOCK TABLES brackets around their data")
        return None if self.problem is not None else dict(self.tables)

    def _fail(self, problem: str) -> None:
        self.problem = problem
        self._pending = b""

    def _feed(self, buf: bytes) -> None:
        self._pending = b""
        pos, end = 0, len(buf)
        while pos < end and self.problem is None:
            if self._in_values:
                pos = self._values(buf, pos)
                continue
            newline = buf.find(b"\n", pos)
            if self._skipping:
                if newline < 0:
                    return
                self._skipping = False
                pos = newline + 1
                continue
            head_end = min(end if newline < 0 else newline, pos + _HEAD_CAP)
            if self._head is not None and (match := self._head.match(buf, pos, head_end)):
                pos = match.end()
                self._in_values, self._in_string = True, False
                self._opens = self._closes = 0
                continue
            if newline < 0:
                if end - pos < _HEAD_CAP:
                    self._pending = buf[pos:]  # wait for the rest of the line
                    return
                newline = end  # a long line: judged by its head, the rest skipped
                self._skipping = True
            self._line(buf[pos : min(newline, pos + _HEAD_CAP)])
            pos = newline + 1

    def _line(self, line: bytes) -> None:
        if self._table is None:
            if match := _LOCK_LINE.fullmatch(line):
                name = match.group(1)
                self._table = name.replace(b"``", b"`").decode("utf-8", "replace")
                self.tables[self._table] = 0
                self._head = _insert_head(name)
            elif line.startswith(b"CREATE TABLE `"):
                self._created += 1
            return
        if line == b"UNLOCK TABLES;":
            self._table, self._head = None, None
        elif line and not line.startswith(b"/*!40000 ALTER TABLE "):
            self._fail(f"unexpected statement in the data of table {self._table}: {line[:60]!r}")

    def _values(self, buf: bytes, pos: int) -> int:
        """Consume an INSERT's values from `pos`; return where line-by-line reading resumes."""
        stop = buf.find(_STATEMENT_END, pos)
        body_end = len(buf) - (len(_STATEMENT_END) - 1) if stop < 0 else stop + 1
        body = buf[pos:body_end]
        if stop < 0:
            # an odd run of backslashes at the end: the last one escapes the next piece's first byte
            if (len(body) - len(body.rstrip(b"\\"))) % 2:
                body, body_end = body[:-1], body_end - 1
            self._pending = buf[max(body_end, pos) :]
        self._scan(body)
        if stop < 0:
            return len(buf)
        assert self._table is not None
        if self._in_string or self._opens != self._closes or not self._opens:
            self._fail(f"cannot follow the rows of table {self._table}")
        self.tables[self._table] += self._opens
        self._in_values = False
        return stop + 2  # at the newline: the next line starts after it

    def _scan(self, body: bytes) -> None:
        parts = body.replace(b"\\\\", b"").replace(b"\\'", b"").split(b"'")
        outside = b"".join(parts[1::2] if self._in_string else parts[0::2])
        self._opens += outside.count(b"(")
        self._closes += outside.count(b")")
        if len(parts) % 2 == 0:  # an odd number of quotes: the string state flips
            self._in_string = not self._in_string


class _CountingChunks:
    """The dump's chunks, each counted in a worker thread while the pipeline handles it."""

    def __init__(self, chunks: AsyncIterator[bytes], counts: TableCounts) -> None:
        self._chunks = chunks
        self._counts = counts
        self._counter = DumpRowCounter()
        self._counting: asyncio.Future[None] | None = None

    def __aiter__(self) -> _CountingChunks:
        return self

    async def _settle(self) -> None:
        if self._counting is not None:
            counting, self._counting = self._counting, None
            await counting

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._chunks.__anext__()
        except StopAsyncIteration:
            await self._settle()
            self._counts.tables = self._counter.result()
            if self._counts.tables is None:
                log.warning("row counts are not recorded", reason=self._counter.problem)
            raise
        await self._settle()
        self._counting = asyncio.ensure_future(asyncio.to_thread(self._counter.feed, chunk))
        return chunk

    async def close(self) -> None:
        if self._counting is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._counting)


# engines whose rows mysqldump does not dump (they live elsewhere): no count on either side
_DATA_ELSEWHERE = ("MRG_MyISAM", "MRG_MYISAM", "FEDERATED", "CONNECT", "SPIDER")
_COUNT_BATCH = 50


async def _count_tables(db: Any, schema: str) -> dict[str, int]:
    placeholders = ", ".join(["%s"] * len(_DATA_ELSEWHERE))
    names = [
        str(name)
        for (name,) in await _rows(
            db,
            "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = %s "  # noqa: S608 - only %s
            "AND TABLE_TYPE IN ('BASE TABLE', 'SYSTEM VERSIONED') "
            f"AND COALESCE(ENGINE, '') NOT IN ({placeholders}) ORDER BY TABLE_NAME",
            (schema, *_DATA_ELSEWHERE),
        )
    ]
    counts: dict[str, int] = {}
    for start in range(0, len(names), _COUNT_BATCH):
        batch = names[start : start + _COUNT_BATCH]
        sql = " UNION ALL ".join(
            f"SELECT {i}, COUNT(*) FROM {_ident(schema)}.{_ident(name)}"  # noqa: S608 - quoted names
            for i, name in enumerate(batch)
        )
        for index, rows in await _rows(db, sql):
            counts[batch[int(index)]] = int(rows)
    return counts


# ------------------------------------------------------------------ the engine


class MySQLEngine:
    name = "mysql"
    dump_format = "mysql-sql"
    dump_extension = "sql"
    tools: tuple[str, ...] = (*DUMP_TOOLS, *CLIENT_TOOLS)

    def locate_tool(self, name: str) -> str | None:
        return locate_mysql_tool(name)

    def tool_problem(
        self, action: ToolAction, versions: Mapping[str, str | None], server_version: str
    ) -> ToolProblem | None:
        return mysql_tool_problem(action, versions, server_version)

    async def test(self, conn: Connection) -> str:
        settings = parse_settings(conn.settings)
        async with _session(settings, conn, settings.database) as db:
            ((version,),) = await _rows(db, "SELECT VERSION()")
        # "10.11.18-MariaDB-0+deb12u1" -> "10.11.18-MariaDB"; MySQL: "8.0.36"
        match = re.match(r"\d+(\.\d+)*(-MariaDB)?", str(version))
        return match.group(0) if match else str(version)

    async def list_databases(self, conn: Connection) -> list[str]:
        settings = parse_settings(conn.settings)
        async with _session(settings, conn, settings.database) as db:
            rows = await _rows(db, "SHOW DATABASES")
        return sorted(str(name) for (name,) in rows if str(name).lower() not in SYSTEM_SCHEMAS)

    @staticmethod
    def dump_argv(tool: MySQLTool, options_file: Path, database: str) -> list[str]:
        argv = [
            tool.path,
            f"--defaults-extra-file={options_file}",  # must come first
            "--single-transaction",
            "--quick",
            "--routines",
            "--triggers",
            "--events",
            "--hex-blob",
            "--default-character-set=utf8mb4",
            "--no-tablespaces",
            "--add-drop-table",
            "--add-drop-trigger",
            "--skip-dump-date",
            "--max-allowed-packet=1G",
        ]
        if not tool.mariadb:
            argv.append("--set-gtid-purged=OFF")
        # no --databases: no CREATE DATABASE / USE, so the dump restores into any database name
        return [*argv, "--", database]

    @staticmethod
    def restore_argv(tool: MySQLTool, options_file: Path, database: str) -> list[str]:
        return [
            tool.path,
            f"--defaults-extra-file={options_file}",  # must come first
            "--batch",
            "--binary-mode",
            "--default-character-set=utf8mb4",
            "--max-allowed-packet=1G",
            f"--database={database}",
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
        database = _require_database(settings)
        tool = await find_mysql_tool("mariadb-dump", "mysqldump")
        if settings.ssl_mode == "required" and tool.mariadb:
            # MariaDB's tools cannot insist on TLS without verifying the certificate: check that the
            # server offers it at all (aiomysql logs in only over TLS here)
            async with _session(settings, conn, database):
                pass
        password = conn.secrets.get("password")
        with _options_file(client_options(settings, password, tool, connect_timeout=False)) as options:
            async with stream_stdout(
                self.dump_argv(tool, options, database),
                env=_tool_env(),
                explain=_explain_tool_failure(Path(tool.path).name, settings),
                secrets=list(conn.secrets.values()),
            ) as chunks:
                if counts is None:
                    yield chunks
                    return
                counting = _CountingChunks(chunks, counts)
                try:
                    yield counting
                finally:
                    await counting.close()

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        """Load the dump into a fresh scratch database; only if all of it loaded, swap it in.

        A stream that fails or is cancelled, or a dump the client rejects, costs only the scratch
        database: the target is not touched until the whole dump is in.
        """
        settings = parse_settings(conn.settings)
        target = _require_database(settings)
        tool = await find_mysql_tool("mariadb", "mysql")
        scratch = f"{SCRATCH_PREFIX}{secrets.token_hex(8)}_restore"
        async with _session(settings, conn, target) as db:  # the target must exist and let us in
            ((charset, collation),) = await _rows(
                db,
                "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME FROM information_schema.SCHEMATA "
                "WHERE SCHEMA_NAME = %s",
                (target,),
            )
            if not (_CHARSET_NAME.fullmatch(charset) and _CHARSET_NAME.fullmatch(collation)):
                raise EngineError("error", f"unexpected character set of database {target}: {charset}")
            try:
                await db.query(
                    f"CREATE DATABASE {_ident(scratch)} CHARACTER SET {charset} COLLATE {collation}"
                )
            except aiomysql.OperationalError as exc:
                raise EngineError(
                    "auth_failed" if exc.args[0] in (1044, 1227) else "error",
                    f"cannot create the scratch database {scratch} a restore loads into first: "
                    f"{exc.args[-1]}; the user needs CREATE and DROP on databases named {SCRATCH_PREFIX}%",
                ) from None
        try:
            password = conn.secrets.get("password")
            with _options_file(client_options(settings, password, tool, connect_timeout=True)) as options:
                fed = await feed_stdin(
                    self.restore_argv(tool, options, scratch),
                    chunks,
                    env=_tool_env(),
                    explain=_explain_tool_failure(Path(tool.path).name, settings),
                    secrets=list(conn.secrets.values()),
                )
        except BaseException:
            await asyncio.shield(_drop_databases(settings, conn, scratch))
            raise
        # Once the swap starts, a cancel must not stop it between its statements: it runs to its
        # end in its own task, and only then does the cancel go on.
        swap = asyncio.ensure_future(_swap_then_drop(settings, conn, scratch, target))
        try:
            await asyncio.shield(swap)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await swap
            raise
        return fed

    # ------------------------------------------------------------ scratch databases (test restores)

    async def create_scratch(self, conn: Connection, name: str) -> Connection:
        settings = parse_settings(conn.settings)
        async with _session(settings, conn, None) as db:
            charset, collation = "utf8mb4", None
            if settings.database:  # the source's defaults, so the dump loads as it would there
                found = await _rows(
                    db,
                    "SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                    "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                    (settings.database,),
                )
                if found and all(_CHARSET_NAME.fullmatch(value) for value in found[0]):
                    charset, collation = found[0]
            spec = f"CHARACTER SET {charset}" + (f" COLLATE {collation}" if collation else "")
            try:
                await db.query(f"CREATE DATABASE {_ident(name)} {spec}")
            except aiomysql.Error as exc:
                code = exc.args[0] if exc.args else 0
                raise EngineError(
                    "auth_failed" if code in (1044, 1227) else "error",
                    f"cannot create the scratch database {name} on {settings.address}: {exc.args[-1]}; "
                    f"the user needs CREATE and DROP on databases named {SCRATCH_PREFIX}%",
                ) from None
        return Connection(settings={**conn.settings, "database": name}, secrets=conn.secrets)

    async def drop_scratch(self, conn: Connection, name: str) -> None:
        settings = parse_settings(conn.settings)
        try:
            async with _session(settings, conn, None) as db:
                await db.query("SET SESSION foreign_key_checks = 0")
                await _kill_sessions_in(db, name)
                await db.query(f"DROP DATABASE IF EXISTS {_ident(name)}")
        except aiomysql.Error as exc:
            raise EngineError(
                "error", f"cannot drop the scratch database {name} on {settings.address}: {exc.args[-1]}"
            ) from None

    async def list_scratch(self, conn: Connection, prefix: str) -> list[str]:
        settings = parse_settings(conn.settings)
        pattern = prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"
        async with _session(settings, conn, None) as db:
            rows = await _rows(
                db,
                "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE %s ORDER BY 1",
                (pattern,),
            )
        return [str(name) for (name,) in rows]

    async def count_rows(self, conn: Connection) -> dict[str, int]:
        settings = parse_settings(conn.settings)
        database = _require_database(settings)
        async with _session(settings, conn, database) as db:
            return await _count_tables(db, database)

    async def check_restored(self, conn: Connection) -> list[str]:
        # the load itself rebuilt every index and unique key; foreign keys are not re-checked (the
        # dump turns FOREIGN_KEY_CHECKS off) because that means joining every pair of tables
        return []
