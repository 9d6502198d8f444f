"""The streaming backup and restore chains: dump → compress → encrypt → store, and back.

Stages run concurrently and hand ~1 MiB blocks to each other through small bounded queues, so
memory stays bounded whatever the database size and a slow writer slows the dump down instead
of piling data up. CPU work (hashing, zstd/zlib, AES-GCM) runs in a small private thread pool;
those libraries release the GIL, so the stages really overlap on several cores.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import sys
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, TypeVar

import zstandard
from pydantic import BaseModel, ConfigDict

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

from rahatback_agent.artifact import (
    DEFAULT_CHUNK_SIZE,
    MAGIC,
    ArtifactDecryptor,
    ArtifactEncryptor,
    ArtifactError,
    ArtifactHeader,
)
from rahatback_agent.storages.base import ArtifactWriter

__all__ = [
    "Compression",
    "Manifest",
    "PipelineResult",
    "RestoreDecoder",
    "StreamDigests",
    "artifact_extension",
    "manifest_key",
    "restore_stream",
    "run_backup_pipeline",
]

Compression = Literal["zstd", "gzip", "none"]
ProgressCallback = Callable[[int, int], None]

BLOCK_SIZE = 1 << 20
QUEUE_DEPTH = 2
PROGRESS_INTERVAL = 0.25
# Most dump bytes one decompression step may produce: restore memory stays bounded even for
# dumps that compress 1000:1 (pgbench's blank-padded rows) or a run of zeros that compresses 30000:1.
MAX_PIECE = 1 << 20
ZSTD_MAX_THREADS = 4
ZSTD_JOB_SIZE = 2 << 20

_T = TypeVar("_T")


@dataclass(frozen=True)
class PipelineResult:
    dump_size: int
    artifact_size: int
    dump_sha256: str
    artifact_sha256: str


class Manifest(BaseModel):
    """The sidecar written next to every artifact, so a bucket can be restored without the control plane."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: int = 1
    format: str = "rbk1"
    run_id: str
    engine: str
    server_version: str | None
    dump_format: str
    database_name: str
    compression: Compression
    encrypted: bool
    key_id: str | None
    dump_size: int
    artifact_size: int
    dump_sha256: str
    artifact_sha256: str
    agent_version: str
    created_at: datetime
    # rows per table in the dump's snapshot (docs/verification.md); None: the engine cannot count
    tables: dict[str, int] | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        return cls.model_validate_json(data)


def artifact_extension(compression: Compression, encrypted: bool) -> str:
    """`.zst.rbk`, `.gz.rbk`, `.rbk` (encrypted, uncompressed), `.zst`, `.gz` or `` (plain)."""
    ext = {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
    return ext + (".rbk" if encrypted else "")


def manifest_key(artifact_key: str) -> str:
    return artifact_key + ".manifest.json"


# ---------------------------------------------------------------- compression


class _Compressor:
    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _ZstdCompressor(_Compressor):
    def __init__(self, level: int) -> None:
        # zstd's own worker threads do the compressing (the calling thread only feeds them). A few
        # workers with 2 MiB jobs match -T0's speed on small hosts while keeping the input zstd
        # holds back bounded (~workers x job size), and leave cores to the database on big ones.
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=min(os.cpu_count() or 1, ZSTD_MAX_THREADS), job_size=ZSTD_JOB_SIZE
        )
        self._obj = zstandard.ZstdCompressor(compression_params=params).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


class _GzipCompressor(_Compressor):
    def __init__(self, level: int) -> None:
        self._obj = zlib.compressobj(level, zlib.DEFLATED, 31)

    def compress(self, data: bytes) -> bytes:
        return self._obj.compress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


def _make_compressor(compression: Compression, level: int) -> _Compressor:
    if compression == "zstd":
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level must be in -7..22, got {level}")
        return _ZstdCompressor(level)
    if compression == "gzip":
        if not 1 <= level <= 9:
            raise ValueError(f"gzip level must be in 1..9, got {level}")
        return _GzipCompressor(level)
    if compression == "none":
        return _Compressor()
    raise ValueError(f"unknown compression {compression!r}")


class _Decompressor:
    """Generators all the way down: the caller pulls output piece by piece, so memory stays
    bounded even for dumps that compress 1000:1 (a restore must never hold a whole block's output)."""

    def decompress(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> None:
        return None


class _ZstdDecompressor(_Decompressor):
    def __init__(self) -> None:
        self._obj = zstd.ZstdDecompressor()
        self._in_frame = False

    def decompress(self, data: bytes) -> Iterator[bytes]:
        while True:
            if self._obj.eof:
                # Concatenated frames are valid zstd; continue with a fresh frame decoder.
                data = self._obj.unused_data + data
                self._obj = zstd.ZstdDecompressor()
                self._in_frame = False
            if not data and self._obj.needs_input:
                return
            self._in_frame = True
            try:
                # max_length: a 4 KiB run of zeros may stand for gigabytes; hand them out a MiB at a time
                piece = self._obj.decompress(data, MAX_PIECE)
            except zstd.ZstdError as exc:
                raise ArtifactError(f"compressed data is corrupt (zstd: {exc})") from exc
            data = b""
            if piece:
                yield piece

    def finish(self) -> None:
        if self._in_frame:
            raise ArtifactError("compressed data is truncated: the zstd frame does not end")


class _GzipDecompressor(_Decompressor):
    def __init__(self) -> None:
        self._obj = zlib.decompressobj(31)
        self._in_member = False

    def decompress(self, data: bytes) -> Iterator[bytes]:
        pending = data
        while pending:
            self._in_member = True
            try:
                piece = self._obj.decompress(pending, MAX_PIECE)
            except zlib.error as exc:
                raise ArtifactError(f"compressed data is corrupt (gzip: {exc})") from exc
            if piece:
                yield piece
            pending = self._obj.unconsumed_tail
            if self._obj.eof:
                pending = self._obj.unused_data
                self._obj = zlib.decompressobj(31)
                self._in_member = False

    def finish(self) -> None:
        if self._in_member:
            raise ArtifactError("compressed data is truncated: the gzip stream does not end")


def _make_decompressor(compression: str) -> _Decompressor:
    if compression == "zstd":
        return _ZstdDecompressor()
    if compression == "gzip":
        return _GzipDecompressor()
    if compression == "none":
        return _Decompressor()
    raise ArtifactError(f"unknown compression {compression!r}")


# ---------------------------------------------------------------- shared plumbing


class _Progress:
    def __init__(self, callback: ProgressCallback | None) -> None:
        self._callback = callback
        self._last = 0.0
        self.bytes_in = 0
        self.bytes_out = 0

    def tick(self) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._callback(self.bytes_in, self.bytes_out)

    def final(self) -> None:
        if self._callback is not None:
            self._callback(self.bytes_in, self.bytes_out)


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: object) -> _T:
    """Run `fn` in the pool; if we are cancelled, still wait for the thread to finish, so no
    thread keeps using a compressor or hash after the pipeline has returned."""
    fut = asyncio.get_running_loop().run_in_executor(executor, functools.partial(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved so asyncio does not report it as never retrieved
        raise


async def _run_stages(stages: list[Awaitable[None]]) -> None:
    """Run the stages together; the first failure cancels the rest and is re-raised as itself
    (not wrapped in an ExceptionGroup), so callers see the StorageError/EngineError they expect."""
    tasks = [asyncio.ensure_future(stage) for stage in stages]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in tasks if t in done and not t.cancelled() and t.exception() is not None]
        if failed:
            exc = failed[0].exception()
            assert exc is not None
            raise exc
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        del results  # secondary errors after the first failure are consequences of it


# ---------------------------------------------------------------- backup


async def run_backup_pipeline(
    source: AsyncIterator[bytes],
    writer: ArtifactWriter,
    *,
    compression: Compression,
    level: int,
    job_key: bytes | None,
    key_id: str | None,
    on_progress: ProgressCallback | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PipelineResult:
    """Stream `source` through compression and (if `job_key` is given) RBK1 encryption into `writer`.

    The caller commits or aborts the writer. Any exception from the source, the writer or a
    stage stops every stage and is re-raised unchanged; no task or thread outlives the call.
    """
    if job_key is not None and not key_id:
        raise ValueError("key_id is required when job_key is given")
    compressor = _make_compressor(compression, level)
    encryptor = (
        ArtifactEncryptor(job_key, key_id or "", compression, chunk_size) if job_key is not None else None
    )
    dump_hash = hashlib.sha256()
    artifact_hash = hashlib.sha256()
    progress = _Progress(on_progress)
    sizes = {"dump": 0, "artifact": 0}

    raw: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    hashed: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    compressed: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)
    sealed: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE_DEPTH)

    # The reader does nothing but read and coalesce, so the dump tool's pipe is drained promptly.
    async def read() -> None:
        pieces: list[bytes] = []
        pending = 0
        async for piece in source:
            if not piece:
                continue
            pieces.append(piece)
            pending += len(piece)
            progress.bytes_in += len(piece)
            if pending >= BLOCK_SIZE:
                await raw.put(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                pieces, pending = [], 0
                progress.tick()
        if pieces:
            await raw.put(b"".join(pieces))
        await raw.put(None)

    async def hash_dump() -> None:
        while (block := await raw.get()) is not None:
            await _in_thread(executor, dump_hash.update, block)
            sizes["dump"] += len(block)
            await hashed.put(block)
        await hashed.put(None)

    async def compress() -> None:
        while (block := await hashed.get()) is not None:
            out = await _in_thread(executor, compressor.compress, block)
            if out:
                await compressed.put(out)
        tail = await _in_thread(executor, compressor.flush)
        if tail:
            await compressed.put(tail)
        await compressed.put(None)

    pending = bytearray()

    def seal(data: bytes, final: bool) -> bytes:
        pending.extend(data)
        out: list[bytes] = []
        if encryptor is None:
            # Unencrypted: just coalesce to whole blocks so the writer sees few, large writes.
            if len(pending) >= chunk_size or final:
                out.append(bytes(pending))
                pending.clear()
        else:
            # Keep the last full chunk back until we know whether it is the final one.
            start = 0
            while len(pending) - start > chunk_size:
                out.append(encryptor.seal_chunk(bytes(pending[start : start + chunk_size]), final=False))
                start += chunk_size
            del pending[:start]
            if final:
                out.append(encryptor.seal_chunk(bytes(pending), final=True))
                pending.clear()
        blob = out[0] if len(out) == 1 else b"".join(out)
        artifact_hash.update(blob)
        return blob

    async def encrypt() -> None:
        if encryptor is not None:
            header = encryptor.header()
            artifact_hash.update(header)
            await sealed.put(header)
        while (block := await compressed.get()) is not None:
            out = await _in_thread(executor, seal, block, False)
            if out:
                await sealed.put(out)
        out = await _in_thread(executor, seal, b"", True)
        if out:
            await sealed.put(out)
        await sealed.put(None)

    async def write() -> None:
        while (block := await sealed.get()) is not None:
            await writer.write(block)
            sizes["artifact"] += len(block)
            progress.bytes_out += len(block)
            progress.tick()

    executor = ThreadPoolExecutor(max_workers=3, thread_name_prefix="rahatback-pipeline")
    try:
        await _run_stages([read(), hash_dump(), compress(), encrypt(), write()])
    finally:
        executor.shutdown(wait=True)
    progress.final()
    return PipelineResult(
        dump_size=sizes["dump"],
        artifact_size=sizes["artifact"],
        dump_sha256=dump_hash.hexdigest(),
        artifact_sha256=artifact_hash.hexdigest(),
    )


# ---------------------------------------------------------------- restore


class RestoreDecoder:
    """Synchronous artifact → dump decoder shared by `restore_stream` and the offline `decrypt`.

    `compression=None` takes it from the RBK1 header (encrypted artifacts only). `finish()`
    performs every end-of-stream check (final chunk, complete compressed stream, checksums) and
    raises ArtifactError if any fails.
    """

    def __init__(
        self,
        *,
        compression: Compression | None,
        job_key_lookup: Callable[[str], bytes] | bytes | None,
        expected_artifact_sha256: str | None = None,
        expected_dump_sha256: str | None = None,
    ) -> None:
        if job_key_lookup is None and compression is None:
            raise ValueError("compression is required for an unencrypted artifact")
        self._compression = compression
        self._decryptor = ArtifactDecryptor(job_key_lookup) if job_key_lookup is not None else None
        self._decompressor: _Decompressor | None = (
            _make_decompressor(compression) if self._decryptor is None and compression is not None else None
        )
        self._expected_artifact = expected_artifact_sha256.lower() if expected_artifact_sha256 else None
        self._expected_dump = expected_dump_sha256.lower() if expected_dump_sha256 else None
        self._artifact_hash = hashlib.sha256()
        self._dump_hash = hashlib.sha256()
        self._head = b""
        self.artifact_size = 0
        self.dump_size = 0

    @property
    def header(self) -> ArtifactHeader | None:
        return self._decryptor.header if self._decryptor is not None else None

    def _check_plain_start(self, data: bytes) -> None:
        # An encrypted artifact restored without a key would otherwise fail as "corrupt zstd".
        if len(self._head) < len(MAGIC):
            self._head += data[: len(MAGIC) - len(self._head)]
            if self._head == MAGIC:
                raise ArtifactError("the artifact is encrypted (RBK1) but no key was given")

    def _decompress(self, data: bytes) -> Iterator[bytes]:
        if self._decompressor is None:
            assert self._decryptor is not None and self._decryptor.header is not None
            from_header = self._decryptor.header.compression
            if self._compression is not None and from_header != self._compression:
                raise ArtifactError(
                    f"the artifact header says compression {from_header!r}"
                    f" but {self._compression!r} was expected"
                )
            self._decompressor = _make_decompressor(from_header)
        for piece in self._decompressor.decompress(data):
            self._dump_hash.update(piece)
            self.dump_size += len(piece)
            yield piece

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decode `data`, yielding dump bytes piece by piece (pull them all before the next feed)."""
        self._artifact_hash.update(data)
        self.artifact_size += len(data)
        if self._decryptor is None:
            self._check_plain_start(data)
            yield from self._decompress(data)
            return
        for plain in self._decryptor.feed(data):
            yield from self._decompress(plain)

    def finish(self) -> None:
        if self._decryptor is not None:
            self._decryptor.finish()
        if self._decompressor is not None:
            self._decompressor.finish()
        elif self._decryptor is None:
            raise ArtifactError("artifact is empty")
        if self._expected_artifact is not None and self._artifact_hash.hexdigest() != self._expected_artifact:
            raise ArtifactError(
                "artifact checksum mismatch: its SHA-256 is not the one recorded at backup time"
                " (tampered, truncated or a different file)"
            )
        if self._expected_dump is not None and self._dump_hash.hexdigest() != self._expected_dump:
            raise ArtifactError(
                "dump checksum mismatch: the restored dump's SHA-256 is not the one recorded at backup time"
            )

    @property
    def dump_sha256(self) -> str:
        return self._dump_hash.hexdigest()

    @property
    def artifact_sha256(self) -> str:
        return self._artifact_hash.hexdigest()


@dataclass
class StreamDigests:
    """What a restore stream read, filled in once it has ended cleanly (verification compares these
    with every checksum it knows instead of stopping at the first mismatch)."""

    artifact_sha256: str | None = None
    dump_sha256: str | None = None
    artifact_size: int = 0
    dump_size: int = 0


class _End:
    pass


_END = _End()


async def restore_stream(
    source: AsyncIterator[bytes],
    *,
    compression: Compression,
    job_key_lookup: Callable[[str], bytes] | bytes | None,
    expected_artifact_sha256: str | None = None,
    expected_dump_sha256: str | None = None,
    on_progress: ProgressCallback | None = None,
    digests: StreamDigests | None = None,
) -> AsyncGenerator[bytes, None]:
    """Yield the plaintext dump of an artifact as it is authenticated and decompressed.

    Contract: every failure — a tampered or reordered chunk, a wrong key, a missing final chunk,
    trailing bytes, a truncated compressed stream, or a final SHA-256 mismatch — is raised as
    ArtifactError by this iterator *before* it is exhausted. So a consumer that commits the
    restore (closes the tool's stdin normally, commits the transaction) only after the iterator
    ended cleanly never commits a bad restore. Bytes already yielded are authentic (each RBK1
    chunk is authenticated before it is released) but may be incomplete until the end.
    For unencrypted artifacts, `expected_artifact_sha256` is the only tamper check.

    `job_key_lookup` is the 32-byte job key, or a function from the header's key id to it
    (raise KeyError if unknown); None means the artifact is not encrypted. The source is
    closed (aclose) when the stream stops. `digests`, if given, receives both SHA-256s and sizes
    before the stream ends cleanly.
    """
    decoder = RestoreDecoder(
        compression=compression,
        job_key_lookup=job_key_lookup,
        expected_artifact_sha256=expected_artifact_sha256,
        expected_dump_sha256=expected_dump_sha256,
    )
    progress = _Progress(on_progress)
    queue: asyncio.Queue[bytes | _End | BaseException] = asyncio.Queue(QUEUE_DEPTH)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rahatback-restore")

    def decode(data: bytes, last: bool) -> Iterator[bytes]:
        """Dump bytes of one artifact block in pieces of about BLOCK_SIZE, never a whole block's
        expansion at once."""
        pieces: list[bytes] = []
        size = 0
        for piece in decoder.feed(data):
            pieces.append(piece)
            size += len(piece)
            if size >= BLOCK_SIZE:
                yield b"".join(pieces)
                pieces, size = [], 0
        if last:
            decoder.finish()
        if pieces:
            yield b"".join(pieces)

    async def decode_into_queue(data: bytes, last: bool) -> None:
        pieces = decode(data, last)
        while (out := await _in_thread(executor, next, pieces, None)) is not None:
            progress.bytes_in = decoder.artifact_size
            await queue.put(out)

    async def produce() -> None:
        try:
            try:
                pieces: list[bytes] = []
                pending = 0
                async for piece in source:
                    pieces.append(piece)
                    pending += len(piece)
                    if pending >= BLOCK_SIZE:
                        await decode_into_queue(b"".join(pieces), False)
                        pieces, pending = [], 0
                await decode_into_queue(b"".join(pieces), True)
                progress.bytes_in = decoder.artifact_size
                if digests is not None:
                    digests.artifact_sha256 = decoder.artifact_sha256
                    digests.dump_sha256 = decoder.dump_sha256
                    digests.artifact_size = decoder.artifact_size
                    digests.dump_size = decoder.dump_size
            finally:
                aclose = getattr(source, "aclose", None)
                if aclose is not None:
                    await aclose()
        except Exception as exc:
            await queue.put(exc)
        else:
            await queue.put(_END)

    task = asyncio.create_task(produce())
    try:
        while True:
            item = await queue.get()
            if isinstance(item, _End):
                break
            if isinstance(item, BaseException):
                raise item
            progress.bytes_out += len(item)
            progress.tick()
            yield item
        progress.final()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        executor.shutdown(wait=True)
