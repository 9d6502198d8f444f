"""The scratch databases this agent has created and not dropped yet, kept in a small file next to its
identity, so that an agent killed mid test-restore drops them at its next start (docs/verification.md).

An entry keeps the server exactly as the verify command described it: settings in clear, secrets
still sealed to this agent for that verification (`seal_info("verify", verify_id)`). The agent
reopens them with its private key when it needs them; no password is ever written to disk.
"""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime
from pathlib import Path

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rahatback_contracts.messages import DatabaseTarget, Engine

from .private_files import write_private_atomic

__all__ = ["ScratchEntry", "ScratchRegistry"]

log = structlog.get_logger("rahatback_agent.scratch_registry")


class ScratchEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    verify_id: str
    scratch: str
    engine: Engine
    # the scratch database's server as the command gave it; `secrets` stays the sealed blob
    server: DatabaseTarget
    created_at: datetime


class _RegistryFile(BaseModel):
    version: int = 1
    entries: list[ScratchEntry] = Field(default_factory=list)


class ScratchRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        # verifications run concurrently (in worker threads for the file I/O): one writer at a time
        self._lock = threading.Lock()

    @classmethod
    def beside(cls, config: Path) -> ScratchRegistry:
        """`agent.json` → `agent.scratch.json` in the same folder: one registry per identity."""
        config = config.expanduser()
        return cls(config.with_name(f"{config.stem}.scratch.json"))

    def load(self) -> list[ScratchEntry]:
        """Entries on disk. An unreadable file is logged and read as empty: it can hold nothing
        the agent could use, and the next write replaces it."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("scratch registry unreadable", path=str(self.path), reason=str(exc))
            return []
        try:
            return _RegistryFile.model_validate_json(data).entries
        except ValidationError as exc:
            log.warning(
                "scratch registry is not valid; ignoring it",
                path=str(self.path),
                problems=exc.error_count(),
            )
            return []

    async def add(self, entry: ScratchEntry) -> None:
        def add() -> None:
            with self._lock:
                kept = [e for e in self.load() if e.scratch != entry.scratch]
                self._write([*kept, entry])

        await asyncio.to_thread(add)

    async def remove(self, scratch: str) -> None:
        def remove() -> None:
            with self._lock:
                entries = self.load()
                kept = [e for e in entries if e.scratch != scratch]
                if len(kept) != len(entries):
                    self._write(kept)

        await asyncio.to_thread(remove)

    def _write(self, entries: list[ScratchEntry]) -> None:
        body = _RegistryFile(entries=entries).model_dump(mode="json")
        write_private_atomic(self.path, json.dumps(body, indent=2) + "\n")
