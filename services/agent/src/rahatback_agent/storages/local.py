"""A folder on the agent host (local disk or a mounted NAS share) as backup storage.

Objects become visible only complete: the writer fills a hidden temporary file next to the
destination, fsyncs it, renames it into place atomically and fsyncs the folder, so a crash or
an aborted backup never leaves a file that looks like a finished artifact.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from rahatback_agent.storages.base import StorageError

__all__ = ["LocalStorage", "LocalWriter"]

READ_CHUNK = 1 << 20
TEMP_PREFIX = ".rahatback-tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    # strerror only: the OS message never contains file contents or credentials.
    return exc.strerror or type(exc).__name__


class LocalWriter:
    def __init__(self, final_path: Path, temp_path: Path, fh: IO[bytes], key: str) -> None:
        self._final = final_path
        self._temp = temp_path
        self._fh = fh
        self._key = key
        self._state = "open"

    @property
    def temp_path(self) -> Path:
        return self._temp

    def _ensure_open(self) -> None:
        if self._state != "open":
            raise StorageError("closed", f"the writer for {self._key!r} is already {self._state}")

    async def write(self, data: bytes) -> None:
        self._ensure_open()
        try:
            await asyncio.to_thread(self._fh.write, data)
        except OSError as exc:
            code = "no_space" if exc.errno == errno.ENOSPC else "write_failed"
            raise StorageError(code, f"writing {self._key!r} failed: {_describe(exc)}") from exc

    def _commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._temp, self._final)
        _fsync_dir(self._final.parent)

    async def commit(self) -> None:
        self._ensure_open()
        try:
            await asyncio.to_thread(self._commit)
        except OSError as exc:
            await self.abort()
            raise StorageError("write_failed", f"committing {self._key!r} failed: {_describe(exc)}") from exc
        self._state = "committed"

    def _abort(self) -> None:
        self._fh.close()
        self._temp.unlink(missing_ok=True)

    async def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        await asyncio.to_thread(self._abort)


class LocalStorage:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> LocalStorage:
        path = settings.get("path")
        if not isinstance(path, str) or not path:
            raise StorageError("bad_settings", "local storage needs settings.path, an absolute folder path")
        if not os.path.isabs(path):
            raise StorageError("bad_settings", f"local storage path must be absolute, got {path!r}")
        return cls(Path(path))

    def _path(self, key: str) -> Path:
        """Map a relative POSIX key to a path that cannot leave the root."""
        if not key or "\x00" in key or "\\" in key:
            raise StorageError("bad_key", f"invalid storage key {key!r}")
        pure = PurePosixPath(key)
        if pure.is_absolute():
            raise StorageError("bad_key", f"storage key must be relative, got {key!r}")
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise StorageError("bad_key", f"storage key {key!r} has an empty, '.' or '..' segment")
        if parts[-1].startswith(TEMP_PREFIX):
            raise StorageError("bad_key", f"storage key {key!r} uses the reserved temporary-file prefix")
        return self.root.joinpath(*parts)

    def _open_temp(self, final: Path) -> tuple[Path, IO[bytes]]:
        # Checked first so an unmounted NAS share is reported as such, not as "cannot create".
        if not self.root.is_dir():
            raise StorageError("folder_missing", f"storage folder {str(self.root)!r} does not exist")
        final.parent.mkdir(parents=True, exist_ok=True)
        temp = final.parent / f"{TEMP_PREFIX}{final.name}.{secrets.token_hex(8)}"
        fh = open(temp, "xb")  # noqa: SIM115 - the writer owns the handle until commit/abort
        return temp, fh

    async def open_writer(self, key: str) -> LocalWriter:
        final = self._path(key)
        try:
            temp, fh = await asyncio.to_thread(self._open_temp, final)
        except OSError as exc:
            raise StorageError(
                "not_writable", f"cannot create {key!r} under {str(self.root)!r}: {_describe(exc)}"
            ) from exc
        return LocalWriter(final, temp, fh, key)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            fh = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise StorageError("not_found", f"{key!r} does not exist in the storage") from exc
        except OSError as exc:
            raise StorageError("read_failed", f"cannot open {key!r}: {_describe(exc)}") from exc
        try:
            while True:
                try:
                    chunk = await asyncio.to_thread(fh.read, READ_CHUNK)
                except OSError as exc:
                    raise StorageError("read_failed", f"reading {key!r} failed: {_describe(exc)}") from exc
                if not chunk:
                    return
                yield chunk
        finally:
            fh.close()

    async def put_bytes(self, key: str, data: bytes) -> None:
        writer = await self.open_writer(key)
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def delete(self, key: str) -> None:
        """Remove an object; deleting one that is already gone is not an error (retries are safe)."""
        path = self._path(key)
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError("delete_failed", f"cannot delete {key!r}: {_describe(exc)}") from exc

    def _list(self, prefix: str) -> list[str]:
        # walk only the folder the prefix names; its last segment is a partial name matched as text
        folder, _, _ = prefix.rpartition("/")
        if "\x00" in prefix or "\\" in prefix or prefix.startswith("/"):
            raise StorageError("bad_key", f"invalid storage prefix {prefix!r}")
        if folder and any(part in ("", ".", "..") for part in folder.split("/")):
            raise StorageError("bad_key", f"storage prefix {prefix!r} has an empty, '.' or '..' segment")
        if not self.root.is_dir():
            raise StorageError("folder_missing", f"storage folder {str(self.root)!r} does not exist")
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        keys: list[str] = []
        if not start.is_dir():
            return keys  # nothing was ever stored under that folder

        def fail(exc: OSError) -> None:
            if isinstance(exc, FileNotFoundError):
                return  # removed while we walked (retention): nothing to list in it
            raise exc  # a folder we cannot read would otherwise make the listing silently incomplete

        for dirpath, _, filenames in os.walk(start, onerror=fail):
            base = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith(TEMP_PREFIX):
                    continue
                key = filename if base == "." else f"{base}/{filename}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        try:
            keys = await asyncio.to_thread(self._list, prefix)
        except OSError as exc:
            raise StorageError("list_failed", f"cannot list {prefix!r}: {_describe(exc)}") from exc
        for key in keys:
            yield key

    async def probe(self) -> None:
        root = self.root
        if not await asyncio.to_thread(root.exists):
            raise StorageError("folder_missing", f"storage folder {str(root)!r} does not exist")
        if not await asyncio.to_thread(root.is_dir):
            raise StorageError("not_a_folder", f"storage path {str(root)!r} is not a folder")
        key = f".rahatback-probe-{secrets.token_hex(8)}"
        payload = secrets.token_bytes(64)
        try:
            await self.put_bytes(key, payload)
        except StorageError as exc:
            raise StorageError("not_writable", f"cannot write to {str(root)!r}: {exc.message}") from exc
        try:
            try:
                back = await self.get_bytes(key)
            except StorageError as exc:
                raise StorageError(
                    "read_failed", f"cannot read back from {str(root)!r}: {exc.message}"
                ) from exc
            if back != payload:
                raise StorageError(
                    "read_mismatch", f"a test file written to {str(root)!r} read back different bytes"
                )
        finally:
            try:
                await asyncio.to_thread((root / key).unlink)
            except OSError as exc:
                raise StorageError(
                    "delete_failed", f"cannot delete the test file in {str(root)!r}: {_describe(exc)}"
                ) from exc
