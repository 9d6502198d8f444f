"""The misfire rule: what a (re)loaded schedule owes for fires that fell due while nobody fired them.

Pure (no I/O, no clock); docs/scheduling.md states the rule in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .cron import MISSED_FIRES_CAP, CronSchedule

_JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True)
class Due:
    """One request to publish for a fire time that is already past."""

    fire_time: datetime
    missed: bool = False
    missed_fires: int = 0


def plan_catch_up(
    schedule: CronSchedule,
    *,
    last_fire: datetime | None,
    updated_at: datetime,
    until: datetime,
    now: datetime,
    grace: timedelta,
    cap: int = MISSED_FIRES_CAP,
) -> list[Due]:
    """Requests owed for fires in (baseline, until], at most two, oldest first.

    baseline: the later of the last fire this schedule published and the moment the schedule was
    set (fires of a schedule that did not exist yet, or was disabled, are owed to nobody).
    - the latest due fire within `grace` of `now` runs, late, as a normal request;
    - the fires before it, if any, become ONE missed request (fire_time = the latest of them,
      missed_fires = how many, capped);
    - if even the latest is older than `grace`, all of them become one missed request.
    """
    baseline = max(last_fire, updated_at) if last_fire is not None else updated_at
    latest = schedule.latest_fire(baseline, until)
    if latest is None:
        return []
    if now - latest > grace:
        return [Due(latest, missed=True, missed_fires=schedule.count_fires(baseline, latest, cap))]
    owed: list[Due] = []
    earlier = schedule.latest_fire(baseline, latest - _JUST_BEFORE)
    if earlier is not None:
        owed.append(Due(earlier, missed=True, missed_fires=schedule.count_fires(baseline, earlier, cap)))
    owed.append(Due(latest))
    return owed
