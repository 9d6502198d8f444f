"""The small interface every database engine implements. Adding an engine = one module + one registry line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

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


class Engine(Protocol):
    name: str  # registry key, equals contracts' Engine literal: "postgresql", "sqlite", ...
    dump_format: str  # recorded in the manifest, e.g. "postgresql-plain-sql"
    dump_extension: str  # used in the storage key, e.g. "sql"
    # external programs the engine may run, e.g. ("pg_dump", "psql"); () = none (listed in the heartbeat)
    tools: tuple[str, ...]

    async def test(self, conn: Connection) -> str:
        """Connect, run the version query, return the server version. Raise EngineError."""

    async def list_databases(self, conn: Connection) -> list[str]: ...

    def dump(self, conn: Connection) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream the dump. Exiting the context stops and reaps the dump process; if the tool
        failed (non-zero exit), the iterator raises EngineError(code="tool_failed", stderr tail)
        instead of ending normally, so a failed dump can never look complete."""

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
