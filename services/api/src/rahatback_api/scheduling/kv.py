"""The API keeps KV SCHEDULES in step with its jobs; the scheduler watches it and nothing else.

The scheduler never touches this database: a job's schedule reaches it only as a KV entry, written
through the outbox after the commit (a rolled-back change never reaches the scheduler).
"""

from __future__ import annotations

from nats.js.errors import KeyNotFoundError, NoKeysError
from rahatback_contracts import messages as m
from rahatback_contracts import streams
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import select

from rahatback_api.backups.models import BackupJob
from rahatback_api.columns import new_id
from rahatback_api.messaging.bus import Bus
from rahatback_api.messaging.outbox import enqueue


def _kv_subject(key: str) -> str:
    """A KV put/delete is a JetStream publish to `$KV.<bucket>.<key>` (how NATS implements KV)."""
    return f"$KV.{streams.SCHEDULES.bucket}.{key}"


def schedule_entries(job: BackupJob) -> dict[str, m.ScheduleEntry | None]:
    """The job's keys in the bucket: its backup and its verification schedule (None = no key)."""
    entries: dict[str, m.ScheduleEntry | None] = {}
    schedules: tuple[tuple[m.ScheduleKind, str | None], ...] = (
        ("backup", job.cron),
        ("verify", job.verify_cron),
    )
    for kind, cron in schedules:
        key = m.schedule_key(kind, job.id)
        entries[key] = (
            None
            if cron is None
            else m.ScheduleEntry(
                kind=kind,
                job_id=job.id,
                org_id=job.org_id,
                cron=cron,
                timezone=job.timezone,
                enabled=job.enabled,
                updated_at=job.schedule_set_at,
            )
        )
    return entries


def enqueue_schedule(session: AsyncSession, job: BackupJob, *, deleted: bool = False) -> None:
    """Tell the scheduler (after the commit) what this job's schedules now are."""
    for key, entry in schedule_entries(job).items():
        msg_id = f"{job.id}:schedule:{new_id()}"
        if entry is None or deleted:
            enqueue(session, _kv_subject(key), None, msg_id, headers={"KV-Operation": "DEL"})
        else:
            enqueue(session, _kv_subject(key), entry, msg_id)


async def reconcile_schedules(session: AsyncSession, bus: Bus) -> int:
    """Make the bucket match the jobs (at start-up): heals a lost or stale bucket. Returns changes."""
    kv = await bus.ensure_key_value(streams.SCHEDULES)
    wanted = {
        key: entry
        for job in (await session.execute(select(BackupJob))).scalars()
        for key, entry in schedule_entries(job).items()
        if entry is not None
    }
    try:
        present = set(await kv.keys())
    except NoKeysError:
        present = set()
    changes = 0
    for key in present - set(wanted):
        await kv.delete(key)
        changes += 1
    for key, entry in wanted.items():
        try:
            current = m.ScheduleEntry.from_bytes((await kv.get(key)).value or b"")
        except (KeyNotFoundError, ValueError):  # missing, deleted or unreadable: rewrite it
            current = None
        if current != entry:
            await kv.put(key, entry.to_bytes())
            changes += 1
    return changes
