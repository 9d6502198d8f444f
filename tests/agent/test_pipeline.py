"""The streaming backup/restore chain, end to end through a real local folder storage."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
import zstandard
from rahatback_agent.artifact import ArtifactError, read_header
from rahatback_agent.pipeline import (
    Manifest,
    PipelineResult,
    artifact_extension,
    manifest_key,
    restore_stream,
    run_backup_pipeline,
)
from rahatback_agent.storages.local import LocalStorage

Compression = Literal["zstd", "gzip", "none"]
JOB_KEY = os.urandom(32)
COMPRESSIONS: list[Compression] = ["zstd", "gzip", "none"]
LEVELS = {"zstd": 3, "gzip": 6, "none": 0}


def sample_dump() -> bytes:
    """Some incompressible and some very compressible bytes, like a dump with blobs and SQL."""
    rows = b"".join(b"INSERT INTO t VALUES (%d, 'row %d');\n" % (i, i * 7) for i in range(60_000))
    return os.urandom(1_500_000) + rows + os.urandom(333)


async def pieces(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        if i % (size * 8) == 0:
            await asyncio.sleep(0)


async def backup(
    storage: LocalStorage, key: str, data: bytes, compression: Compression, encrypted: bool
) -> PipelineResult:
    writer = await storage.open_writer(key)
    try:
        result = await run_backup_pipeline(
            pieces(data),
            writer,
            compression=compression,
            level=LEVELS[compression],
            job_key=JOB_KEY if encrypted else None,
            key_id="job-1" if encrypted else None,
        )
    except BaseException:
        await writer.abort()
        raise
    await writer.commit()
    return result


async def restore_all(source: AsyncIterator[bytes], **kwargs: object) -> bytes:
    out = bytearray()
    async for chunk in restore_stream(source, **kwargs):  # type: ignore[arg-type]
        out += chunk
    return bytes(out)


def assert_nothing_left_running() -> None:
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("rahatback-")] == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_round_trip(tmp_path: Path, compression: Compression, encrypted: bool) -> None:
    storage = LocalStorage(tmp_path)
    data = sample_dump()
    key = f"db/x.sql{artifact_extension(compression, encrypted)}"
    result = await backup(storage, key, data, compression, encrypted)

    artifact = (tmp_path / key).read_bytes()
    assert result.dump_size == len(data)
    assert result.dump_sha256 == hashlib.sha256(data).hexdigest()
    assert result.artifact_size == len(artifact)
    assert result.artifact_sha256 == hashlib.sha256(artifact).hexdigest()
    if compression != "none":
        assert len(artifact) < len(data)  # the SQL part compresses
    if encrypted:
        assert read_header(artifact).compression == compression
    elif compression == "zstd":
        # Standard tools read an unencrypted artifact.
        assert zstandard.ZstdDecompressor().decompressobj().decompress(artifact) == data
    elif compression == "gzip":
        assert gzip.decompress(artifact) == data
    else:
        assert artifact == data

    restored = await restore_all(
        storage.read(key),
        compression=compression,
        job_key_lookup=JOB_KEY if encrypted else None,
        expected_artifact_sha256=result.artifact_sha256,
        expected_dump_sha256=result.dump_sha256,
    )
    assert restored == data
    assert_nothing_left_running()


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_empty_dump_round_trip(tmp_path: Path, compression: Compression, encrypted: bool) -> None:
    storage = LocalStorage(tmp_path)
    result = await backup(storage, "empty", b"", compression, encrypted)
    assert result.dump_size == 0
    assert result.dump_sha256 == hashlib.sha256(b"").hexdigest()
    restored = await restore_all(
        storage.read("empty"),
        compression=compression,
        job_key_lookup=JOB_KEY if encrypted else None,
        expected_dump_sha256=result.dump_sha256,
        expected_artifact_sha256=result.artifact_sha256,
    )
    assert restored == b""


def test_artifact_extensions() -> None:
    assert artifact_extension("zstd", True) == ".zst.rbk"
    assert artifact_extension("gzip", True) == ".gz.rbk"
    assert artifact_extension("none", True) == ".rbk"
    assert artifact_extension("zstd", False) == ".zst"
    assert artifact_extension("gzip", False) == ".gz"
    assert artifact_extension("none", False) == ""
    assert manifest_key("a/b.sql.zst.rbk") == "a/b.sql.zst.rbk.manifest.json"


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(
        run_id="r1",
        engine="postgresql",
        server_version="15.8",
        dump_format="postgresql-plain-sql",
        database_name="shop",
        compression="zstd",
        encrypted=True,
        key_id="job-1",
        dump_size=10,
        artifact_size=20,
        dump_sha256="a" * 64,
        artifact_sha256="b" * 64,
        agent_version="0.1.0",
        created_at=datetime(2026, 11, 26, 3, 15, tzinfo=UTC),
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert b'"dump_sha256": "aaaa' in manifest.to_json()


class GatedWriter:
    """A storage that accepts nothing until the gate opens, like a stalled upload."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.data = bytearray()

    async def write(self, data: bytes) -> None:
        await self.gate.wait()
        self.data += data

    async def commit(self) -> None:
        return None

    async def abort(self) -> None:
        self.data.clear()


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_slow_writer_slows_the_source(compression: Compression) -> None:
    total = 96 << 20
    pulled = 0
    block = os.urandom(1 << 20)  # incompressible: compression cannot hide buffering

    async def source() -> AsyncIterator[bytes]:
        nonlocal pulled
        for i in range(total // 65_536):
            piece = block[(i % 16) * 65_536 : (i % 16 + 1) * 65_536]
            pulled += len(piece)
            yield piece
            await asyncio.sleep(0)

    writer = GatedWriter()
    task = asyncio.create_task(
        run_backup_pipeline(source(), writer, compression=compression, level=1, job_key=JOB_KEY, key_id="k")
    )
    try:
        # Wait until the pipeline stops pulling: every queue is full and the writer is blocked.
        last, stable = -1, 0
        for _ in range(400):
            await asyncio.sleep(0.02)
            stable = stable + 1 if pulled == last else 0
            last = pulled
            if stable >= 10:
                break
        assert stable >= 10, "the pipeline never stopped pulling from the source"
        assert writer.data == b""
        assert 0 < pulled <= 32 << 20, f"pulled {pulled >> 20} MiB while the writer accepted nothing"
    finally:
        writer.gate.set()
        result = await task
    assert pulled == total
    assert result.dump_size == total
    assert result.artifact_size == len(writer.data)


class Boom(Exception):
    pass


async def test_source_failure_propagates_and_stops_everything() -> None:
    async def failing_source() -> AsyncIterator[bytes]:
        for _ in range(5):
            yield os.urandom(700_000)
        raise Boom("pg_dump exited with status 1")

    writer = GatedWriter()
    writer.gate.set()
    with pytest.raises(Boom, match="pg_dump exited"):
        await run_backup_pipeline(
            failing_source(), writer, compression="zstd", level=3, job_key=JOB_KEY, key_id="k"
        )
    assert_nothing_left_running()


async def test_writer_failure_propagates_and_stops_pulling() -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1 << 16
            yield os.urandom(1 << 16)
            await asyncio.sleep(0)

    class FullDisk(GatedWriter):
        async def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        await run_backup_pipeline(
            endless(), FullDisk(), compression="gzip", level=1, job_key=None, key_id=None
        )
    stopped_at = pulled
    await asyncio.sleep(0.1)
    assert pulled == stopped_at
    assert_nothing_left_running()


async def test_cancelling_the_backup_leaves_nothing_running() -> None:
    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield os.urandom(1 << 16)
            await asyncio.sleep(0)

    class Watched(GatedWriter):
        enough = asyncio.Event()

        async def write(self, data: bytes) -> None:
            await super().write(data)
            if len(self.data) >= 2 << 20:
                self.enough.set()

    writer = Watched()
    writer.gate.set()
    task = asyncio.create_task(
        run_backup_pipeline(endless(), writer, compression="zstd", level=3, job_key=JOB_KEY, key_id="k")
    )
    await asyncio.wait_for(writer.enough.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_left_running()


async def test_progress_is_reported_and_ends_with_the_totals(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    data = sample_dump()
    writer = await LocalStorage(tmp_path).open_writer("p")
    result = await run_backup_pipeline(
        pieces(data),
        writer,
        compression="zstd",
        level=3,
        job_key=JOB_KEY,
        key_id="k",
        on_progress=lambda a, b: calls.append((a, b)),
    )
    await writer.commit()
    assert calls[-1] == (result.dump_size, result.artifact_size)
    assert len(calls) <= 10


# ---------------------------------------------------------------- restore errors surface before the end


async def consume(stream: AsyncIterator[bytes]) -> tuple[int, BaseException | None]:
    """How a restore consumer behaves: count bytes; 'commit' only if the stream ended cleanly."""
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
    except ArtifactError as exc:
        return received, exc
    return received, None


async def make_artifact(
    tmp_path: Path, compression: Compression, encrypted: bool
) -> tuple[bytes, PipelineResult]:
    storage = LocalStorage(tmp_path)
    result = await backup(storage, "a", sample_dump(), compression, encrypted)
    return (tmp_path / "a").read_bytes(), result


@pytest.mark.parametrize("compression", COMPRESSIONS)
async def test_truncated_encrypted_artifact_raises_before_the_end(
    tmp_path: Path, compression: Compression
) -> None:
    artifact, _ = await make_artifact(tmp_path, compression, True)
    header = read_header(artifact)
    # Cut exactly at a chunk boundary: every chunk present authenticates, only the final one is gone.
    cut = header.size + 5 + (1 << 20) + 16
    _, error = await consume(
        restore_stream(pieces(artifact[:cut]), compression=compression, job_key_lookup=JOB_KEY)
    )
    assert error is not None and "truncated" in str(error)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
async def test_truncated_plain_compressed_artifact_raises(tmp_path: Path, compression: Compression) -> None:
    artifact, _ = await make_artifact(tmp_path, compression, False)
    _, error = await consume(
        restore_stream(pieces(artifact[: len(artifact) - 100]), compression=compression, job_key_lookup=None)
    )
    assert error is not None and "truncated" in str(error)


async def test_plain_artifact_checksum_mismatch_raises_before_the_end(tmp_path: Path) -> None:
    artifact, result = await make_artifact(tmp_path, "none", False)
    damaged = bytearray(artifact)
    damaged[1000] ^= 1
    received, error = await consume(
        restore_stream(
            pieces(bytes(damaged)),
            compression="none",
            job_key_lookup=None,
            expected_artifact_sha256=result.artifact_sha256,
        )
    )
    assert error is not None and "artifact checksum mismatch" in str(error)
    assert received < len(artifact)  # the last block is withheld with the error


async def test_dump_checksum_mismatch_raises(tmp_path: Path) -> None:
    artifact, _ = await make_artifact(tmp_path, "zstd", True)
    _, error = await consume(
        restore_stream(
            pieces(artifact), compression="zstd", job_key_lookup=JOB_KEY, expected_dump_sha256="0" * 64
        )
    )
    assert error is not None and "dump checksum mismatch" in str(error)


async def test_tampered_and_wrong_key_restores_raise(tmp_path: Path) -> None:
    artifact, _ = await make_artifact(tmp_path, "zstd", True)
    damaged = bytearray(artifact)
    damaged[-5] ^= 0x10
    _, error = await consume(
        restore_stream(pieces(bytes(damaged)), compression="zstd", job_key_lookup=JOB_KEY)
    )
    assert error is not None and "failed authentication" in str(error)

    _, error = await consume(
        restore_stream(pieces(artifact), compression="zstd", job_key_lookup=os.urandom(32))
    )
    assert error is not None and "wrong key" in str(error)

    _, error = await consume(restore_stream(pieces(artifact), compression="zstd", job_key_lookup=None))
    assert error is not None and "encrypted" in str(error) and "no key" in str(error)

    _, error = await consume(restore_stream(pieces(artifact), compression="gzip", job_key_lookup=JOB_KEY))
    assert error is not None and "compression 'zstd'" in str(error)
    assert_nothing_left_running()


async def test_consumer_stopping_early_cleans_up(tmp_path: Path) -> None:
    artifact, _ = await make_artifact(tmp_path, "zstd", True)
    stream = restore_stream(pieces(artifact), compression="zstd", job_key_lookup=JOB_KEY)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert_nothing_left_running()


def blank_padded_rows() -> bytes:
    # pgbench-like rows padded with blanks compress ~100:1
    row = b"%08d" + b" " * 392 + b"\n"
    return b"".join(row % i for i in range(400_000))  # 160 MB


def zeros() -> bytes:
    return bytes(256 << 20)  # compresses ~30000:1: a few KiB of artifact stand for all of it


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
@pytest.mark.parametrize("make_dump", [blank_padded_rows, zeros])
async def test_restore_of_a_very_compressible_dump_yields_bounded_pieces(
    tmp_path: Path, compression: Compression, make_dump: Callable[[], bytes]
) -> None:
    # one artifact block may stand for hundreds of MiB of dump; the restore must hand it out in
    # pieces of about a MiB, never expand it at once
    data = make_dump()
    storage = LocalStorage(tmp_path)
    key = f"db/x.sql{artifact_extension(compression, True)}"
    result = await backup(storage, key, data, compression, True)
    assert result.artifact_size * 50 < len(data)

    largest = total = 0
    digest = hashlib.sha256()
    async for piece in restore_stream(storage.read(key), compression=compression, job_key_lookup=JOB_KEY):
        largest = max(largest, len(piece))
        total += len(piece)
        digest.update(piece)
    assert total == len(data) and digest.hexdigest() == result.dump_sha256
    assert largest <= 2 << 20, f"one restore piece was {largest / 2**20:.0f} MiB"
