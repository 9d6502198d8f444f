"""The small interface every database engine implements. Adding an engine = one module + one registry line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

ErrorCode = Literal[
    "auth_failed",
    "unreachable",
    "unknown_database",
    "bad_settings",
    "timeout",
    "tool_failed",
    "tool_missing",
    "tool_too_old",
    "error",
]
ToolAction = Literal["dump", "restore"]


class EngineError(Exception):
    """A failure the user can act on. `code` is machine-readable, the message says what to fix."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ToolProblem:
    """Why this host's dump/restore tool cannot serve a server, and what to install (docs/dump-tools.md).

    `tool_missing`: the program the server needs is not installed; `tool_too_old`: a newer one is.
    Not `fatal`: the tool should work but is older than advised; runs go on and log it."""

    code: Literal["tool_missing", "tool_too_old"]
    message: str
    fatal: bool = True


@dataclass(frozen=True)
class Connection:
    """Where a database is and how to log in. `secrets` holds plaintext only in agent memory."""

    settings: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class TableCounts:
    """Rows per table in the snapshot a dump was taken from, for the manifest (docs/verification.md).

    Handed to `Engine.dump`; the engine fills `tables` before the dump's iterator ends normally.
    None: the engine cannot count, or counting failed (logged) — the dump itself is still good.
    """

    tables: dict[str, int] | None = None


class Engine(Protocol):
    name: str  # registry key, equals contracts' Engine literal: "postgresql", "sqlite", ...
    dump_format: str  # recorded in the manifest, e.g. "postgresql-plain-sql"
    dump_extension: str  # used in the storage key, e.g. "sql"
    # external programs the engine may run, e.g. ("pg_dump", "psql"); () = none (listed in the heartbeat)
    tools: tuple[str, ...]

    async def test(self, conn: Connection) -> str:
        """Connect, run the version query, return the server version. Raise EngineError."""

    async def list_databases(self, conn: Connection) -> list[str]: ...

    def dump(
        self, conn: Connection, counts: TableCounts | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream the dump. Exiting the context stops and reaps the dump process; if the tool
        failed (non-zero exit), the iterator raises EngineError(code="tool_failed", stderr tail)
        instead of ending normally, so a failed dump can never look complete. Given `counts`, an
        engine that can count rows from the dump's own snapshot fills it in (see TableCounts)."""

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        """Feed the dump into the target atomically and return the bytes fed. If `chunks` raises
        (tampered/truncated artifact) or the tool fails, the target is left exactly as it was."""

    def locate_tool(self, name: str) -> str | None:
        """Where the engine would run `name` (one of `tools`) from, by its own search rules; None: absent."""

    def tool_problem(
        self, action: ToolAction, versions: Mapping[str, str | None], server_version: str
    ) -> ToolProblem | None:
        """Can the tools found (name → version, None = version unreadable; a missing tool has no key)
        dump or restore a server of `server_version`? None = yes."""


class NoExternalTools:
    """For engines that run no external program (their drivers do the whole job)."""

    tools: tuple[str, ...] = ()

    def locate_tool(self, name: str) -> str | None:
        return None

    def tool_problem(
        self, action: ToolAction, versions: Mapping[str, str | None], server_version: str
    ) -> ToolProblem | None:
        return None


@runtime_checkable
class ScratchDatabases(Protocol):
    """What a test restore needs from an engine besides `restore` (docs/verification.md): a scratch
    database to restore into, row counts to compare with the manifest's, and a way to drop it."""

    async def create_scratch(self, conn: Connection, name: str) -> Connection:
        """Create the empty scratch database `name` on the server `conn` reaches and return a
        connection to it. Never touches the database `conn` names. Raise EngineError."""

    async def drop_scratch(self, conn: Connection, name: str) -> None:
        """Drop `name` (already gone: fine), ending any session still using it. Raise EngineError."""

    async def list_scratch(self, conn: Connection, prefix: str) -> list[str]:
        """Names of the scratch databases on that server whose name starts with `prefix`."""

    async def count_rows(self, conn: Connection) -> dict[str, int]:
        """Rows per table of the database `conn` names, with the same table names and the same
        choice of tables as the counts the engine records at dump time."""

    async def check_restored(self, conn: Connection) -> list[str]:
        """The engine's own cheap consistency checks of a restored scratch database: problems found."""
