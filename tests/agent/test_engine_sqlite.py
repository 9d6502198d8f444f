"""SQLiteEngine on real files: restored rows equal dumped rows, and a failed restore changes nothing."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rahatback_agent.engines.base import Connection, EngineError
from rahatback_agent.engines.sqlite import SQLiteEngine

TABLES = ("customers", "orders", "sqlite_sequence")


def make_source(path: Path, rows: int = 3000) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        """
        PRAGMA journal_mode = WAL;
        CREATE TABLE customers (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, note TEXT,
                                photo BLOB, balance REAL, joined TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers (id),
                             amount NUMERIC);
        CREATE INDEX orders_customer ON orders (customer_id);
        CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
        CREATE TRIGGER no_negative BEFORE INSERT ON orders WHEN NEW.amount < 0
            BEGIN SELECT RAISE(ABORT, 'negative amount'); END;
        """
    )
    db.executemany(
        "INSERT INTO customers (name, note, photo, balance, joined) VALUES (?, ?, ?, ?, ?)",
        [
            (
                "Ayşe",
                "çok önemli; 'quoted' ✓\nsecond line",
                b"\x00\xff\x10",
                12.5,
                "2026-11-26T10:00:00+03:00",
            ),
            ("empty", "", b"", 0.0, None),
            ("nulls", None, None, None, None),
        ]
        + [(f"bulk {i}", "x" * (i % 300), bytes([i % 256]) * 20, i / 7, None) for i in range(rows)],
    )
    db.executemany(
        "INSERT INTO orders (customer_id, amount) VALUES (?, ?)",
        [(i % 50 + 1, i * 3.25) for i in range(rows)],
    )
    db.commit()
    db.close()


def fingerprint(path: Path) -> dict[str, str]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = {}
        for table in TABLES:
            try:
                rows = db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
            except sqlite3.OperationalError:
                result[table] = "absent"
                continue
            result[table] = f"{len(rows)}:{hashlib.sha256(repr(rows).encode()).hexdigest()}"
        result["schema"] = repr(
            db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        )
        return result
    finally:
        db.close()


def names_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def leftovers(folder: Path) -> list[str]:
    """Temporary restore files: hidden, next to the target."""
    return [name for name in names_in(folder) if name.startswith(".")]


def conn_for(path: Path) -> Connection:
    return Connection(settings={"path": str(path)})


async def collect(path: Path) -> list[bytes]:
    async with SQLiteEngine().dump(conn_for(path)) as chunks:
        return [chunk async for chunk in chunks]


async def replay(chunks: list[bytes], piece: int = 7919) -> AsyncIterator[bytes]:
    # odd-sized pieces cut statements and multi-byte characters in the middle
    data = b"".join(chunks)
    for start in range(0, len(data), piece):
        yield data[start : start + piece]


class ArtifactTampered(Exception):
    pass


async def replay_then_fail(chunks: list[bytes], after_bytes: int) -> AsyncIterator[bytes]:
    data = b"".join(chunks)
    yield data[:after_bytes]
    raise ArtifactTampered("chunk failed authentication")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.db"
    make_source(path)
    return path


async def test_test_returns_sqlite_version(source: Path) -> None:
    assert await SQLiteEngine().test(conn_for(source)) == sqlite3.sqlite_version


async def test_missing_file_is_unknown_database_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    with pytest.raises(EngineError) as err:
        await SQLiteEngine().test(conn_for(missing))
    assert err.value.code == "unknown_database"
    assert str(missing) in err.value.message
    assert not missing.exists()


async def test_non_database_file_is_rejected(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is not a database, just some text that is long enough to have a header" * 10)
    with pytest.raises(EngineError) as err:
        await SQLiteEngine().test(conn_for(bogus))
    assert err.value.code == "unknown_database"
    assert str(bogus) in err.value.message


async def test_missing_path_setting_is_bad_settings() -> None:
    with pytest.raises(EngineError) as err:
        await SQLiteEngine().test(Connection(settings={}))
    assert err.value.code == "bad_settings"
    assert "path" in err.value.message


async def test_list_databases_is_the_file(source: Path) -> None:
    assert await SQLiteEngine().list_databases(conn_for(source)) == [str(source)]


async def test_round_trip_into_new_file_is_identical(source: Path, tmp_path: Path) -> None:
    dump = await collect(source)
    target = tmp_path / "restored.db"

    fed = await SQLiteEngine().restore(conn_for(target), replay(dump))

    assert fed == sum(map(len, dump))
    assert fingerprint(target) == fingerprint(source)
    db = sqlite3.connect(target)
    try:
        assert db.execute("SELECT note, photo FROM customers WHERE name = 'Ayşe'").fetchone() == (
            "çok önemli; 'quoted' ✓\nsecond line",
            b"\x00\xff\x10",
        )
        with pytest.raises(sqlite3.IntegrityError, match="negative amount"):
            db.execute("INSERT INTO orders (customer_id, amount) VALUES (1, -1)")
        # AUTOINCREMENT continues after the restored rows instead of reusing ids
        db.execute("INSERT INTO customers (name) VALUES ('new')")
        assert db.execute("SELECT max(id) FROM customers").fetchone() == (3004,)
    finally:
        db.close()
    assert leftovers(tmp_path) == []


async def test_dump_comes_in_mebibyte_chunks(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    make_source(path, rows=30000)
    chunks = await collect(path)
    assert len(chunks) > 2
    assert all(len(chunk) >= 1 << 20 for chunk in chunks[:-1])
    assert all(len(chunk) < (1 << 20) + 100_000 for chunk in chunks)


async def test_restore_replaces_existing_database(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    make_source(target, rows=10)
    dump = await collect(source)

    await SQLiteEngine().restore(conn_for(target), replay(dump))

    assert fingerprint(target) == fingerprint(source)
    # the old write-ahead log must not linger next to the new file
    assert f"{target.name}-wal" not in names_in(tmp_path)


@pytest.mark.parametrize("fail_after", [0, 5000, 200_000])
async def test_failure_mid_stream_leaves_target_unchanged(
    source: Path, tmp_path: Path, fail_after: int
) -> None:
    target = tmp_path / "target.db"
    make_source(target, rows=10)
    before = fingerprint(target)
    dump = await collect(source)

    with pytest.raises(ArtifactTampered):
        await SQLiteEngine().restore(conn_for(target), replay_then_fail(dump, fail_after))

    assert fingerprint(target) == before
    assert leftovers(tmp_path) == []


async def test_truncated_dump_is_refused(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "fresh.db"
    data = b"".join(await collect(source))
    cut = data[: data.rindex(b"\nINSERT") + 1]  # ends on a whole statement, final COMMIT missing

    async def truncated() -> AsyncIterator[bytes]:
        yield cut

    with pytest.raises(EngineError) as err:
        await SQLiteEngine().restore(conn_for(target), truncated())
    assert err.value.code == "tool_failed"
    assert not target.exists()


async def test_garbage_script_is_tool_failed_and_target_unchanged(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    make_source(target, rows=10)
    before = fingerprint(target)

    async def garbage() -> AsyncIterator[bytes]:
        yield b"CREATE TABLE t (x);\nTHIS IS NOT SQL;\n"

    with pytest.raises(EngineError) as err:
        await SQLiteEngine().restore(conn_for(target), garbage())
    assert err.value.code == "tool_failed"
    assert "syntax error" in err.value.message
    assert fingerprint(target) == before


async def test_several_statements_on_one_line_run(tmp_path: Path) -> None:
    target = tmp_path / "t.db"

    async def script() -> AsyncIterator[bytes]:
        yield b"CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('a;b'); INSERT INTO t VALUES ('c');\n"

    await SQLiteEngine().restore(conn_for(target), script())
    db = sqlite3.connect(target)
    assert db.execute("SELECT x FROM t ORDER BY x").fetchall() == [("a;b",), ("c",)]
    db.close()


async def test_dump_is_a_consistent_snapshot_under_concurrent_writes(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    make_source(path, rows=30000)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        async with SQLiteEngine().dump(conn_for(path)) as chunks:
            received = [await anext(aiter(chunks))]
            # committed while the dump is half way: must not appear in it (orders come after customers)
            writer.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 424242)")
            writer.execute("DELETE FROM customers WHERE id > 10")
            received += [chunk async for chunk in chunks]
    finally:
        writer.close()
    target = tmp_path / "snapshot.db"
    await SQLiteEngine().restore(conn_for(target), replay(received))
    db = sqlite3.connect(target)
    try:
        assert db.execute("SELECT count(*) FROM customers").fetchone() == (30003,)
        assert db.execute("SELECT count(*) FROM orders WHERE amount = 424242").fetchone() == (0,)
    finally:
        db.close()


async def test_leaving_dump_early_stops_the_worker(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    make_source(path, rows=30000)
    async with SQLiteEngine().dump(conn_for(path)) as chunks:
        await anext(aiter(chunks))
    # the worker closed its read transaction: a checkpoint can now fold the whole log back
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("INSERT INTO orders (customer_id, amount) VALUES (1, 1)")
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
    finally:
        db.close()


async def test_dump_of_missing_file_fails_from_the_iterator(tmp_path: Path) -> None:
    async with SQLiteEngine().dump(conn_for(tmp_path / "gone.db")) as chunks:
        with pytest.raises(EngineError) as err:
            await anext(aiter(chunks))
    assert err.value.code == "unknown_database"


async def test_cancelled_restore_leaves_target_and_no_temp_file(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "target.db"
    make_source(target, rows=10)
    before = fingerprint(target)
    dump = b"".join(await collect(source))
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield dump[:100_000]
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.create_task(SQLiteEngine().restore(conn_for(target), slow()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fingerprint(target) == before
    assert leftovers(tmp_path) == []


async def test_unclosed_quote_fails_instead_of_crawling(tmp_path: Path) -> None:
    target = tmp_path / "t.db"

    async def script() -> AsyncIterator[bytes]:
        yield b"INSERT INTO t VALUES ('never closed;\n"
        for _ in range(200):
            yield b"INSERT INTO t VALUES (1);\n" * 2000

    with pytest.raises(EngineError) as err:
        await asyncio.wait_for(SQLiteEngine().restore(conn_for(target), script()), 30)
    assert err.value.code == "tool_failed"
    assert "middle of a statement" in err.value.message
    assert leftovers(tmp_path) == []
