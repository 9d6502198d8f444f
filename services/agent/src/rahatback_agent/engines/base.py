"""The small interface every database engine implements. Adding an engine = one module + one registry line."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ErrorCode = Literal[
    "auth_failed", "unreachable", "unknown_database", "bad_settings", "timeout", "tool_failed", "error"
]


class EngineError(Exception):
    """A failure the user can act on. `code` is machine-readable, the message says what to fix."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Connection:
    """Where a database is and how to log in. `secrets` holds plaintext only in agent memory."""

    settings: dict[str, Any]
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


class Engine(Protocol):
    name: str  # registry key, equals contracts' Engine literal: "postgresql", "sqlite", ...
    dump_format: str  # recorded in the manifest, e.g. "postgresql-plain-sql"
    dump_extension: str  # used in the storage key, e.g. "sql"

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
