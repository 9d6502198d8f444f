"""Backup, restore and prune orchestration, and the two connection-test RPCs.

Thin on purpose: secrets are opened here, the engine and storage are picked here, and the bytes are
moved by `pipeline`. Every function returns the report to send; only cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_contracts.messages import (
    BackupCommand,
    BackupCompleted,
    BackupFailed,
    CopyResult,
    DbListReply,
    DbListRequest,
    DbTestReply,
    DbTestRequest,
    PruneCommand,
    PruneCompleted,
    PruneFailed,
    PruneFailure,
    RestoreCommand,
    RestoreCompleted,
    RestoreFailed,
    Stage,
    StorageTarget,
    StorageTestReply,
    StorageTestRequest,
    VerifyCommand,
    VerifyCompleted,
    VerifyFailed,
    seal_info,
)
from rahatback_contracts.messages import Engine as EngineName

from . import __version__, tools
from .artifact import ArtifactError
from .engines.base import Connection, Engine, EngineError, TableCounts
from .keyring import Keyring, KeyringError, artifact_key_lookup, job_key_for
from .scratch_registry import ScratchRegistry
from .sealing import SealingError, open_optional
from .storages.base import ArtifactWriter, Storage, StorageError
from .storages.fanout import Copy, FanOutWriter
from .storages.registry import SUPPORTED_KINDS, get_storage

log = structlog.get_logger("rahatback_agent.jobs")

# below the API's wait for the reply (20 s), so the user sees this cause rather than a timeout
DB_TEST_TIMEOUT_SECONDS = 15.0
STORAGE_TEST_TIMEOUT_SECONDS = 60.0


@dataclass
class ProgressState:
    """Latest counters of one running job; the supervisor turns them into throttled Progress messages.
    Written by pipeline callbacks (possibly from a worker thread): plain int stores only."""

    kind: Literal["backup", "restore", "verify"]
    run_id: str
    stage: Stage = "queued"
    bytes_in: int = 0
    bytes_out: int = 0

    def update(self, bytes_in: int, bytes_out: int) -> None:
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out


# ---------------------------------------------------------------- helpers


def get_engine(name: str) -> Engine:
    from .engines.registry import get_engine as registry_get_engine

    try:
        return registry_get_engine(name)
    except EngineError:
        raise
    except Exception:
        raise EngineError("bad_settings", f"this agent does not support {name!r} databases") from None


def supported_engines() -> list[EngineName]:
    found: list[EngineName] = []
    for name in typing.get_args(EngineName):
        try:
            get_engine(name)
        except Exception:  # noqa: S112 - an engine this build does not have is simply not advertised
            continue
        found.append(name)
    return found


def supported_storages() -> list[Literal["local", "s3", "gdrive"]]:
    return [kind for kind in ("local", "s3", "gdrive") if kind in SUPPORTED_KINDS]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_segment(value: str, fallback: str) -> str:
    cleaned = _UNSAFE.sub("_", value).strip("._")
    return cleaned or fallback


def build_storage_key(
    *,
    prefix: str | None,
    database_name: str,
    run_id: str,
    when: datetime,
    dump_extension: str,
    artifact_extension: str,
) -> str:
    """`<prefix>/<db>/<YYYY>/<MM>/<DD>/<db>_<UTC ts>_<run id>.<dump ext><artifact ext>` (DESIGN.md).
    UTC, so names sort the same wherever the agent runs."""
    when = when.astimezone(UTC)
    db = sanitize_segment(database_name, "database")
    parts = [p for p in (prefix or "").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageError("bad_settings", f"storage prefix {prefix!r} must not contain '.' or '..' segments")
    name = f"{db}_{when:%Y%m%dT%H%M%SZ}_{sanitize_segment(run_id, 'run')}.{dump_extension.lstrip('.')}"
    return "/".join([*parts, db, f"{when:%Y}", f"{when:%m}", f"{when:%d}", name + artifact_extension])


def _as_str_secrets(secrets: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else str(v) for k, v in secrets.items() if v is not None}


def _scrub(message: str, *secret_sets: dict[str, Any]) -> str:
    """A last line of defence: an error text that somehow quotes a secret never leaves the agent."""
    for secrets in secret_sets:
        for value in secrets.values():
            if isinstance(value, str) and len(value) >= 4 and value in message:
                message = message.replace(value, "***")
    return message


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, EngineError | StorageError):
        return exc.message
    if isinstance(exc, SealingError | ArtifactError | KeyringError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"unexpected {type(exc).__name__}: {exc}"


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- backup


async def run_backup(
    cmd: BackupCommand,
    *,
    agent_id: str,
    private_key: X25519PrivateKey,
    progress: ProgressState,
    keyring: Keyring | None = None,
) -> BackupCompleted | BackupFailed:
    from .pipeline import Manifest, artifact_extension, manifest_key, run_backup_pipeline

    started_at = _now()
    bound = structlog.contextvars.bound_contextvars(run_id=cmd.run_id, agent_id=agent_id)
    db_secrets: dict[str, Any] = {}
    storage_secrets: list[dict[str, Any]] = []
    stage: Stage = "queued"

    def set_stage(new: Stage) -> None:
        nonlocal stage
        stage = new
        progress.stage = new

    with bound:
        try:
            info = seal_info("run", cmd.run_id)
            db_secrets = open_optional(private_key, cmd.database.secrets, info)
            targets = [cmd.storage, *cmd.extra_storages]
            storage_secrets = [open_optional(private_key, t.secrets, info) for t in targets]
            job_key: bytes | None = None
            key_id: str | None = None
            if cmd.encryption.enabled:
                found = job_key_for(cmd.encryption, private_key=private_key, info=info, keyring=keyring)
                if found is None:
                    raise SealingError(
                        "encryption is enabled for this job but the command carries no job key"
                    )
                job_key, key_id = found

            set_stage("dumping")
            engine = get_engine(cmd.database.engine)
            conn = Connection(settings=dict(cmd.database.settings), secrets=_as_str_secrets(db_secrets))
            server_version = await engine.test(conn)
            await tools.ensure_tools(engine, "dump", server_version)

            copies = [
                _BackupCopy(
                    target,
                    build_storage_key(
                        prefix=str(target.settings.get("prefix") or ""),
                        database_name=cmd.database.name,
                        run_id=cmd.run_id,
                        when=started_at,
                        dump_extension=engine.dump_extension,
                        artifact_extension=artifact_extension(cmd.compression, job_key is not None),
                    ),
                )
                for target in targets
            ]
            log.info("backup starting", storage_keys=[c.key for c in copies], engine=engine.name)
            counts = TableCounts()
            async with engine.dump(conn, counts) as source:
                writer = FanOutWriter(
                    [await c.open(secrets) for c, secrets in zip(copies, storage_secrets, strict=True)],
                    describe=lambda exc: _scrub(describe_error(exc), db_secrets, *storage_secrets),
                )
                try:
                    result = await run_backup_pipeline(
                        source,
                        writer,
                        compression=cmd.compression,
                        level=cmd.compression_level,
                        job_key=job_key,
                        key_id=key_id,
                        on_progress=progress.update,
                    )
                    set_stage("finalizing")
                    await writer.commit()
                except BaseException:
                    await asyncio.shield(writer.abort())
                    raise

            finished_at = _now()
            manifest = Manifest(
                run_id=cmd.run_id,
                engine=engine.name,
                server_version=server_version,
                dump_format=engine.dump_format,
                compression=cmd.compression,
                encrypted=job_key is not None,
                key_id=key_id,
                dump_size=result.dump_size,
                artifact_size=result.artifact_size,
                dump_sha256=result.dump_sha256,
                artifact_sha256=result.artifact_sha256,
                agent_version=__version__,
                created_at=finished_at,
                database_name=cmd.database.name,
                tables=counts.tables,
            )
            # written only once the artifact is committed: a manifest always describes a real artifact
            for copy, fanned in zip(copies, writer.copies, strict=True):
                if fanned.committed:
                    await copy.write_manifest(manifest.to_json(), manifest_key(copy.key))
                else:
                    copy.error = fanned.error or "not written"
            done = [c for c in copies if c.error is None]
            if not done:
                raise StorageError("all_copies_failed", writer.summary())
            log.info(
                "backup completed",
                storage_keys=[c.key for c in done],
                failed_copies=len(copies) - len(done),
                artifact_size=result.artifact_size,
            )
            return BackupCompleted(
                agent_id=agent_id,
                occurred_at=finished_at,
                run_id=cmd.run_id,
                started_at=started_at,
                finished_at=finished_at,
                storage_key=done[0].key,
                manifest_key=manifest_key(done[0].key),
                dump_size=result.dump_size,
                artifact_size=result.artifact_size,
                dump_sha256=result.dump_sha256,
                artifact_sha256=result.artifact_sha256,
                server_version=server_version,
                dump_format=engine.dump_format,
                agent_version=__version__,
                copies=[c.result(manifest_key(c.key)) for c in copies],
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _report_failure("backup", exc, stage, db_secrets, *storage_secrets)
            return BackupFailed(
                agent_id=agent_id, occurred_at=_now(), run_id=cmd.run_id, stage=stage, error=error
            )


class _BackupCopy:
    """One target storage of a backup: its key, and what became of the copy."""

    def __init__(self, target: StorageTarget, key: str) -> None:
        self.target = target
        self.key = key
        self.storage: Storage | None = None
        self.error: str | None = None

    async def open(self, secrets: dict[str, Any]) -> Copy:
        """The copy's writer; a storage that cannot even be opened fails only this copy."""
        try:
            self.storage = get_storage(self.target, secrets)
            writer: ArtifactWriter = await self.storage.open_writer(self.key)
        except StorageError as exc:
            self.error = _scrub(exc.message, secrets)
            return Copy(self.target.name, _NoWriter(), error=self.error)
        return Copy(self.target.name, writer)

    async def write_manifest(self, data: bytes, key: str) -> None:
        assert self.storage is not None
        try:
            await self.storage.put_bytes(key, data)
        except StorageError as exc:
            # an artifact without its manifest is not a usable copy: remove it, report the copy failed
            self.error = f"writing the manifest failed: {exc.message}"
            with contextlib.suppress(StorageError):
                await self.storage.delete(self.key)

    def result(self, manifest_at: str) -> CopyResult:
        if self.error is not None:
            return CopyResult(storage_id=self.target.storage_id, ok=False, error=self.error)
        return CopyResult(
            storage_id=self.target.storage_id, ok=True, storage_key=self.key, manifest_key=manifest_at
        )


class _NoWriter:
    """Stands in for a copy whose storage could not be opened (FanOutWriter skips failed copies)."""

    async def write(self, data: bytes) -> None:  # pragma: no cover - never called for a failed copy
        raise AssertionError("write to a failed copy")

    async def commit(self) -> None:  # pragma: no cover
        raise AssertionError("commit of a failed copy")

    async def abort(self) -> None:
        return None


def _report_failure(kind: str, exc: Exception, stage: Stage, *secrets: dict[str, Any]) -> str:
    """The user-facing error of a failed run, scrubbed of secrets, logged as expected or not."""
    error = _scrub(describe_error(exc), *secrets)
    if isinstance(exc, EngineError | StorageError | SealingError | ArtifactError | KeyringError):
        log.warning(f"{kind} failed", stage=stage, error=error)
    else:
        log.error(f"{kind} failed unexpectedly", stage=stage, error=error, error_type=type(exc).__name__)
    return error


# ---------------------------------------------------------------- restore


async def run_restore(
    cmd: RestoreCommand,
    *,
    agent_id: str,
    private_key: X25519PrivateKey,
    progress: ProgressState,
    keyring: Keyring | None = None,
) -> RestoreCompleted | RestoreFailed:
    from .pipeline import restore_stream

    started_at = _now()
    db_secrets: dict[str, Any] = {}
    storage_secrets: dict[str, Any] = {}
    stage: Stage = "queued"

    def set_stage(new: Stage) -> None:
        nonlocal stage
        stage = new
        progress.stage = new

    with structlog.contextvars.bound_contextvars(restore_id=cmd.restore_id, agent_id=agent_id):
        try:
            info = seal_info("restore", cmd.restore_id)
            db_secrets = open_optional(private_key, cmd.database.secrets, info)
            storage_secrets = open_optional(private_key, cmd.storage.secrets, info)
            job_key = artifact_key_lookup(
                cmd.encryption, cmd.encrypted, "restore", private_key=private_key, info=info, keyring=keyring
            )

            set_stage("downloading")
            engine = get_engine(cmd.database.engine)
            conn = Connection(settings=dict(cmd.database.settings), secrets=_as_str_secrets(db_secrets))
            # no connection test first: a restore may create its target (a new SQLite file), and the
            # engine's restore reports an unreachable or refused target just as clearly; except where
            # a restore tool must suit the server, which is asked its version before any download
            if engine.tools:
                await tools.ensure_tools(engine, "restore", await engine.test(conn))
            storage = get_storage(cmd.storage, storage_secrets)
            log.info("restore starting", storage_key=cmd.storage_key, engine=engine.name)

            chunks = restore_stream(
                storage.read(cmd.storage_key),
                compression=cmd.compression,
                job_key_lookup=job_key,
                expected_artifact_sha256=cmd.artifact_sha256,
                expected_dump_sha256=cmd.dump_sha256,
                on_progress=progress.update,
            )
            # downloading and restoring overlap (one stream): from here on it is "restoring"
            set_stage("restoring")
            bytes_restored = await engine.restore(conn, chunks)
            finished_at = _now()
            log.info("restore completed", bytes_restored=bytes_restored)
            return RestoreCompleted(
                agent_id=agent_id,
                occurred_at=finished_at,
                restore_id=cmd.restore_id,
                started_at=started_at,
                finished_at=finished_at,
                bytes_restored=bytes_restored,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = _report_failure("restore", exc, stage, db_secrets, storage_secrets)
            return RestoreFailed(
                agent_id=agent_id, occurred_at=_now(), restore_id=cmd.restore_id, stage=stage, error=error
            )


# ---------------------------------------------------------------- verify


async def run_verify(
    cmd: VerifyCommand,
    *,
    agent_id: str,
    private_key: X25519PrivateKey,
    progress: ProgressState,
    registry: ScratchRegistry | None = None,
    keyring: Keyring | None = None,
) -> VerifyCompleted | VerifyFailed:
    """Integrity check or test restore of one backup copy: `verification.py`."""
    from .verification import run_verify as verify

    return await verify(
        cmd, agent_id=agent_id, private_key=private_key, progress=progress, registry=registry, keyring=keyring
    )


# ---------------------------------------------------------------- rpc


_DbReply = TypeVar("_DbReply", DbTestReply, DbListReply)


async def _ask_database(
    rpc: str,
    request: DbTestRequest | DbListRequest,
    private_key: X25519PrivateKey,
    reply: type[_DbReply],
    work: Callable[[Engine, Connection], Awaitable[_DbReply]],
) -> _DbReply:
    """Open the request's sealed credentials, run `work` within the time limit, and turn every
    failure into an answer that names it (never a secret, never a silent timeout)."""
    secrets: dict[str, Any] = {}
    try:
        secrets = open_optional(private_key, request.database.secrets, seal_info("rpc", request.request_id))
        engine = get_engine(request.database.engine)
        conn = Connection(settings=dict(request.database.settings), secrets=_as_str_secrets(secrets))
        async with asyncio.timeout(DB_TEST_TIMEOUT_SECONDS):
            return await work(engine, conn)
    except EngineError as exc:
        return reply(ok=False, error_code=exc.code, error=_scrub(exc.message, secrets))
    except SealingError as exc:
        return reply(ok=False, error_code="error", error=str(exc))
    except TimeoutError:
        return reply(
            ok=False,
            error_code="timeout",
            error=f"no answer from the database within {DB_TEST_TIMEOUT_SECONDS:.0f} s",
        )
    except Exception as exc:
        log.error(f"{rpc} failed unexpectedly", error_type=type(exc).__name__)
        return reply(ok=False, error_code="error", error=_scrub(describe_error(exc), secrets))


async def test_database(request: DbTestRequest, *, private_key: X25519PrivateKey) -> DbTestReply:
    started = time.monotonic()

    async def test(engine: Engine, conn: Connection) -> DbTestReply:
        version = await engine.test(conn)
        latency_ms = (time.monotonic() - started) * 1000
        # the connection works (ok), but say so now if a backup or restore would not
        problem = await tools.connection_warning(engine, version)
        return DbTestReply(
            ok=True,
            server_version=version,
            latency_ms=latency_ms,
            error_code=problem.code if problem and problem.fatal else None,
            warning=problem.message if problem else None,
        )

    return await _ask_database("db.test", request, private_key, DbTestReply, test)


# databases RahatBack itself creates for restores and test restores (engines' scratch names)
SCRATCH_DATABASE_PREFIX = "rbk_"


async def list_databases(request: DbListRequest, *, private_key: X25519PrivateKey) -> DbListReply:
    """The server's databases for a whole-server job: the engine leaves its system databases out,
    and our own scratch databases (a test restore may be running) are never backed up."""

    async def listing(engine: Engine, conn: Connection) -> DbListReply:
        names = await engine.list_databases(conn)
        return DbListReply(
            ok=True, databases=sorted(n for n in names if not n.startswith(SCRATCH_DATABASE_PREFIX))
        )

    return await _ask_database("db.list", request, private_key, DbListReply, listing)


async def test_storage(request: StorageTestRequest, *, private_key: X25519PrivateKey) -> StorageTestReply:
    secrets: dict[str, Any] = {}
    try:
        secrets = open_optional(private_key, request.storage.secrets, seal_info("rpc", request.request_id))
        storage = get_storage(request.storage, secrets)
        async with asyncio.timeout(STORAGE_TEST_TIMEOUT_SECONDS):
            await storage.probe()
        return StorageTestReply(ok=True)
    except StorageError as exc:
        return StorageTestReply(ok=False, error_code=exc.code, error=_scrub(exc.message, secrets))
    except SealingError as exc:
        return StorageTestReply(ok=False, error_code="error", error=str(exc))
    except TimeoutError:
        return StorageTestReply(
            ok=False,
            error_code="timeout",
            error=f"storage did not answer within {STORAGE_TEST_TIMEOUT_SECONDS:.0f} s",
        )
    except Exception as exc:
        log.error("storage.test failed unexpectedly", error_type=type(exc).__name__)
        return StorageTestReply(ok=False, error_code="error", error=_scrub(describe_error(exc), secrets))


async def run_prune(
    command: PruneCommand, *, agent_id: str, private_key: X25519PrivateKey
) -> PruneCompleted | PruneFailed:
    """Delete expired artifacts and their manifests. A key already gone counts as deleted, so a
    redelivered prune is harmless; each item that fails is reported with its reason."""
    secrets: dict[str, Any] = {}
    try:
        secrets = open_optional(private_key, command.storage.secrets, seal_info("prune", command.prune_id))
        storage = get_storage(command.storage, secrets)
    except (SealingError, StorageError) as exc:
        error = str(exc) if isinstance(exc, SealingError) else _scrub(exc.message, secrets)
        return PruneFailed(agent_id=agent_id, occurred_at=_now(), prune_id=command.prune_id, error=error)
    deleted: list[str] = []
    failures: list[PruneFailure] = []
    for item in command.items:
        try:
            # the manifest first: a listing never shows a manifest whose artifact is gone
            if item.manifest_key:
                await storage.delete(item.manifest_key)
            await storage.delete(item.storage_key)
            deleted.append(item.run_id)
        except StorageError as exc:
            failures.append(PruneFailure(run_id=item.run_id, error=_scrub(exc.message, secrets)))
        except Exception as exc:
            failures.append(PruneFailure(run_id=item.run_id, error=_scrub(describe_error(exc), secrets)))
    log.info("prune done", prune_id=command.prune_id, deleted=len(deleted), failed=len(failures))
    return PruneCompleted(
        agent_id=agent_id, occurred_at=_now(), prune_id=command.prune_id, deleted=deleted, failures=failures
    )
