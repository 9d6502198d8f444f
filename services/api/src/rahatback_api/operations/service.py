"""The three flows of the control plane: connection test, backup run, restore — and what agents report.

Everything here takes the session first and never commits: the caller's scope commits once, then
the outbox relay publishes what was enqueued (commands to agents, domain events).
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydantic import ValidationError
from rahatback_api.agents.service import is_online as _is_online
from rahatback_api.backups.models import ACTIVE_RUN_STATUSES
from rahatback_api.backups.selection import select_databases
from rahatback_api.backups.service import load_backup_key
from rahatback_api.columns import new_id, utcnow
from rahatback_api.context import app_context
from rahatback_api.databases.service import database_secrets
from rahatback_api.errors import AppError, Conflict
from rahatback_api.keys.custody import (
    customer_encryption,
    is_customer_key_id,
    record_held_keys,
    require_key_held,
)
from rahatback_api.messaging.bus import AgentOffline, AgentTimeout, Bus, BusUnavailable
from rahatback_api.messaging.outbox import enqueue
from rahatback_api.models import (
    Agent,
    BackupCopy,
    BackupJob,
    BackupRun,
    Database,
    RestoreRun,
    Storage,
    VerifyRun,
)
from rahatback_api.notifications.service import enqueue_event
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.storages.service import storage_secrets
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from rahatback_contracts.sealing import seal
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

log = structlog.get_logger(__name__)

COMMAND_TTL = timedelta(hours=6)
SWEEP_INTERVAL = timedelta(seconds=10)
RPC_TIMEOUT_SECONDS = 20.0
# a request expires this long after the API stops waiting for its answer
RPC_EXPIRY_MARGIN = timedelta(seconds=30)
# a whole-server run backs up at most this many databases (one run each); more is a sign of a mistake
MAX_SERVER_DATABASES = 1000
_DATABASE_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,128}")


_Run = TypeVar("_Run", BackupRun, RestoreRun, VerifyRun)


async def _first_active(session: AsyncSession, model: type[_Run], **match: str) -> str | None:
    """The id of a queued or running row matching `match` (e.g. job_id=…), if there is one."""
    query = select(model.id).where(col(model.status).in_(ACTIVE_RUN_STATUSES)).filter_by(**match)
    return (await session.execute(query)).scalars().first()


async def _active_rows(session: AsyncSession, model: type[_Run]) -> Sequence[_Run]:
    # skip_locked: a run whose report is being applied right now is judged at the next sweep
    query = select(model).where(col(model.status).in_(ACTIVE_RUN_STATUSES)).with_for_update(skip_locked=True)
    return (await session.execute(query)).scalars().all()


# ------------------------------------------------------------------------------------------ agents


def check_public_key(public_key_b64: str) -> None:
    try:
        X25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
    except (ValueError, binascii.Error) as exc:
        raise AppError(
            "x25519_public_key must be the base64 of a raw 32-byte X25519 public key",
            422,
            field="x25519_public_key",
        ) from exc


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def is_online(agent: Agent, offline_after: timedelta) -> bool:
    return _is_online(agent, int(offline_after.total_seconds()))


async def choose_agent(
    session: AsyncSession, org_id: str, preferred_id: str | None, offline_after: timedelta
) -> Agent:
    """The database's own agent if it has one, else the organization's most recently seen agent."""
    if preferred_id is not None:
        agent = await session.get(Agent, preferred_id)
        if agent is None or agent.org_id != org_id or agent.revoked_at is not None:
            raise Conflict("the agent this database is bound to no longer exists or was revoked")
        return agent
    agents = (
        (
            await session.execute(
                select(Agent)
                .where(Agent.org_id == org_id, col(Agent.revoked_at).is_(None))
                .order_by(col(Agent.last_seen_at).desc())
            )
        )
        .scalars()
        .all()
    )
    online = [a for a in agents if is_online(a, offline_after)]
    if not online:
        raise Conflict("no agent of this organization is online: start `rahatback-agent run` on a host")
    return online[0]


# ------------------------------------------------------------------------------ connection test


def database_target(
    agent: Agent,
    info: str,
    *,
    engine: str,
    name: str,
    settings: dict[str, Any],
    secrets: dict[str, Any],
    database_id: str | None = None,
) -> m.DatabaseTarget:
    """How the agent reaches a database, its secrets sealed to that agent for `info` only."""
    sealed = seal(agent.x25519_public_key, secrets, info) if secrets else None
    return m.DatabaseTarget(
        database_id=database_id, name=name, engine=engine, settings=settings, secrets=sealed
    )


def saved_database_target(
    box: SecretBox, db: Database, agent: Agent, info: str, database_name: str = ""
) -> m.DatabaseTarget:
    """`database_name`: one database of a whole-server connection instead of the one it names."""
    settings = dict(db.settings)
    if database_name:
        settings["database"] = database_name
    return database_target(
        agent,
        info,
        engine=db.engine,
        # names the folder in the storage: one per database of the server
        name=f"{db.name}.{database_name}" if database_name else db.name,
        settings=settings,
        secrets=database_secrets(box, db),
        database_id=db.id,
    )


_Reply = TypeVar("_Reply", m.DbTestReply, m.StorageTestReply, m.DbListReply)


async def ask_agent(
    bus: Bus,
    agent: Agent,
    rpc: Literal["db.test", "storage.test", "db.list"],
    make_request: Callable[[str], m.Message],
    reply_model: type[_Reply],
    timeout: float = RPC_TIMEOUT_SECONDS,  # noqa: ASYNC109 - the NATS request's own deadline
) -> _Reply:
    """Core request/reply to one agent; `make_request(request_id)` seals for that request only."""
    issued = utcnow()
    # the agent refuses a request past its expiry (a captured request cannot be replayed later)
    request = make_request(new_id()).model_copy(
        update={"issued_at": issued, "expires_at": issued + timedelta(seconds=timeout) + RPC_EXPIRY_MARGIN}
    )
    subject = subjects.agent_rpc(agent.id, rpc)
    if bus.command_signer is None:
        raise RuntimeError("the bus has no command signer: requests to agents must be signed")
    started = time.monotonic()
    try:
        data = await bus.request(
            subject, request, timeout=timeout, headers=bus.command_signer.headers_for(subject, request)
        )
    except AgentOffline as exc:
        raise Conflict(f"agent {agent.name!r} is offline: {exc}") from exc
    except AgentTimeout as exc:
        raise AppError(f"agent {agent.name!r}: {exc}", 504) from exc
    except BusUnavailable as exc:
        raise AppError(str(exc), 503) from exc
    try:
        reply = reply_model.model_validate_json(data)
    except ValidationError as exc:  # agents are not trusted to answer in shape
        raise AppError(f"agent {agent.name!r} sent a malformed {rpc} reply", 502) from exc
    log.info(
        rpc,
        agent_id=agent.id,
        ok=reply.ok,
        error_code=reply.error_code,
        round_trip_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return reply


async def test_connection(
    bus: Bus, agent: Agent, target_for: Callable[[str], m.DatabaseTarget]
) -> m.DbTestReply:
    """`target_for(info)` builds the DatabaseTarget sealed for this request's binding."""

    def request(request_id: str) -> m.DbTestRequest:
        return m.DbTestRequest(request_id=request_id, database=target_for(m.seal_info("rpc", request_id)))

    return await ask_agent(bus, agent, "db.test", request, m.DbTestReply)


async def server_databases(bus: Bus, box: SecretBox, agent: Agent, db: Database) -> list[str]:
    """The databases the server behind `db` holds now, as its agent lists them (`rpc.db.list`)."""

    def request(request_id: str) -> m.DbListRequest:
        info = m.seal_info("rpc", request_id)
        return m.DbListRequest(request_id=request_id, database=saved_database_target(box, db, agent, info))

    reply = await ask_agent(bus, agent, "db.list", request, m.DbListReply)
    if not reply.ok:
        raise Conflict(f"could not list the databases of {db.name!r}: {reply.error or reply.error_code}")
    names = [n for n in reply.databases if _DATABASE_NAME.fullmatch(n)]
    if len(names) != len(reply.databases):
        log.warning("db.list: names with control characters left out", agent_id=agent.id, database_id=db.id)
    return names[:MAX_SERVER_DATABASES]


async def test_storage(
    bus: Bus, agent: Agent, target_for: Callable[[str], m.StorageTarget]
) -> m.StorageTestReply:
    """Ask the agent to write, read back and delete a probe object; the reply names what failed."""

    def request(request_id: str) -> m.StorageTestRequest:
        return m.StorageTestRequest(request_id=request_id, storage=target_for(m.seal_info("rpc", request_id)))

    # the agent gives a storage up to 60 s (a slow bucket); wait a little longer for its verdict
    return await ask_agent(bus, agent, "storage.test", request, m.StorageTestReply, timeout=65.0)


# ---------------------------------------------------------------------------------------- backup


def storage_target(
    agent: Agent,
    info: str,
    *,
    kind: str,
    name: str,
    settings: dict[str, Any],
    secrets: dict[str, Any],
    storage_id: str | None = None,
) -> m.StorageTarget:
    """Where the agent writes artifacts, its secrets sealed to that agent for `info` only."""
    sealed = seal(agent.x25519_public_key, secrets, info) if secrets else None
    return m.StorageTarget(storage_id=storage_id, name=name, kind=kind, settings=settings, secrets=sealed)


def saved_storage_target(box: SecretBox, storage: Storage, agent: Agent, info: str) -> m.StorageTarget:
    return storage_target(
        agent,
        info,
        kind=storage.kind,
        name=storage.name,
        settings=dict(storage.settings),
        secrets=storage_secrets(box, storage),
        storage_id=storage.id,
    )


def enqueue_command(
    session: AsyncSession, agent_id: str, kind: subjects.CommandKind, command: m.Command, msg_id: str
) -> None:
    """Enqueue a command to an agent, signed with the API's command-signing key over its subject
    and the exact body the outbox relay will publish (docs/security.md "Signed commands")."""
    signer = app_context(session).command_signer
    if signer is None:
        raise RuntimeError("no command signer in the app context: commands to agents must be signed")
    subject = subjects.agent_command(agent_id, kind)
    headers = signer.headers(subject, command.model_dump_json().encode())
    enqueue(session, subject, command, msg_id, headers=headers)


def command_envelope(org_id: str) -> dict[str, Any]:
    issued = utcnow()
    return {"command_id": new_id(), "org_id": org_id, "issued_at": issued, "expires_at": issued + COMMAND_TTL}


async def sealed_key(
    session: AsyncSession, box: SecretBox, agent: Agent, org_id: str, key_id: str, info: str
) -> m.EncryptionSpec:
    if is_customer_key_id(key_id):  # only the agent holds it: the command names it, 409 if not held
        return await customer_encryption(session, agent, org_id, key_id, info)
    key = await load_backup_key(session, box, org_id, key_id)
    job_key = seal(agent.x25519_public_key, {"key_b64": _b64(key)}, info)
    return m.EncryptionSpec(enabled=True, key_id=key_id, job_key=job_key)


async def start_backup(
    session: AsyncSession,
    box: SecretBox,
    bus: Bus,
    job: BackupJob,
    *,
    trigger: str,
    offline_after: timedelta,
) -> list[BackupRun]:
    """Queue a run of `job` and enqueue its command; a second concurrent run of the job is a 409.

    A whole-server job asks its agent which databases the server holds now and queues one run per
    selected database (sharing a `batch_id`), so a database created since the last run is included."""
    active = await _first_active(session, BackupRun, job_id=job.id)
    if active is not None:
        raise Conflict(f"job {job.name!r} is already running (run {active}); wait for it to finish")
    db = await session.get(Database, job.database_id)
    storages = [await session.get(Storage, s) for s in (job.storage_id, *job.extra_storage_ids)]
    if db is None or None in storages:
        raise Conflict("the job's database or one of its storages no longer exists; update the job")
    storage, *extras = [s for s in storages if s is not None]
    bound = db.agent_id or next((s.agent_id for s in storages if s is not None and s.agent_id), None)
    agent = await choose_agent(session, job.org_id, bound, offline_after)
    if job.encryption_enabled and is_customer_key_id(job.key_id):  # before any run is queued
        await require_key_held(session, agent, job.org_id, job.key_id, "run")

    names, batch_id = [""], None
    if job.all_databases:
        found = await server_databases(bus, box, agent, db)
        names = select_databases(found, job.include_databases, job.exclude_databases)
        if not names:
            raise Conflict(
                f"no database on {db.name!r} matches the job's include/exclude patterns"
                f" (the server has {len(found)}: {', '.join(found[:20]) or 'none'})"
            )
        batch_id = new_id()
    runs = [
        await _queue_backup(session, box, job, db, agent, storage, extras, trigger, name, batch_id)
        for name in names
    ]
    job.last_run_at = runs[0].queued_at
    job.last_run_status = "queued"
    await session.flush()
    return runs


async def _queue_backup(
    session: AsyncSession,
    box: SecretBox,
    job: BackupJob,
    db: Database,
    agent: Agent,
    storage: Storage,
    extras: list[Storage],
    trigger: str,
    database_name: str,
    batch_id: str | None,
) -> BackupRun:
    run = BackupRun(
        id=new_id(),
        org_id=job.org_id,
        job_id=job.id,
        database_id=db.id,
        database_name=database_name,
        batch_id=batch_id,
        storage_id=storage.id,
        extra_storage_ids=[s.id for s in extras],
        agent_id=agent.id,
        trigger=trigger,
        status="queued",
        queued_at=utcnow(),
        compression=job.compression,
        encrypted=job.encryption_enabled,
        key_id=job.key_id if job.encryption_enabled else None,
        key_custody=job.key_custody if job.encryption_enabled else None,
        stage="queued",
        bytes_done=0,
    )
    session.add(run)
    info = m.seal_info("run", run.id)
    encryption = m.EncryptionSpec(enabled=False)
    if job.encryption_enabled:
        encryption = await sealed_key(session, box, agent, job.org_id, job.key_id, info)
    command = m.BackupCommand(
        **command_envelope(job.org_id),
        run_id=run.id,
        job_id=job.id,
        database=saved_database_target(box, db, agent, info, database_name),
        storage=saved_storage_target(box, storage, agent, info),
        extra_storages=[saved_storage_target(box, s, agent, info) for s in extras],
        compression=job.compression,
        compression_level=job.compression_level,
        encryption=encryption,
    )
    enqueue_command(session, agent.id, "job.execute", command, f"{run.id}:command")
    return run


# --------------------------------------------------------------------------------------- restore


async def restorable_copy(session: AsyncSession, run: BackupRun, storage_id: str | None) -> BackupCopy:
    """The copy to restore from: the one asked for, else the primary storage's, else any complete one."""
    if run.status not in ("completed", "partial"):
        raise Conflict(f"backup run {run.id} has no artifact to restore (status {run.status})")
    query = select(BackupCopy).where(BackupCopy.run_id == run.id, BackupCopy.status == "completed")
    copies = list((await session.execute(query)).scalars())
    usable = [c for c in copies if c.pruned_at is None and c.prune_id is None and c.storage_key]
    if storage_id is not None:
        chosen = next((c for c in copies if c.storage_id == storage_id), None)
        if chosen is None:
            raise AppError(
                f"backup run {run.id} has no copy in storage {storage_id}", 422, field="storage_id"
            )
        copies = [chosen]
        usable = [c for c in usable if c is chosen]
    if not usable:
        if copies:
            raise Conflict(
                f"the files of backup run {run.id} were deleted by the job's retention policy"
                + (" (the deletion is under way)" if any(c.prune_id for c in copies) else "")
            )
        raise Conflict(f"backup run {run.id} has no complete copy to restore")
    return min(usable, key=lambda c: c.storage_id != run.storage_id)  # the primary storage first


async def start_restore(
    session: AsyncSession,
    box: SecretBox,
    run: BackupRun,
    target: Database,
    *,
    offline_after: timedelta,
    storage_id: str | None = None,
) -> RestoreRun:
    copy = await restorable_copy(session, run, storage_id)
    source_db = await session.get(Database, run.database_id)
    if source_db is not None and source_db.engine != target.engine:
        raise AppError(
            f"cannot restore a {source_db.engine} backup into a {target.engine} database",
            422,
            field="database_id",
        )
    busy = await _first_active(session, RestoreRun, database_id=target.id)
    if busy is not None:
        raise Conflict(f"database {target.name!r} is already being restored (restore {busy})")
    storage = await session.get(Storage, copy.storage_id)
    if storage is None:
        raise Conflict("the storage holding this copy of the backup no longer exists")
    preferred = target.agent_id or run.agent_id
    if storage.kind == "local":
        # the artifact sits in a folder on the host of the agent that wrote it
        preferred = storage.agent_id or run.agent_id
        if target.agent_id is not None and target.agent_id != preferred:
            raise AppError(
                "this backup is in a local folder on another agent's host than the target database's agent;"
                " restore into a database that agent can reach",
                422,
                field="database_id",
            )
    agent = await choose_agent(session, run.org_id, preferred, offline_after)

    restore = RestoreRun(
        id=new_id(),
        org_id=run.org_id,
        backup_run_id=run.id,
        database_id=target.id,
        storage_id=storage.id,
        agent_id=agent.id,
        status="queued",
        queued_at=utcnow(),
    )
    session.add(restore)
    run.last_restore_status = "queued"
    run.last_restore_at = restore.queued_at

    info = m.seal_info("restore", restore.id)
    encryption = None
    if run.encrypted:
        if run.key_id is None:
            raise Conflict(f"backup run {run.id} is encrypted but records no key id")
        encryption = await sealed_key(session, box, agent, run.org_id, run.key_id, info)
    command = m.RestoreCommand(
        **command_envelope(run.org_id),
        restore_id=restore.id,
        backup_run_id=run.id,
        # a whole-server backup goes back into the database it came from on that server
        database=saved_database_target(
            box, target, agent, info, run.database_name if target.id == run.database_id else ""
        ),
        storage=saved_storage_target(box, storage, agent, info),
        storage_key=copy.storage_key or "",
        compression=run.compression,
        encrypted=run.encrypted,
        artifact_sha256=run.artifact_sha256,
        dump_sha256=run.dump_sha256,
        encryption=encryption,
    )
    enqueue_command(session, agent.id, "restore.execute", command, f"{restore.id}:command")
    await session.flush()
    return restore


# --------------------------------------------------------------------------------- run records


class UntrustedReport(Exception):
    """A report that is malformed or about a run the reporting agent does not own: dropped, logged."""


async def active_backup_of(session: AsyncSession, job_id: str) -> str | None:
    return await _first_active(session, BackupRun, job_id=job_id)


def duration_ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, int((end - start).total_seconds() * 1000))


def fail_run(run: BackupRun, error: str, at: datetime | None = None) -> None:
    run.status = "failed"
    run.error = error
    run.finished_at = at or utcnow()
    run.duration_ms = duration_ms(run.started_at, run.finished_at)


def fail_restore(restore: RestoreRun, error: str, at: datetime | None = None) -> None:
    restore.status = "failed"
    restore.error = error
    restore.finished_at = at or utcnow()
    restore.duration_ms = duration_ms(restore.started_at, restore.finished_at)


async def enqueue_backup_event(session: AsyncSession, run: BackupRun, event_type: str) -> None:
    job = await session.get(BackupJob, run.job_id) if run.job_id else None
    db = await session.get(Database, run.database_id)
    storage = await session.get(Storage, run.storage_id)
    event = m.BackupEvent(
        event_id=new_id(),
        type=event_type,
        org_id=run.org_id,
        occurred_at=utcnow(),
        run_id=run.id,
        job_id=run.job_id,
        job_name=job.name if job else "(deleted job)",
        database_id=run.database_id,
        database_name=db.name if db else "(deleted database)",
        status=run.status,
        trigger=run.trigger,
        dump_size=run.dump_size,
        artifact_size=run.artifact_size,
        duration_ms=run.duration_ms,
        storage_key=run.storage_key,
        storage_name=storage.name if storage else None,
        error=run.error,
    )
    await enqueue_event(
        session, event, f"{run.id}:{event_type}", job_id=run.job_id, link_path=f"/v1/backups/history/{run.id}"
    )


async def enqueue_restore_event(session: AsyncSession, restore: RestoreRun, event_type: str) -> None:
    db = await session.get(Database, restore.database_id)
    backup = await session.get(BackupRun, restore.backup_run_id)
    job = await session.get(BackupJob, backup.job_id) if backup and backup.job_id else None
    event = m.RestoreEvent(
        event_id=new_id(),
        type=event_type,
        org_id=restore.org_id,
        occurred_at=utcnow(),
        restore_id=restore.id,
        backup_run_id=restore.backup_run_id,
        job_id=job.id if job else None,
        job_name=job.name if job else None,
        database_id=restore.database_id,
        database_name=db.name if db else "(deleted database)",
        status=restore.status,
        duration_ms=restore.duration_ms,
        error=restore.error,
    )
    await enqueue_event(
        session,
        event,
        f"{restore.id}:{event_type}",
        job_id=job.id if job else None,
        link_path=f"/v1/backups/restores/{restore.id}",
    )


async def finish_verify(
    session: AsyncSession, verify: VerifyRun, status: str, error: str | None, at: datetime | None = None
) -> None:
    """Record a verification's end on it, its backup's job, and announce it (verify.completed|failed)."""
    verify.status, verify.error = status, error
    verify.finished_at = at or utcnow()
    verify.duration_ms = duration_ms(verify.started_at, verify.finished_at)
    job = await session.get(BackupJob, verify.job_id) if verify.job_id else None
    if job is not None:
        job.last_verified_at, job.last_verify_status = verify.finished_at, status
        job.last_verify_id = verify.id
        if status == "completed":
            job.last_verify_ok_at = verify.finished_at
    db = await session.get(Database, verify.database_id)
    event_type = f"verify.{status}"
    event = m.VerifyEvent(
        event_id=new_id(),
        type=event_type,
        org_id=verify.org_id,
        occurred_at=utcnow(),
        verify_id=verify.id,
        backup_run_id=verify.backup_run_id,
        job_id=verify.job_id,
        job_name=job.name if job else None,
        database_id=verify.database_id,
        database_name=db.name if db else "(deleted database)",
        level=verify.level,
        status=status,
        duration_ms=verify.duration_ms,
        tables_compared=verify.tables_compared,
        mismatches=[m.TableCheck.model_validate(x) for x in verify.mismatches],
        error=error,
    )
    link = f"/v1/backups/verifications/{verify.id}"
    await enqueue_event(session, event, f"{verify.id}:{event_type}", job_id=verify.job_id, link_path=link)


# ------------------------------------------------------------------------ presence and watchdog


async def record_heartbeat(
    session: AsyncSession, heartbeat: m.Heartbeat, agent_id: str, offline_after: timedelta
) -> None:
    agent = await session.get(Agent, agent_id)
    if agent is None or agent.revoked_at is not None:
        return
    was_online, previously_seen = is_online(agent, offline_after), agent.last_seen_at
    agent.last_seen_at = utcnow()
    agent.version = heartbeat.version
    agent.engines = list(heartbeat.engines)
    agent.storages = list(heartbeat.storages)
    if agent.tools != heartbeat.tools:
        agent.tools = dict(heartbeat.tools)
    await record_held_keys(session, agent, heartbeat.keys)
    if not was_online:
        await _enqueue_presence(session, agent, online=True, since=previously_seen or agent.last_seen_at)
    # A run the agent lists is alive even when no bytes move (psql building an index, pg_dump
    # waiting for a lock); only a run the agent no longer knows about goes stale.
    for model in (BackupRun, RestoreRun, VerifyRun):
        await session.execute(
            update(model)
            .where(
                col(model.id).in_(heartbeat.running),
                col(model.agent_id) == agent_id,
                col(model.status) == "running",
            )
            .values(last_progress_at=agent.last_seen_at)
        )


async def _enqueue_presence(session: AsyncSession, agent: Agent, *, online: bool, since: datetime) -> None:
    event_type = "presence.online" if online else "presence.offline"
    event = m.PresenceEvent(
        event_id=new_id(),
        type=event_type,
        org_id=agent.org_id,
        occurred_at=utcnow(),
        agent_id=agent.id,
        agent_name=agent.name,
        online=online,
    )
    await enqueue_event(session, event, f"{agent.id}:{event_type}:{since.isoformat()}")


async def record_progress(session: AsyncSession, progress: m.Progress, agent_id: str) -> None:
    row: BackupRun | RestoreRun | VerifyRun | None
    if progress.kind == "backup":
        row = await session.get(BackupRun, progress.run_id)
    elif progress.kind == "restore":
        row = await session.get(RestoreRun, progress.run_id)
    else:
        row = await session.get(VerifyRun, progress.run_id)
    if row is None or row.agent_id != agent_id or row.status not in ACTIVE_RUN_STATUSES:
        return
    row.last_progress_at = utcnow()
    if isinstance(row, BackupRun):
        row.stage = progress.stage
        row.bytes_done = progress.bytes_in


def _stall_reason(
    row: BackupRun | RestoreRun | VerifyRun,
    agent: Agent | None,
    moment: datetime,
    *,
    stall_after: timedelta,
    offline_after: timedelta,
    command_ttl: timedelta,
) -> str | None:
    if row.status == "queued":
        if moment - row.queued_at > command_ttl:
            return "the agent did not pick up the command before it expired"
        return None
    if agent is not None and not is_online(agent, offline_after):
        return (
            f"agent {agent.name!r} stopped heartbeating for more than {int(offline_after.total_seconds())} s"
        )
    if moment - (row.last_progress_at or row.started_at or row.queued_at) > stall_after:
        return f"no progress from the agent for more than {int(stall_after.total_seconds())} s"
    return None


async def _fail_stalled(session: AsyncSession, row: BackupRun | RestoreRun | VerifyRun, reason: str) -> None:
    await fail_active(session, row, reason)
    log.warning("watchdog.failed", kind=type(row).__name__, id=row.id, reason=reason)


async def fail_active(session: AsyncSession, row: BackupRun | RestoreRun | VerifyRun, reason: str) -> None:
    """Fail a queued or running run, record it on its job or backup, and announce it."""
    if isinstance(row, VerifyRun):
        await finish_verify(session, row, "failed", reason)
    elif isinstance(row, BackupRun):
        fail_run(row, reason)
        job = await session.get(BackupJob, row.job_id) if row.job_id else None
        if job is not None:
            job.last_run_status = "failed"
        await enqueue_backup_event(session, row, "backup.failed")
    else:
        fail_restore(row, reason)
        backup = await session.get(BackupRun, row.backup_run_id)
        if backup is not None:
            backup.last_restore_status = "failed"
        await enqueue_restore_event(session, row, "restore.failed")


async def sweep_stalled(
    session: AsyncSession,
    *,
    stall_after: timedelta,
    offline_after: timedelta,
    command_ttl: timedelta = COMMAND_TTL,
) -> int:
    """Fail runs that can no longer finish, so no run stays `running` forever. Returns how many."""
    moment = utcnow()
    agents = {a.id: a for a in (await session.execute(select(Agent))).scalars().all()}
    limits = {"stall_after": stall_after, "offline_after": offline_after, "command_ttl": command_ttl}
    failed = 0
    rows: list[BackupRun | RestoreRun | VerifyRun] = [
        *await _active_rows(session, BackupRun),
        *await _active_rows(session, RestoreRun),
        *await _active_rows(session, VerifyRun),
    ]
    for row in rows:
        reason = _stall_reason(row, agents.get(row.agent_id or ""), moment, **limits)
        if reason is not None:
            failed += 1
            await _fail_stalled(session, row, reason)

    for agent in agents.values():
        seen = agent.last_seen_at
        # Announce going offline in the first sweeps after the limit passed (a few, in case one is
        # late); the msg id derives from the last heartbeat, so JetStream keeps exactly one event
        # however many sweeps or API replicas announce it.
        if (
            agent.revoked_at is None
            and seen is not None
            and (offline_after < moment - seen <= offline_after + 3 * SWEEP_INTERVAL)
        ):
            await _enqueue_presence(session, agent, online=False, since=seen)
    return failed
