"""Verify a backup: integrity (download, authenticate every chunk, decompress, both SHA-256s) and test
restores into a scratch database whose row counts are compared with the manifest's.

A failed check (damaged, truncated or missing artifact, missing manifest, wrong key, a dump that does
not load, rows that differ) is a completed verification with ok=False and an error naming it; only
not being able to run at all (storage or scratch server unreachable, a refused CREATE DATABASE, no
key in the command) is a failed one. Levels, scratch names, the cleanup rule and each engine's
limits: docs/verification.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import ValidationError
from rahatback_contracts.messages import (
    DatabaseTarget,
    Stage,
    TableCheck,
    VerifyCommand,
    VerifyCompleted,
    VerifyFailed,
    seal_info,
)

from . import tools
from .artifact import ArtifactError
from .engines.base import Connection, Engine, EngineError, ScratchDatabases
from .jobs import ProgressState, _as_str_secrets, _report_failure, _scrub, describe_error, get_engine
from .keyring import Keyring, artifact_key_lookup
from .pipeline import Manifest, StreamDigests, manifest_key, restore_stream
from .scratch_registry import ScratchEntry, ScratchRegistry
from .sealing import open_optional
from .storages.base import Storage, StorageError
from .storages.registry import get_storage

__all__ = [
    "SCRATCH_PREFIX",
    "drop_registered_leftovers",
    "run_verify",
    "scratch_name",
    "scratch_prefix",
    "sweep_local_leftovers",
]

log = structlog.get_logger("rahatback_agent.verification")

# `rbk_` because DBAs grant the agent CREATE/DROP on `rbk\_%` for restores already (docs/mysql-dumps.md)
SCRATCH_PREFIX = "rbk_verify_"
# engine errors that mean "could not run here", not "this backup does not restore"
_CANNOT_RUN = frozenset(
    {"unreachable", "auth_failed", "timeout", "tool_missing", "tool_too_old", "bad_settings"}
)
_MISMATCHES_NAMED = 5
_HASH_BLOCK = 1 << 20

# scratch databases this process is using right now: the leftover sweep never touches these
_active: set[str] = set()
# registered leftovers the start-up cleanup is dropping: a redelivered verification with the same
# verify id (hence the same scratch name) waits for it before creating its own
_cleaning: dict[str, asyncio.Event] = {}


def scratch_prefix(agent_id: str) -> str:
    """Every scratch database of one agent starts with this: an agent only ever drops its own."""
    return f"{SCRATCH_PREFIX}{re.sub(r'[^0-9a-f]', '', agent_id.lower())[:8]}_"


def scratch_name(agent_id: str, verify_id: str) -> str:
    """`rbk_verify_<8 hex of the agent id>_<12 hex of the verify id>`: lower case, 32 characters,
    valid unquoted in every engine and far from any name a person gives a database."""
    hexits = re.sub(r"[^0-9a-f]", "", verify_id.lower())
    tag = hexits[:12] if len(hexits) >= 12 else hashlib.sha256(verify_id.encode()).hexdigest()[:12]
    return scratch_prefix(agent_id) + tag


def _now() -> datetime:
    return datetime.now(UTC)


class _Findings:
    """What the checks found, in the order a person should read it."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.artifact_ok: bool | None = None
        self.dump_ok: bool | None = None
        self.tables_compared = 0
        self.mismatches: list[TableCheck] = []

    def add(self, problem: str) -> None:
        self.problems.append(problem)


async def run_verify(
    cmd: VerifyCommand,
    *,
    agent_id: str,
    private_key: X25519PrivateKey,
    progress: ProgressState,
    registry: ScratchRegistry | None = None,
    keyring: Keyring | None = None,
) -> VerifyCompleted | VerifyFailed:
    """`registry`: where scratch databases are recorded while they exist, so that a killed agent
    drops them at its next start; the supervisor always passes its own."""
    started_at = _now()
    secret_sets: list[dict[str, Any]] = []
    stage: Stage = "queued"

    def set_stage(new: Stage) -> None:
        nonlocal stage
        stage = new
        progress.stage = new

    with structlog.contextvars.bound_contextvars(verify_id=cmd.verify_id, agent_id=agent_id):
        try:
            info = seal_info("verify", cmd.verify_id)
            storage_secrets = open_optional(private_key, cmd.storage.secrets, info)
            secret_sets.append(storage_secrets)
            job_key = artifact_key_lookup(
                cmd.encryption, cmd.encrypted, "verify", private_key=private_key, info=info, keyring=keyring
            )
            scratch: _ScratchServer | None = None
            if cmd.level == "test_restore":
                scratch = _scratch_server(cmd, private_key, info)
                secret_sets.append(scratch.conn.secrets)
            storage = get_storage(cmd.storage, storage_secrets)
            log.info("verification starting", level=cmd.level, storage_key=cmd.storage_key)

            set_stage("downloading")
            findings = _Findings()
            manifest = await _read_manifest(storage, cmd, findings)
            expected = _expected_checksums(cmd, manifest)
            digests = StreamDigests()

            def stream() -> AsyncGenerator[bytes, None]:
                return restore_stream(
                    storage.read(cmd.storage_key),
                    compression=cmd.compression,
                    job_key_lookup=job_key,
                    on_progress=progress.update,
                    digests=digests,
                )

            if scratch is None:
                set_stage("verifying")
                await _check_integrity(stream, cmd.storage_key, findings)
            else:
                await _test_restore(scratch, stream, cmd, agent_id, manifest, findings, set_stage, registry)
            set_stage("verifying")
            await _compare_checksums(storage, cmd.storage_key, digests, expected, findings)

            finished_at = _now()
            error = _scrub("; ".join(findings.problems), *secret_sets) if findings.problems else None
            log.info(
                "verification done",
                ok=error is None,
                tables_compared=findings.tables_compared,
                mismatches=len(findings.mismatches),
                error=error,
            )
            return VerifyCompleted(
                agent_id=agent_id,
                occurred_at=finished_at,
                verify_id=cmd.verify_id,
                level=cmd.level,
                ok=error is None,
                started_at=started_at,
                finished_at=finished_at,
                artifact_sha256_ok=findings.artifact_ok,
                dump_sha256_ok=findings.dump_ok,
                tables_compared=findings.tables_compared,
                mismatches=findings.mismatches,
                error=error,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _report_failure("verify", exc, stage, *secret_sets)
            return VerifyFailed(
                agent_id=agent_id, occurred_at=_now(), verify_id=cmd.verify_id, stage=stage, error=error
            )


# ---------------------------------------------------------------- manifest and checksums


async def _read_manifest(storage: Storage, cmd: VerifyCommand, findings: _Findings) -> Manifest | None:
    key = cmd.manifest_key or manifest_key(cmd.storage_key)
    try:
        data = await storage.get_bytes(key)
    except StorageError as exc:
        if exc.code != "not_found":
            raise  # the storage itself failed: the verification cannot run
        await _storage_reachable(storage, key)
        findings.add(f"manifest missing at {key}")
        return None
    try:
        manifest = Manifest.from_json(data)
    except ValidationError as exc:
        findings.add(f"manifest at {key} is unreadable ({exc.error_count()} invalid field(s))")
        return None
    if manifest.run_id != cmd.backup_run_id:
        findings.add(f"manifest at {key} belongs to run {manifest.run_id}, not to run {cmd.backup_run_id}")
    return manifest


async def _storage_reachable(storage: Storage, key: str) -> None:
    """Raise StorageError unless the storage answers a listing: a folder that is not mounted (or a
    bucket that is gone) says "not found" for every key, and is no verdict on the backup."""
    folder = key.rpartition("/")[0]
    listing = storage.list(f"{folder}/" if folder else "")
    try:
        async for _ in listing:
            break
    finally:
        aclose = getattr(listing, "aclose", None)
        if aclose is not None:
            await aclose()


def _expected_checksums(cmd: VerifyCommand, manifest: Manifest | None) -> dict[str, list[tuple[str, str]]]:
    """Per checksum, every (value, who recorded it) known: the control plane's and the manifest's."""
    expected: dict[str, list[tuple[str, str]]] = {"artifact": [], "dump": []}
    for kind, recorded, in_manifest in (
        ("artifact", cmd.artifact_sha256, manifest.artifact_sha256 if manifest else None),
        ("dump", cmd.dump_sha256, manifest.dump_sha256 if manifest else None),
    ):
        if recorded:
            expected[kind].append((recorded.lower(), "the control plane recorded"))
        if in_manifest:
            expected[kind].append((in_manifest.lower(), "the manifest records"))
    return expected


async def _compare_checksums(
    storage: Storage,
    key: str,
    digests: StreamDigests,
    expected: dict[str, list[tuple[str, str]]],
    findings: _Findings,
) -> None:
    artifact = digests.artifact_sha256
    if artifact is None and expected["artifact"]:
        # the stream stopped early (damage, wrong key, a dump that does not load): the artifact's
        # own checksum still tells a damaged file from an intact one
        artifact = await _artifact_sha256(storage, key)
    for kind, found in (("artifact", artifact), ("dump", digests.dump_sha256)):
        if found is None or not expected[kind]:
            continue
        wrong = [who for value, who in expected[kind] if value != found]
        ok = not wrong
        if kind == "artifact":
            findings.artifact_ok = ok
        else:
            findings.dump_ok = ok
        if wrong:
            what = "the artifact's" if kind == "artifact" else "the restored dump's"
            findings.add(f"{kind} checksum mismatch: {what} SHA-256 is not the one {' nor '.join(wrong)}")


async def _artifact_sha256(storage: Storage, key: str) -> str | None:
    digest = hashlib.sha256()
    try:
        async for block in storage.read(key):
            if len(block) >= _HASH_BLOCK:
                await asyncio.to_thread(digest.update, block)  # hashlib lets go of the GIL meanwhile
            else:
                digest.update(block)
    except StorageError:
        return None
    return digest.hexdigest()


def _artifact_problem(exc: Exception, key: str) -> str | None:
    """The check that failed, if `exc` is a verdict on the backup rather than a failure to run."""
    if isinstance(exc, ArtifactError):
        return str(exc)
    if isinstance(exc, StorageError) and exc.code == "not_found":
        return f"artifact missing at {key}"
    return None


_Stream = Callable[[], AsyncGenerator[bytes, None]]


async def _check_integrity(stream: _Stream, key: str, findings: _Findings) -> None:
    try:
        async with contextlib.aclosing(stream()) as chunks:
            async for _ in chunks:  # decoded and authenticated, then dropped: memory stays bounded
                pass
    except (ArtifactError, StorageError) as exc:
        if (problem := _artifact_problem(exc, key)) is None:
            raise
        findings.add(problem)


# ---------------------------------------------------------------- test restores


class _ScratchServer:
    def __init__(self, target: DatabaseTarget, engine: Engine, conn: Connection) -> None:
        self.target = target
        self.engine = engine
        self.conn = conn

    @property
    def scratch(self) -> ScratchDatabases:
        assert isinstance(self.engine, ScratchDatabases)
        return self.engine


def _scratch_server(cmd: VerifyCommand, private_key: X25519PrivateKey, info: str) -> _ScratchServer:
    if cmd.database is None:
        raise EngineError(
            "bad_settings", "a test restore needs the backed-up database's connection; the command has none"
        )
    target = cmd.scratch_server or cmd.database
    if target.engine != cmd.database.engine:
        raise EngineError(
            "bad_settings",
            f"the scratch server is a {target.engine} server but the backup is of a {cmd.database.engine}"
            " database",
        )
    engine = get_engine(target.engine)
    if not isinstance(engine, ScratchDatabases):
        raise EngineError(
            "bad_settings",
            f"test restores of {engine.name} databases are not supported yet; verify their integrity instead",
        )
    secrets = open_optional(private_key, target.secrets, info)
    return _ScratchServer(target, engine, Connection(dict(target.settings), _as_str_secrets(secrets)))


async def _test_restore(
    server: _ScratchServer,
    stream: _Stream,
    cmd: VerifyCommand,
    agent_id: str,
    manifest: Manifest | None,
    findings: _Findings,
    set_stage: Callable[[Stage], None],
    registry: ScratchRegistry | None,
) -> None:
    engine, scratch = server.engine, server.scratch
    if engine.tools:  # the restore tool must suit the server before anything is created on it
        await tools.ensure_tools(engine, "restore", await engine.test(server.conn))
    name = scratch_name(agent_id, cmd.verify_id)
    if (cleaning := _cleaning.get(name)) is not None:
        await cleaning.wait()  # bounded: each start-up drop has a timeout
    await _drop_leftovers(scratch, server.conn, agent_id, registry)
    if registry is not None:
        # on disk before it exists: if the agent is killed from here on, its next start drops it
        entry = ScratchEntry(
            verify_id=cmd.verify_id,
            scratch=name,
            engine=server.target.engine,
            server=server.target,
            created_at=_now(),
        )
        await registry.add(entry)
    # registered before it exists: another verification's sweep never drops it
    _active.add(name)
    try:
        set_stage("restoring")
        scratch_conn = await scratch.create_scratch(server.conn, name)
        log.info("scratch database created", scratch=name)
        try:
            async with contextlib.aclosing(stream()) as chunks:
                await engine.restore(scratch_conn, chunks)
        except (ArtifactError, StorageError, EngineError) as exc:
            if isinstance(exc, EngineError):
                if exc.code in _CANNOT_RUN:
                    raise
                findings.add(f"the backup does not restore: {exc.message}")
            elif (problem := _artifact_problem(exc, cmd.storage_key)) is None:
                raise
            else:
                findings.add(problem)
            return
        set_stage("verifying")
        found = await scratch.count_rows(scratch_conn)
        _compare_rows(manifest, found, findings)
        for problem in await scratch.check_restored(scratch_conn):
            findings.add(problem)
    finally:
        # in every case, cancellation included: the drop runs to its end even if we are cancelled
        await asyncio.shield(_drop_scratch(scratch, server.conn, name, registry))


async def _drop_scratch(
    scratch: ScratchDatabases, conn: Connection, name: str, registry: ScratchRegistry | None
) -> None:
    try:
        await scratch.drop_scratch(conn, name)
        log.info("scratch database dropped", scratch=name)
    except Exception as exc:
        log.warning(
            "scratch database not dropped; the agent's next start or next test restore on this "
            "server drops it",
            scratch=name,
            reason=_scrub(describe_error(exc), conn.secrets),
        )
        return
    finally:
        _active.discard(name)
    if registry is not None:
        try:
            await registry.remove(name)
        except OSError as exc:  # the next start finds it gone: DROP … IF EXISTS, then forgets it
            log.warning("dropped scratch database still in the registry", scratch=name, reason=str(exc))


async def _drop_leftovers(
    scratch: ScratchDatabases, conn: Connection, agent_id: str, registry: ScratchRegistry | None = None
) -> None:
    """Scratch databases of this agent that no running verification uses are leftovers of an agent
    that was killed mid-way: drop them before making a new one (docs/verification.md)."""
    try:
        names = await scratch.list_scratch(conn, scratch_prefix(agent_id))
    except Exception as exc:
        log.warning("cannot list leftover scratch databases", reason=describe_error(exc))
        return
    for name in names:
        if name not in _active:
            log.info("dropping a leftover scratch database", scratch=name)
            await _drop_scratch(scratch, conn, name, registry)


def _compare_rows(manifest: Manifest | None, found: dict[str, int], findings: _Findings) -> None:
    if manifest is None or manifest.tables is None:
        # a backup made before row counts were recorded: it restored, nothing to compare with
        log.info("no row counts in the manifest; restorability checked only", tables_found=len(found))
        return
    expected = manifest.tables
    names = sorted(set(expected) | set(found))
    findings.tables_compared = len(names)
    findings.mismatches = [
        TableCheck(table=name, expected=expected.get(name), found=found.get(name))
        for name in names
        if expected.get(name) != found.get(name)
    ]
    if findings.mismatches:

        def describe(check: TableCheck) -> str:
            if check.found is None:
                return f"{check.table} (expected {check.expected} rows, table missing)"
            if check.expected is None:
                return f"{check.table} (not in the manifest, found {check.found} rows)"
            return f"{check.table} (expected {check.expected} rows, found {check.found})"

        named = ", ".join(describe(check) for check in findings.mismatches[:_MISMATCHES_NAMED])
        more = len(findings.mismatches) - _MISMATCHES_NAMED
        findings.add(
            f"row counts differ from the manifest in {len(findings.mismatches)} of {len(names)} tables: "
            + named
            + (f" and {more} more" if more > 0 else "")
        )


async def sweep_local_leftovers(agent_id: str) -> None:
    """At start-up: scratch databases kept on this host (SQLite's, in the temp dir) need no
    credentials to remove, and no verification of this agent is running yet."""
    try:
        engine = get_engine("sqlite")
    except EngineError:
        return
    if isinstance(engine, ScratchDatabases):
        await _drop_leftovers(engine, Connection(settings={}), agent_id)


async def drop_registered_leftovers(
    registry: ScratchRegistry, *, agent_id: str, private_key: X25519PrivateKey, timeout_seconds: float
) -> None:
    """At start-up: drop every scratch database the registry says a previous run of this agent
    created and never dropped (killed mid-way). The server's secrets are reopened from the sealed
    blob kept in the entry. A drop that fails (server unreachable, password changed, too slow) keeps
    its entry for the next start; all entries are tried at once, each within `timeout_seconds`.
    Never raises: a leftover must not keep the agent from starting."""
    entries = registry.load()  # before the first await: no command can start before this ran
    for entry in entries:
        _cleaning.setdefault(entry.scratch, asyncio.Event())
    if entries:
        log.info("dropping scratch databases left by a previous run", count=len(entries))
    await asyncio.gather(
        *(_drop_registered(registry, entry, agent_id, private_key, timeout_seconds) for entry in entries)
    )


async def _drop_registered(
    registry: ScratchRegistry,
    entry: ScratchEntry,
    agent_id: str,
    private_key: X25519PrivateKey,
    timeout_seconds: float,
) -> None:
    name = entry.scratch
    secrets: dict[str, Any] = {}
    try:
        with structlog.contextvars.bound_contextvars(verify_id=entry.verify_id, scratch=name):
            if not name.startswith(scratch_prefix(agent_id)):
                # another identity's (the agent was re-enrolled): its key cannot open the secrets,
                # and an agent only ever drops its own scratch databases
                log.warning("registered scratch database is not this agent's; drop it by hand")
                await registry.remove(name)
                return
            if name in _active:
                return
            try:
                engine = get_engine(entry.engine)
                if not isinstance(engine, ScratchDatabases):
                    raise EngineError("bad_settings", f"{entry.engine} has no scratch databases")
                info = seal_info("verify", entry.verify_id)
                secrets = open_optional(private_key, entry.server.secrets, info)
                conn = Connection(dict(entry.server.settings), _as_str_secrets(secrets))
                await asyncio.wait_for(engine.drop_scratch(conn, name), timeout_seconds)
                await registry.remove(name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = (
                    f"no answer within {timeout_seconds:g} s"
                    if isinstance(exc, TimeoutError)
                    else _scrub(describe_error(exc), secrets)
                )
                log.warning(
                    "leftover scratch database not dropped; trying again at the next start",
                    engine=entry.engine,
                    reason=reason,
                )
                return
            log.info("leftover scratch database dropped", engine=entry.engine)
    finally:
        if (cleaning := _cleaning.pop(name, None)) is not None:
            cleaning.set()
