"""The interface every storage implements (local folder now; S3 and Google Drive later)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol


class StorageError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ArtifactWriter(Protocol):
    async def write(self, data: bytes) -> None: ...

    async def commit(self) -> None:
        """Make the object visible under its key, durably (fsync + atomic rename / complete multipart)."""

    async def abort(self) -> None:
        """Throw away everything written; no partial object may remain."""


class Storage(Protocol):
    kind: str

    async def open_writer(self, key: str) -> ArtifactWriter: ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """Stream an object's bytes; StorageError(code="not_found") if it does not exist."""

    async def put_bytes(self, key: str, data: bytes) -> None: ...

    async def get_bytes(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> AsyncIterator[str]:
        """Keys of the complete objects whose key starts with `prefix` (a plain string prefix, as in
        S3: "db/2026/" or "db/2026/11/db_2026"), in lexicographic order; never temporary files."""

    async def probe(self) -> None:
        """Write, read back and delete a small object; StorageError naming what failed."""
