"""Run a dump tool and stream its stdout, or feed a restore tool's stdin, with real backpressure.

Shared by every engine that shells out (pg_dump/psql today, mysqldump and mongodump later). Two
promises hold whatever the tool does:

- a dump whose tool exits non-zero never looks complete: the iterator raises instead of ending;
- a restore whose input fails never reaches the tool's end of input: the tool is SIGKILLed while
  its stdin is still open, so a tool that commits at EOF (psql --single-transaction) never commits.

Secrets travel only in the child's environment; whatever the tool prints is scrubbed of them
before it can reach an exception message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

from rahatback_agent.engines.base import EngineError

__all__ = ["CHUNK_SIZE", "ExplainFailure", "StderrTail", "feed_stdin", "stream_stdout"]

CHUNK_SIZE = 1 << 20
_STDERR_TAIL_BYTES = 4096
_PIPE_EOF_WAIT_S = 5

# (tool exit status, scrubbed stderr tail) -> the error the user sees
ExplainFailure = Callable[[int, str], EngineError]


def _scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class StderrTail:
    """Drains a tool's stderr as it is written (a full stderr pipe would stall the tool) and keeps
    only the end, which is where tools say why they failed."""

    def __init__(self, stream: asyncio.StreamReader | None, secrets: Sequence[str]) -> None:
        self._secrets = secrets
        self._tail = bytearray()
        self._task: asyncio.Task[None] | None = (
            asyncio.create_task(self._drain(stream)) if stream is not None else None
        )

    async def _drain(self, stream: asyncio.StreamReader) -> None:
        while data := await stream.read(65536):
            self._tail += data
            # keep twice the tail so a secret is never split across the cut before scrubbing
            if len(self._tail) > 2 * _STDERR_TAIL_BYTES:
                del self._tail[: -2 * _STDERR_TAIL_BYTES]

    async def text(self) -> str:
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        decoded = _scrub(self._tail.decode("utf-8", "replace"), self._secrets)
        return decoded[-_STDERR_TAIL_BYTES:].strip()

    async def finish(self) -> None:
        """Wait for stderr's EOF, so its pipe is closed, but not forever: a grandchild that
        inherited the pipe could hold it open after the tool is gone."""
        if self._task is not None and not self._task.done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._task), _PIPE_EOF_WAIT_S)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def _kill_and_reap(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    if proc.stdout is not None:
        # A pipe paused by backpressure never sees EOF, and until every pipe is closed wait()
        # never returns: read what is left (the tool is dead, so the end comes at once).
        await _discard_until_eof(proc.stdout)
    # shielded: a second cancellation must not leave a zombie behind
    await asyncio.shield(proc.wait())


async def _discard_until_eof(stream: asyncio.StreamReader) -> None:
    async def drain() -> None:
        while await stream.read(CHUNK_SIZE):
            pass

    # bounded: a grandchild that inherited the pipe could keep it open after the tool is gone
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(drain(), _PIPE_EOF_WAIT_S)


class _StdoutChunks:
    """An async iterator over a tool's stdout in chunk_size pieces (the last one may be shorter).

    Reading happens only when the consumer asks for the next chunk; the StreamReader stops reading
    the pipe once it buffers about 2 x its limit, the pipe fills, and the tool blocks in write().
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        stderr: StderrTail,
        explain: ExplainFailure,
        chunk_size: int,
    ) -> None:
        self._proc = proc
        self._stderr = stderr
        self._explain = explain
        self._chunk_size = chunk_size
        self._finished = False

    def __aiter__(self) -> _StdoutChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        assert self._proc.stdout is not None
        try:
            data = await self._proc.stdout.readexactly(self._chunk_size)
        except asyncio.IncompleteReadError as short:
            data = short.partial
        if data:
            return data
        self._finished = True
        status = await self._proc.wait()
        if status != 0:
            raise self._explain(status, await self._stderr.text())
        raise StopAsyncIteration


@asynccontextmanager
async def stream_stdout(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    explain: ExplainFailure,
    secrets: Sequence[str] = (),
    chunk_size: int = CHUNK_SIZE,
) -> AsyncIterator[AsyncIterator[bytes]]:
    """Start `argv` and yield an iterator of its stdout. Leaving the context early kills and reaps
    the tool; ending normally means the tool exited 0 after its last byte was read."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            limit=chunk_size,
        )
    except OSError as exc:
        raise EngineError("tool_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
    stderr = StderrTail(proc.stderr, secrets)
    try:
        yield _StdoutChunks(proc, stderr, explain, chunk_size)
    finally:
        await _kill_and_reap(proc)
        await stderr.finish()


async def feed_stdin(
    argv: Sequence[str],
    chunks: AsyncIterator[bytes],
    *,
    env: Mapping[str, str],
    explain: ExplainFailure,
    secrets: Sequence[str] = (),
) -> int:
    """Write `chunks` to the stdin of `argv` and return the bytes written.

    Only a normally exhausted `chunks` closes stdin (the tool's cue to finish and commit). If
    `chunks` raises or the caller is cancelled, the tool is SIGKILLed first and the error re-raised.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
        )
    except OSError as exc:
        raise EngineError("tool_failed", f"cannot start {argv[0]}: {exc.strerror}") from None
    stderr = StderrTail(proc.stderr, secrets)
    stdin = proc.stdin
    assert stdin is not None
    fed = 0
    tool_quit_early = False
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            try:
                stdin.write(chunk)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                # the tool stopped reading (it failed, or was told to quit); its status says why
                tool_quit_early = True
                break
            fed += len(chunk)
    except BaseException:
        await _kill_and_reap(proc)
        stdin.close()
        await stderr.finish()
        raise
    stdin.close()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await stdin.wait_closed()
    status = await proc.wait()
    if status != 0:
        raise explain(status, await stderr.text())
    await stderr.finish()
    if tool_quit_early:
        raise EngineError("tool_failed", f"{argv[0]} exited before reading the whole dump ({fed} bytes read)")
    return fed
