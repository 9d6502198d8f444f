"""Which commands and requests this agent obeys (docs/security.md "Signed commands").

Every message from the API is signed with the API's command-signing key, which the agent pinned at
enrollment; the signature covers the subject and the body (`rahatback_contracts.signing`). On top
of the signature the agent checks the expiry the API wrote into the body (with a small allowance
for clock skew) and that it has not obeyed the same command id before: a replay cache of the ids
it accepted, kept until they expire in a 0600 file next to the identity, so a restart does not
reopen the window.

JetStream redelivers a command the agent did not acknowledge (an agent killed at the wrong moment).
That is the same stored message (same stream sequence), not a replay: a redelivery of a command
the agent had not accepted yet runs normally; one it had accepted is acknowledged without running
it twice. A second copy of a command under another stream sequence is a replay and is refused.

The cache is bounded. When it is full the entries closest to expiry are dropped and the latest
expiry dropped becomes a floor: an id expiring at or before the floor is refused as a possible
replay, since the cache can no longer tell (a replay carries the signed expiry of the original).
That only works between ids of one lifetime, so commands (6 h) and RPC requests (about a minute)
are kept apart, each with its own entries, bound and floor: commands filling the cache must not
push the floor hours ahead of every fresh request. Within one kind the API gives every id the same
lifetime, so a genuine new one expires after the floor.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AwareDatetime, BaseModel, Field, ValidationError
from rahatback_contracts import signing
from rahatback_contracts.messages import RefusalReason

from .identity import AgentIdentity
from .private_files import write_private_atomic

__all__ = [
    "CommandAuth",
    "CommandAuthError",
    "CommandRefusal",
    "IdKind",
    "ReplayCache",
    "describe_body",
    "replay_cache_path",
]

log = structlog.get_logger("rahatback_agent.command_auth")

RunKind = Literal["backup", "restore", "verify", "prune", "cancel", "rpc"]
# what an id belongs to: commands and requests have lifetimes hours apart, so they never share a floor
IdKind = Literal["command", "request"]
_KIND_BY_SUFFIX: dict[str, tuple[RunKind, str]] = {
    "job.execute": ("backup", "run_id"),
    "restore.execute": ("restore", "restore_id"),
    "verify.execute": ("verify", "verify_id"),
    "prune.execute": ("prune", "prune_id"),
    "job.cancel": ("cancel", "run_id"),
}


class CommandAuthError(Exception):
    """The agent cannot check commands (no pinned key, damaged replay cache): it must not start."""


class CommandRefusal(Exception):
    """This command or request is refused; nothing of it runs. The message says why."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: RefusalReason = reason
        self.detail = detail


@dataclass(frozen=True)
class BodyFacts:
    """What a body says about itself, read without trusting it (for logs and the refusal report)."""

    command_id: str | None = None
    run_kind: RunKind | None = None
    run_id: str | None = None


def describe_body(subject: str, body: bytes) -> BodyFacts:
    try:
        data = json.loads(body)
    except ValueError:
        return BodyFacts()
    if not isinstance(data, dict):
        return BodyFacts()

    def text(key: str) -> str | None:
        value = data.get(key)
        return value[:200] if isinstance(value, str) else None

    if ".rpc." in subject:
        return BodyFacts(command_id=text("request_id"), run_kind="rpc", run_id=None)
    suffix = subject.split(".", 2)[2] if subject.count(".") >= 2 else ""
    kind, id_field = _KIND_BY_SUFFIX.get(suffix, (None, ""))
    return BodyFacts(command_id=text("command_id"), run_kind=kind, run_id=text(id_field) if kind else None)


def replay_cache_path(config: Path) -> Path:
    """`agent.json` → `agent.commands.json` in the same folder: one cache per identity."""
    config = config.expanduser()
    return config.with_name(f"{config.stem}.commands.json")


class _Entry(BaseModel):
    expires_at: AwareDatetime
    # stream sequence of the JetStream message that carried it; None for a request (core NATS)
    seq: int | None = None


class _Section(BaseModel):
    """The ids of one kind: what the agent accepted, and the floor below which it forgot."""

    floor: AwareDatetime | None = None
    entries: dict[str, _Entry] = Field(default_factory=dict)

    def remembered(
        self, ident: str, entry: _Entry | None, now: datetime, max_entries: int, kind: IdKind
    ) -> _Section:
        """Expired ids pruned, `entry` added, and past `max_entries` the ids closest to expiry dropped."""
        entries = {k: v for k, v in self.entries.items() if v.expires_at >= now}
        if entry is not None:
            entries[ident] = entry
        floor = self.floor if self.floor is None or self.floor >= now else None
        if len(entries) > max_entries:
            by_expiry = sorted(entries.items(), key=lambda kv: kv[1].expires_at)
            dropped = by_expiry[: len(entries) - max_entries]
            latest = max(e.expires_at for _, e in dropped)
            floor = latest if floor is None else max(floor, latest)
            entries = dict(by_expiry[len(dropped) :])
            log.warning(
                "replay cache full; oldest entries dropped", kind=kind, dropped=len(dropped), floor=str(floor)
            )
        return _Section(floor=floor, entries=entries)


class _CacheFile(BaseModel):
    version: Literal[2] = 2
    commands: _Section = Field(default_factory=_Section)
    requests: _Section = Field(default_factory=_Section)

    def section(self, kind: IdKind) -> _Section:
        return self.commands if kind == "command" else self.requests


class _CacheFileV1(BaseModel):
    """Before commands and requests were kept apart: one floor for both."""

    version: Literal[1] = 1
    floor: AwareDatetime | None = None
    entries: dict[str, _Entry] = Field(default_factory=dict)

    def upgraded(self) -> _CacheFile:
        # a request never came through JetStream, so it has no stream sequence. Which kind the one
        # floor came from is unknown: it applies to both until it passes (refusing too much for at
        # most a command lifetime, never accepting a replay)
        commands = {k: v for k, v in self.entries.items() if v.seq is not None}
        requests = {k: v for k, v in self.entries.items() if v.seq is None}
        return _CacheFile(
            commands=_Section(floor=self.floor, entries=commands),
            requests=_Section(floor=self.floor, entries=requests),
        )


class ReplayCache:
    """The ids this agent accepted, persisted; `max_entries` bounds each kind (commands, requests)."""

    def __init__(self, path: Path, max_entries: int = 10_000) -> None:
        self.path = path.expanduser()
        self.max_entries = max_entries
        self._data = self._load()

    def _load(self) -> _CacheFile:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return _CacheFile()
        except OSError as exc:
            raise CommandAuthError(f"cannot read the replay cache {self.path}: {exc}") from None
        try:
            return _CacheFile.model_validate_json(raw)
        except ValidationError:
            pass
        try:
            return _CacheFileV1.model_validate_json(raw).upgraded()
        except ValidationError:
            # starting with an empty cache would let every command this agent ran in the last
            # hours run again if someone replayed it: a person decides, not the agent
            raise CommandAuthError(
                f"the replay cache {self.path} is damaged; move it away to start the agent (commands it "
                "already ran could then be replayed until they expire: check that nobody else can "
                "publish to this agent's command subjects)"
            ) from None

    def floor(self, kind: IdKind = "command") -> datetime | None:
        return self._data.section(kind).floor

    def __len__(self) -> int:
        return len(self._data.commands.entries) + len(self._data.requests.entries)

    def seen(self, ident: str, kind: IdKind = "command") -> _Entry | None:
        return self._data.section(kind).entries.get(ident)

    def remember(
        self, ident: str, expires_at: datetime, seq: int | None, now: datetime, kind: IdKind = "command"
    ) -> None:
        """Record an accepted id and persist it before the caller acts on the command."""
        entry = _Entry(expires_at=expires_at, seq=seq)
        self._data = _CacheFile(
            commands=self._data.commands.remembered(
                ident, entry if kind == "command" else None, now, self.max_entries, "command"
            ),
            requests=self._data.requests.remembered(
                ident, entry if kind == "request" else None, now, self.max_entries, "request"
            ),
        )
        write_private_atomic(self.path, self._data.model_dump_json())


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


class CommandAuth:
    def __init__(
        self,
        trusted: Mapping[str, Ed25519PublicKey],
        cache: ReplayCache,
        clock_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        self.trusted = dict(trusted)
        self.cache = cache
        self.clock_skew = clock_skew

    @classmethod
    def for_identity(
        cls, identity: AgentIdentity, config: Path, *, clock_skew_seconds: float, max_entries: int
    ) -> CommandAuth:
        if not identity.command_key_id or not identity.command_public_key_b64:
            raise CommandAuthError(
                f"{config} was enrolled before the API signed its commands and pins no command-signing "
                "key, so this agent cannot tell the API's commands from forged ones. Re-enroll it: create "
                "an enrollment token and run `rahatback-agent enroll --api URL --token TOKEN --force` "
                "(docs/security.md, 'Agents enrolled before signed commands')"
            )
        try:
            key = signing.decode_public_key(identity.command_public_key_b64)
        except ValueError as exc:
            raise CommandAuthError(f"{config}: the pinned command-signing key is unusable: {exc}") from None
        return cls(
            {identity.command_key_id: key},
            ReplayCache(replay_cache_path(config), max_entries),
            timedelta(seconds=clock_skew_seconds),
        )

    def check_signature(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        header = (headers or {}).get(signing.SIGNATURE_HEADER)
        try:
            signing.verify(self.trusted, subject, body, header)
        except signing.SignatureError as exc:
            raise CommandRefusal(exc.problem, str(exc)) from None

    def check_fresh(
        self,
        ident: str,
        expires_at: datetime,
        seq: int | None,
        now: datetime | None = None,
        *,
        kind: IdKind = "command",
    ) -> Literal["new", "redelivered"]:
        """After the signature: is this id still valid and not obeyed before? `redelivered`: the same
        JetStream message the agent already accepted (acknowledge it, run nothing)."""
        now = now or datetime.now(UTC)
        if now > expires_at + self.clock_skew:
            raise CommandRefusal(
                "expired", f"expired at {expires_at.isoformat()} ({_ago(now - expires_at)} ago)"
            )
        entry = self.cache.seen(ident, kind)
        if entry is not None:
            if seq is not None and entry.seq == seq:
                return "redelivered"
            raise CommandRefusal("replayed", f"id {ident} was already accepted once: a replay")
        floor = self.cache.floor(kind)
        if floor is not None and expires_at <= floor:
            raise CommandRefusal(
                "replayed",
                f"id {ident} expires before {floor.isoformat()}, older than the replay cache remembers",
            )
        return "new"

    def accept(
        self,
        ident: str,
        expires_at: datetime,
        seq: int | None,
        now: datetime | None = None,
        *,
        kind: IdKind = "command",
    ) -> None:
        """Remember an id as obeyed, on disk, before acting on it."""
        self.cache.remember(ident, expires_at, seq, now or datetime.now(UTC), kind)

    def check_request(self, subject: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        """A core request/reply RPC: signed, unexpired, never seen; accepted (remembered) here."""
        self.check_signature(subject, body, headers)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        ident = data.get("request_id") if isinstance(data, dict) else None
        expires_at = _parse_time(data.get("expires_at")) if isinstance(data, dict) else None
        if not isinstance(ident, str) or expires_at is None:
            raise CommandRefusal("expired", "the request carries no request id or expiry")
        self.check_fresh(ident, expires_at, None, kind="request")
        self.accept(ident, expires_at, None, kind="request")


def _ago(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"
