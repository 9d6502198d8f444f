"""Which successful backups a retention policy expires. Pure: no database, no clock of its own.

Rules combine as a union (a backup is kept if ANY rule keeps it), like restic's `forget` and borg's
`prune`: keep_last N newest; keep_days everything finished in the last D days; keep_daily/weekly/
monthly/yearly K: the newest backup of each of the K most recent days/ISO weeks/months/years that
have a backup, in the job's time zone. The newest backup is always kept. No rule: nothing expires.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo


@dataclass(frozen=True)
class Policy:
    keep_last: int | None = None
    keep_days: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def keeps_everything(self) -> bool:
        return all(value is None for value in vars(self).values())


@dataclass(frozen=True)
class Backup:
    id: str
    finished_at: datetime  # timezone-aware


Bucket = Callable[[datetime], tuple[int, ...]]

_BUCKETS: tuple[tuple[str, Bucket], ...] = (
    ("keep_daily", lambda t: (t.year, t.month, t.day)),
    ("keep_weekly", lambda t: tuple(t.isocalendar())[:2]),
    ("keep_monthly", lambda t: (t.year, t.month)),
    ("keep_yearly", lambda t: (t.year,)),
)


def expired(backups: Sequence[Backup], policy: Policy, now: datetime, tz: tzinfo) -> set[str]:
    """Ids of the backups the policy no longer keeps."""
    if policy.keeps_everything() or not backups:
        return set()
    newest_first = sorted(backups, key=lambda b: (b.finished_at, b.id), reverse=True)
    keep = {newest_first[0].id}
    if policy.keep_last:
        keep.update(b.id for b in newest_first[: policy.keep_last])
    if policy.keep_days:
        cutoff = now - timedelta(days=policy.keep_days)
        keep.update(b.id for b in newest_first if b.finished_at >= cutoff)
    for rule, bucket_of in _BUCKETS:
        count: int | None = getattr(policy, rule)
        if not count:
            continue
        seen: set[tuple[int, ...]] = set()
        for backup in newest_first:
            bucket = bucket_of(backup.finished_at.astimezone(tz))
            if bucket in seen:
                continue
            if len(seen) == count:
                break
            seen.add(bucket)
            keep.add(backup.id)  # the newest backup of a bucket not counted yet
    return {b.id for b in newest_first} - keep
