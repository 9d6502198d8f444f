"""SQLite: the embedded demo default. Dumps are SQL text from `iterdump()`; restores rebuild the file.

The dump reads inside one read transaction, so a concurrent writer can't tear it (SQLite gives the
transaction a snapshot), and memory stays bounded whatever the file size. The blocking sqlite3 calls
run in a worker thread that hands ~1 MiB chunks over a two-slot queue: it stays at most two chunks
ahead of the consumer.

A restore builds the database in a temporary file next to the target and only renames it over the
target once every chunk has arrived and executed, so a failed restore leaves the target untouched.

Row counts for the manifest are taken inside the dump's read transaction (the same snapshot); test
restores build their scratch database in a private folder of the system's temp dir
(docs/verification.md).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rahatback_agent.engines.base import Connection, EngineError, NoExternalTools, TableCounts
from rahatback_agent.engines.process import CHUNK_SIZE

__all__ = ["SQLiteEngine", "SQLiteSettings"]

_QUEUE_SLOTS = 2
T = TypeVar("T")


class SQLiteSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    path: str = Field(min_length=1)


def _parse_settings(raw: dict[str, Any]) -> Path:
    try:
        return Path(SQLiteSettings.model_validate(raw).path)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise EngineError("bad_settings", f"invalid SQLite settings: {problems}") from None


def _open_read_only(path: Path) -> sqlite3.Connection:
    # mode=ro: a missing file is an error instead of a fresh empty database created by the test
    if not path.is_file():
        raise EngineError("unknown_database", f"SQLite database {path} does not exist")
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise EngineError("unknown_database", f"cannot open SQLite database {path}: {exc}") from None
    try:
        # opening is lazy: the first read is what rejects a file that isn't a database
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        db.close()
        raise EngineError("unknown_database", f"{path} is not a readable SQLite database: {exc}") from None
    return db


_END = object()


async def _in_thread(function: Callable[..., T], *args: Any) -> T:
    """asyncio.to_thread that, when cancelled, still waits for the thread: the caller closes the
    sqlite3 connection next, and must not do it under a running statement."""
    work = asyncio.ensure_future(asyncio.to_thread(function, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await work
        raise


class _ThreadChunks:
    """Runs a blocking chunk producer in its own thread; the consumer pulls through a bounded queue.

    The producer takes a slot before every put and the consumer gives one back after every get,
    so the producer is never more than _QUEUE_SLOTS chunks ahead.
    """

    def __init__(self, produce: Callable[[], Generator[bytes, None, None]]) -> None:
        self._produce = produce
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._slots = threading.Semaphore(_QUEUE_SLOTS)
        self._stop = threading.Event()
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="sqlite-dump", daemon=True)
        self._thread.start()

    def _hand_over(self, item: object) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _run(self) -> None:
        try:
            # closing(): the producer's cleanup (closing its sqlite3 connection) runs here, in this
            # thread, not whenever and wherever the abandoned generator is collected
            with contextlib.closing(self._produce()) as chunks:
                for chunk in chunks:
                    self._slots.acquire()
                    if self._stop.is_set():
                        return
                    self._hand_over(chunk)
            self._hand_over(_END)
        except BaseException as exc:
            self._hand_over(exc)
        finally:
            self._loop.call_soon_threadsafe(self._done.set_result, None)

    def __aiter__(self) -> _ThreadChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, bytes):
            self._slots.release()
            return item
        self._finished = True
        if isinstance(item, BaseException):
            raise item
        raise StopAsyncIteration

    async def close(self) -> None:
        self._stop.set()
        # wakes a producer waiting for a slot; it sees the stop flag and returns
        self._slots.release()
        await self._done


# the tables iterdump() writes rows of: ordinary tables (FTS and other virtual tables keep their
# rows in ordinary shadow tables), not SQLite's own bookkeeping (sqlite_sequence, sqlite_stat1)
_TABLES_SQL = (
    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
    " AND sql NOT LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name"
)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _count_tables(db: sqlite3.Connection) -> dict[str, int]:
    names = [str(name) for (name,) in db.execute(_TABLES_SQL).fetchall()]
    return {name: int(db.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0]) for name in names}  # noqa: S608


def _dump_chunks(path: Path, counts: TableCounts | None = None) -> Generator[bytes, None, None]:
    db = _open_read_only(path)
    try:
        # one read transaction for the whole dump: every table comes from the same snapshot
        db.execute("BEGIN")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        pending: list[bytes] = []
        size = 0
        for statement in db.iterdump():
            line = statement.encode() + b"\n"
            pending.append(line)
            size += len(line)
            if size >= CHUNK_SIZE:
                yield b"".join(pending)
                pending, size = [], 0
        if counts is not None:
            # still inside the dump's read transaction: exactly the rows just dumped
            counts.tables = _count_tables(db)
        if pending:
            yield b"".join(pending)
    finally:
        db.close()


_SQL_SPECIAL = re.compile(r"""--|/\*|[;'"`\[]""")
_CLOSERS = {"'": "'", '"': '"', "`": "`", "[": "]", "/*": "*/"}
# a single row's INSERT from iterdump() is one statement; a blob is dumped as hex, twice its size
_MAX_STATEMENT_CHARS = 1 << 30

# iterdump() wraps its output in these; the restore runs its own single transaction instead
_WRAPPER_BEGIN = "BEGIN TRANSACTION;"
_WRAPPER_COMMIT = "COMMIT;"


class _ScriptRunner:
    """Executes an SQL script that arrives in arbitrary byte pieces, one statement at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._partial_line = ""
        self._parts: list[str] = []
        self._size = 0
        self._open: str | None = None  # the quote or comment opener we are inside of
        self.saw_begin = False
        self.saw_commit = False

    def feed(self, data: bytes, final: bool = False) -> None:
        text = self._partial_line + self._decoder.decode(data, final)
        lines = text.split("\n")
        self._partial_line = "" if final else lines.pop()
        for line in lines:
            # parts, not str +=: an attribute string is copied on every append
            self._parts.append(line + "\n")
            self._size += len(line) + 1
            # complete_statement rescans the whole buffer, so ask only when this line has a ';'
            # outside quotes and comments: an unclosed quote must not make the restore quadratic
            if self._ends_statement(line):
                statement = "".join(self._parts)
                if sqlite3.complete_statement(statement):
                    self._execute(statement)
                    self._parts, self._size = [], 0
            elif self._size > _MAX_STATEMENT_CHARS:
                raise EngineError("tool_failed", "the SQLite dump holds an unterminated statement")
        if final and "".join(self._parts).strip():
            raise EngineError("tool_failed", "the SQLite dump ends in the middle of a statement")

    def _ends_statement(self, line: str) -> bool:
        """Tracks quotes and block comments across lines; True if `line` has a ';' outside them."""
        found = False
        pos = 0
        while pos < len(line):
            if self._open is not None:
                end = line.find(_CLOSERS[self._open], pos)
                if end < 0:
                    break
                pos = end + len(_CLOSERS[self._open])
                self._open = None
                continue
            token = _SQL_SPECIAL.search(line, pos)
            if token is None or token.group() == "--":
                break
            pos = token.end()
            if token.group() == ";":
                found = True
            else:
                self._open = token.group()
        return found and self._open is None

    def _execute(self, sql: str) -> None:
        stripped = sql.strip()
        if stripped == _WRAPPER_BEGIN:
            self.saw_begin = True
            return
        if stripped == _WRAPPER_COMMIT:
            self.saw_commit = True
            return
        try:
            self._db.execute(sql)
        except sqlite3.ProgrammingError as exc:
            if "one statement at a time" not in str(exc):
                raise
            self._execute_each(sql)

    def _execute_each(self, sql: str) -> None:
        # several statements on one line: cut at the first ';' that closes a complete statement
        start = 0
        for index, char in enumerate(sql):
            if char == ";" and sqlite3.complete_statement(sql[start : index + 1]):
                self._execute(sql[start : index + 1])
                start = index + 1
        if sql[start:].strip():
            raise EngineError("tool_failed", "the SQLite dump ends in the middle of a statement")


class SQLiteEngine(NoExternalTools):
    name = "sqlite"
    dump_format = "sqlite-sql"
    dump_extension = "sql"

    async def test(self, conn: Connection) -> str:
        path = _parse_settings(conn.settings)

        def check() -> str:
            _open_read_only(path).close()
            return sqlite3.sqlite_version

        return await asyncio.to_thread(check)

    async def list_databases(self, conn: Connection) -> list[str]:
        # one file is one database
        path = _parse_settings(conn.settings)
        await asyncio.to_thread(lambda: _open_read_only(path).close())
        return [str(path)]

    def dump(
        self, conn: Connection, counts: TableCounts | None = None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._dump(conn, counts)

    @asynccontextmanager
    async def _dump(
        self, conn: Connection, counts: TableCounts | None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        path = _parse_settings(conn.settings)
        chunks = _ThreadChunks(lambda: _dump_chunks(path, counts))
        try:
            yield chunks
        finally:
            await chunks.close()

    async def restore(self, conn: Connection, chunks: AsyncIterator[bytes]) -> int:
        target = _parse_settings(conn.settings)
        folder = target.absolute().parent
        if not folder.is_dir():
            raise EngineError(
                "unknown_database", f"folder {folder} for SQLite database {target} does not exist"
            )
        try:
            fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".restoring", dir=folder)
        except OSError as exc:
            raise EngineError("tool_failed", f"cannot create a file in {folder}: {exc.strerror}") from None
        os.close(fd)
        temp = Path(temp_name)
        replaced = False
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(temp, isolation_level=None, check_same_thread=False)
            db.execute("BEGIN")
            runner = _ScriptRunner(db)
            fed = 0
            async for chunk in chunks:
                await _in_thread(runner.feed, chunk)
                fed += len(chunk)
            await _in_thread(runner.feed, b"", True)
            if runner.saw_begin and not runner.saw_commit:
                raise EngineError("tool_failed", "the SQLite dump is truncated: its final COMMIT is missing")
            await _in_thread(self._finish, db, temp, target)
            db, replaced = None, True
            return fed
        except sqlite3.Error as exc:
            raise EngineError("tool_failed", f"restoring {target} failed: {exc}") from None
        except OSError as exc:
            raise EngineError("tool_failed", f"restoring {target} failed: {exc.strerror or exc}") from None
        finally:
            _discard(db, None if replaced else temp)

    # ------------------------------------------------------------ scratch databases (test restores)

    async def create_scratch(self, conn: Connection, name: str) -> Connection:
        return Connection(settings={"path": str(await asyncio.to_thread(_create_scratch, name))})

    async def drop_scratch(self, conn: Connection, name: str) -> None:
        folder = _scratch_dir(name)
        await asyncio.to_thread(shutil.rmtree, folder, True)

    async def list_scratch(self, conn: Connection, prefix: str) -> list[str]:
        def names() -> list[str]:
            try:
                return sorted(p.name for p in scratch_root().iterdir() if p.name.startswith(prefix))
            except OSError:
                return []

        return await asyncio.to_thread(names)

    async def count_rows(self, conn: Connection) -> dict[str, int]:
        return await asyncio.to_thread(_count_scratch, _parse_settings(conn.settings))

    async def check_restored(self, conn: Connection) -> list[str]:
        return await asyncio.to_thread(_quick_check, _parse_settings(conn.settings))

    @staticmethod
    def _finish(db: sqlite3.Connection, temp: Path, target: Path) -> None:
        db.execute("COMMIT")
        db.close()
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        if target.exists():
            shutil.copymode(target, temp)
            _checkpoint_wal(target)
        os.replace(temp, target)
        # the rename itself must survive a crash
        dir_fd = os.open(target.absolute().parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def scratch_root() -> Path:
    """Where test restores build SQLite scratch databases: the system's temp dir (TMPDIR), never
    next to the user's files."""
    return Path(tempfile.gettempdir())


def _scratch_dir(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise EngineError("bad_settings", f"invalid scratch database name {name!r}")
    return scratch_root() / name


def _create_scratch(name: str) -> Path:
    folder = _scratch_dir(name)
    shutil.rmtree(folder, ignore_errors=True)  # a leftover of this very verification
    try:
        folder.mkdir(mode=0o700)
    except OSError as exc:
        raise EngineError("error", f"cannot create the scratch folder {folder}: {exc.strerror}") from None
    return folder / "scratch.sqlite"


def _count_scratch(path: Path) -> dict[str, int]:
    db = _open_read_only(path)
    try:
        return _count_tables(db)
    finally:
        db.close()


def _quick_check(path: Path) -> list[str]:
    db = _open_read_only(path)
    try:
        found = [str(row[0]) for row in db.execute("PRAGMA quick_check").fetchall()]
    finally:
        db.close()
    return [] if found == ["ok"] else [f"SQLite quick_check: {problem}" for problem in found[:10]]


def _discard(db: sqlite3.Connection | None, temp: Path | None) -> None:
    if db is not None:
        db.close()
    if temp is not None:
        temp.unlink(missing_ok=True)


def _checkpoint_wal(target: Path) -> None:
    """Fold the old file's write-ahead log into it and drop it: a leftover -wal next to the new file
    would be replayed into it on the next open."""
    with contextlib.suppress(sqlite3.Error):
        old = sqlite3.connect(target, isolation_level=None)
        try:
            old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            old.close()
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
