"""One artifact stream written to several storages at once (the 3-2-1 rule).

Every block goes to every healthy copy before the next block is accepted, so the slowest storage
sets the pace and memory stays at one block whatever the number of copies. A copy that fails is
aborted and dropped (its storage keeps nothing); the others go on. Only when no copy is left does
the write fail, which stops the dump.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .base import ArtifactWriter, StorageError


@dataclass
class Copy:
    name: str  # for messages: the storage's name
    writer: ArtifactWriter
    error: str | None = None
    committed: bool = False


@dataclass
class FanOutWriter:
    copies: list[Copy]
    describe: Callable[[BaseException], str] = str
    _live: list[Copy] = field(init=False)

    def __post_init__(self) -> None:
        self._live = [c for c in self.copies if c.error is None]

    async def _each(self, action: Callable[[Copy], Awaitable[None]]) -> None:
        results = await asyncio.gather(*(action(c) for c in self._live), return_exceptions=True)
        failed = []
        for copy, result in zip(self._live, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                copy.error = self.describe(result)
                failed.append(copy)
        for copy in failed:
            await asyncio.shield(copy.writer.abort())
        self._live = [c for c in self._live if c.error is None]
        if not self._live:
            raise StorageError("all_copies_failed", self.summary())

    async def write(self, data: bytes) -> None:
        await self._each(lambda c: c.writer.write(data))

    async def commit(self) -> None:
        async def commit(copy: Copy) -> None:
            await copy.writer.commit()
            copy.committed = True

        await self._each(commit)

    async def abort(self) -> None:
        await asyncio.gather(*(asyncio.shield(c.writer.abort()) for c in self._live), return_exceptions=True)
        self._live = []

    def summary(self) -> str:
        failed = [f"{c.name}: {c.error}" for c in self.copies if c.error is not None]
        return "every storage failed — " + "; ".join(failed) if failed else "no storage to write to"
