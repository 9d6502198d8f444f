"""The misfire rule (docs/scheduling.md), as a pure function."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from rahatback_scheduler.catchup import Due, plan_catch_up
from rahatback_scheduler.cron import MISSED_FIRES_CAP, CronSchedule

HOURLY = CronSchedule("0 * * * *", "UTC")
GRACE = timedelta(minutes=5)
NOW = datetime(2026, 5, 10, 12, 3, tzinfo=UTC)  # 3 minutes after the 12:00 fire
LONG_AGO = datetime(2026, 1, 1, tzinfo=UTC)


def plan(last_fire: datetime | None, updated_at: datetime = LONG_AGO, now: datetime = NOW) -> list[Due]:
    return plan_catch_up(HOURLY, last_fire=last_fire, updated_at=updated_at, until=now, now=now, grace=GRACE)


def at(hour: int, day: int = 10) -> datetime:
    return datetime(2026, 5, day, hour, tzinfo=UTC)


def test_nothing_owed_when_the_last_fire_is_the_latest() -> None:
    assert plan(last_fire=at(12)) == []


def test_the_latest_fire_within_grace_runs_late_as_a_normal_request() -> None:
    assert plan(last_fire=at(11)) == [Due(at(12))]


def test_fires_before_it_become_one_missed_request() -> None:
    # down since the 08:00 fire: 09, 10, 11 missed, 12 still within grace
    assert plan(last_fire=at(8)) == [Due(at(11), missed=True, missed_fires=3), Due(at(12))]


def test_all_older_than_grace_become_one_missed_request_for_the_latest() -> None:
    later = NOW + timedelta(minutes=10)  # 12:13: the 12:00 fire is past grace
    assert plan(last_fire=at(8), now=later) == [Due(at(12), missed=True, missed_fires=4)]


def test_grace_boundary_is_inclusive() -> None:
    assert plan(last_fire=at(11), now=at(12) + GRACE) == [Due(at(12))]
    assert plan(last_fire=at(11), now=at(12) + GRACE + timedelta(seconds=1)) == [
        Due(at(12), missed=True, missed_fires=1)
    ]


def test_never_fired_counts_from_when_the_schedule_was_set() -> None:
    assert plan(last_fire=None, updated_at=at(10) + timedelta(minutes=30)) == [
        Due(at(11), missed=True, missed_fires=1),
        Due(at(12)),
    ]


def test_a_schedule_set_after_the_last_fire_owes_nothing_for_the_time_before() -> None:
    # re-enabled (or changed) at 11:30 after being off since 02:00: only the 12:00 fire is owed
    assert plan(last_fire=at(2), updated_at=at(11) + timedelta(minutes=30)) == [Due(at(12))]


def test_missed_fires_are_counted_up_to_the_cap() -> None:
    every_second = CronSchedule("* * * * * *", "UTC")
    owed = plan_catch_up(
        every_second,
        last_fire=NOW - timedelta(days=3),
        updated_at=LONG_AGO,
        until=NOW,
        now=NOW + timedelta(hours=1),
        grace=GRACE,
    )
    assert owed == [Due(NOW, missed=True, missed_fires=MISSED_FIRES_CAP)]


def test_until_bounds_what_is_owed() -> None:
    # a catch-up retried later still settles only the fires up to its `until`
    owed = plan_catch_up(HOURLY, last_fire=at(10), updated_at=LONG_AGO, until=at(11), now=NOW, grace=GRACE)
    assert owed == [Due(at(11), missed=True, missed_fires=1)]
