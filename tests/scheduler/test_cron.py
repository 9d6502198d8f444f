"""Crontab → APScheduler translation (checked against croniter) and the DST rule (docs/scheduling.md)."""

from __future__ import annotations

import functools
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from croniter import CroniterBadDateError, croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rahatback_scheduler.cron import MISSED_FIRES_CAP, CronError, CronSchedule, expand_crontab

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def croniter_fires(expr: str, start: datetime, count: int) -> list[datetime]:
    it = croniter(expr, start)
    fires: list[datetime] = []
    for _ in range(count):
        try:
            fires.append(it.get_next(datetime).astimezone(UTC))
        except CroniterBadDateError:
            break
    return fires


def our_fires(expr: str, timezone: str, start: datetime, count: int) -> list[datetime]:
    return list(CronSchedule(expr, timezone).preview(start, count))


EXPRESSIONS = [
    "* * * * *",
    "5 * * * *",
    "*/7 * * * *",
    "0,30 9-17 * * *",
    "*/15 9-17 * * 1-5",
    "0 12 * * mon-fri",
    "0 12 * * MON-FRI",
    "30 2 13 * fri",  # both day fields restricted: the 13th OR any Friday
    "0 0 1,15 * 0",
    "0 0 * * 0",
    "0 0 * * 7",  # 7 = Sunday too
    "0 0 * * 0,7",
    "0 0 * * 0-7",
    "0 0 * * 5-7",  # Fri, Sat, Sun
    "0 0 * * fri-mon",  # wraps around the week
    "0 0 * * 6-0",
    "0 0 * * sat,sun",
    "0 0 * * */2",
    "0 0 * * 1/2",
    "0 0 * * 1-7/2",
    "0 0 * * sun-sat/2",
    "0 0 ? * mon",
    "0 0 */1 * mon",  # a complete day-of-month list still counts as restricted (croniter): every day
    "0 0 1-31 * mon",
    "0 0 L * *",
    "0 0 1,L * *",
    "0 0 15-L * *",
    "0 0 5-3 * *",  # wraps around the month
    "0 0 29 2 *",  # leap days only
    "0 0 30 2 mon",  # a day-of-month side that never matches leaves the Mondays
    "0 0 1 1/5 *",
    "0 0 * apr-jan/3 *",
    "0 0 1 jan,jul *",
    "59/15 * * * *",  # "start at 59, step 15" is minute 59 only
    "0 22-2 * * *",  # wraps around midnight
    "@hourly",
    "@daily",
    "@midnight",
    "@weekly",
    "@monthly",
    "@yearly",
    "* * * * * */25",  # croniter's 6th field: seconds
    "* * * * * 59/15",
    "*/5 * * * * 10,40",
    "0 0 1 * * 0 2027-2030",  # 7th field: year
]


@pytest.mark.parametrize("expr", EXPRESSIONS)
@pytest.mark.parametrize(
    ("timezone", "start"),
    [
        ("UTC", datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC)),
        ("UTC", datetime(2027, 2, 27, 23, 59, 59, tzinfo=UTC)),
        ("Asia/Kolkata", datetime(2026, 6, 30, 18, 29, 0, tzinfo=ZoneInfo("Asia/Kolkata"))),
    ],
)
def test_the_next_50_fires_match_croniter(expr: str, timezone: str, start: datetime) -> None:
    expected = croniter_fires(expr, start, 50)
    assert expected, "the reference produced nothing: the case would prove nothing"
    assert our_fires(expr, timezone, start, 50) == expected


def test_day_of_week_is_numbered_from_sunday_not_monday() -> None:
    # APScheduler's own from_crontab would read "1" as Tuesday
    fires = our_fires("0 9 * * 1", "UTC", datetime(2026, 1, 1, tzinfo=UTC), 3)
    assert [f.strftime("%a") for f in fires] == ["Mon", "Mon", "Mon"]
    sundays = our_fires("0 9 * * 0", "UTC", datetime(2026, 1, 1, tzinfo=UTC), 2)
    assert sundays == our_fires("0 9 * * 7", "UTC", datetime(2026, 1, 1, tzinfo=UTC), 2)
    assert [f.strftime("%a") for f in sundays] == ["Sun", "Sun"]


def test_both_day_fields_restricted_means_either() -> None:
    fires = our_fires("0 0 13 * fri", "UTC", datetime(2026, 2, 1, tzinfo=UTC), 4)
    assert [f.date().isoformat() for f in fires] == ["2026-02-06", "2026-02-13", "2026-02-20", "2026-02-27"]


@pytest.mark.parametrize(
    ("expr", "reason"),
    [
        ("* * * *", "5 fields"),
        ("61 * * * *", "out of range"),
        ("0 0 0 * *", "out of range"),
        ("5-5 * * * *", "same value"),  # croniter: every minute; standard cron: minute 5
        ("0 0 * * mon-mon", "same value"),
        ("0 0 * * 5#2", "nth/last weekday"),
        ("0 0 * * l5", "nth/last weekday"),
        ("0 0 15w * *", "nearest weekday"),
        ("h * * * *", "hashed"),
        ("r * * * *", "hashed"),
        ("*/0 * * * *", "step of 0"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 30,31 2,feb *", "never fires"),
        ("0 0 * * funday", "not a valid day of week"),
        ("0 0 ?,1 * *", "'?'"),
    ],
)
def test_expressions_we_refuse_say_why(expr: str, reason: str) -> None:
    with pytest.raises(CronError, match=reason):
        CronSchedule(expr, "UTC")


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(CronError, match="IANA"):
        CronSchedule("0 0 * * *", "Europe/Atlantis")


def test_expansion_keeps_the_croniter_restriction_rule() -> None:
    minute, hour, day, month, dow, second, year = expand_crontab("*/20 1 * * 1-5")
    assert (minute, hour, day, month, dow, second, year) == (
        (0, 20, 40),
        (1,),
        None,
        None,
        (1, 2, 3, 4, 5),
        (0,),
        None,
    )
    assert expand_crontab("0 0 1-31 * mon")[2] == tuple(range(1, 32))  # stays a restriction: OR applies
    assert expand_crontab("0 0 1-31 * *")[2] is None


# --- generated expressions ----------------------------------------------------------------------

MONTH_NAMES = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]


def _value_text(low: int, high: int, names: list[str], name_base: int) -> st.SearchStrategy[tuple[int, str]]:
    def render(value: int) -> st.SearchStrategy[tuple[int, str]]:
        options = [str(value)]
        if names and 0 <= value - name_base < len(names):
            options.append(names[value - name_base])
        return st.sampled_from(options).map(lambda text: (value, text))

    return st.integers(low, high).flatmap(render)


def _field(low: int, high: int, names: list[str] = [], name_base: int = 0) -> st.SearchStrategy[str]:  # noqa: B006 - read only
    value = _value_text(low, high, names, name_base)
    step = st.integers(1, high - low + 2).map(str)
    distinct_pair = st.tuples(value, value).filter(lambda pair: pair[0][0] != pair[1][0])
    item = st.one_of(
        st.just("*"),
        value.map(lambda v: v[1]),
        distinct_pair.map(lambda pair: f"{pair[0][1]}-{pair[1][1]}"),
        step.map(lambda s: f"*/{s}"),
        st.tuples(distinct_pair, step).map(lambda p: f"{p[0][0][1]}-{p[0][1][1]}/{p[1]}"),
        st.tuples(value, step).map(lambda p: f"{p[0][1]}/{p[1]}"),
    )
    return st.lists(item, min_size=1, max_size=3).map(",".join)


def _day_of_month() -> st.SearchStrategy[str]:
    return st.one_of(_field(1, 31), st.just("?"), st.just("L"), st.integers(1, 30).map(lambda d: f"{d}-L"))


CRON_EXPRESSIONS = st.tuples(
    _field(0, 59),
    _field(0, 23),
    _day_of_month(),
    _field(1, 12, MONTH_NAMES, 1),
    st.one_of(_field(0, 7, DOW_NAMES, 0), st.just("?")),
    st.one_of(st.none(), _field(0, 59)),
).map(lambda fields: " ".join(f for f in fields if f is not None))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    expr=CRON_EXPRESSIONS,
    start=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2090, 1, 1)),
)
def test_generated_expressions_match_croniter(expr: str, start: datetime) -> None:
    start = start.replace(tzinfo=UTC)
    try:
        schedule = CronSchedule(expr, "UTC")
    except CronError as exc:
        assert "never fires" in str(exc), f"{expr!r} refused: {exc}"  # generated ranges are never equal
        assert croniter_fires(expr, start, 1) == []
        return
    assert list(schedule.preview(start, 20)) == croniter_fires(expr, start, 20), expr


# --- DST ------------------------------------------------------------------------------------------


def local(*args: int, tz: ZoneInfo = BERLIN, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=tz, fold=fold)  # type: ignore[misc]


def fires_between(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    return list(CronSchedule(expr, str(tz)).fires(start, end))


def test_spring_forward_a_skipped_time_fires_once_right_after_the_gap() -> None:
    # Berlin 2026-03-29: 02:00 CET → 03:00 CEST; 02:30 does not exist that day
    fires = fires_between("30 2 * * *", BERLIN, local(2026, 3, 28, 12), local(2026, 3, 31, 12))
    assert [f.astimezone(BERLIN).isoformat() for f in fires] == [
        "2026-03-29T03:00:00+02:00",
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]


def test_spring_forward_several_skipped_times_collapse_into_one_fire() -> None:
    fires = fires_between("0,20,40 2,3 * * *", BERLIN, local(2026, 3, 29, 0), local(2026, 3, 29, 6))
    assert [f.astimezone(BERLIN).strftime("%H:%M%z") for f in fires] == [
        "03:00+0200",
        "03:20+0200",
        "03:40+0200",
    ]


def test_fall_back_a_repeated_time_fires_once_at_its_first_occurrence() -> None:
    # Berlin 2026-10-25: 03:00 CEST → 02:00 CET; 02:30 happens twice
    fires = fires_between("30 2 * * *", BERLIN, local(2026, 10, 24, 12), local(2026, 10, 26, 12))
    assert [f.isoformat() for f in fires] == ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
    assert fires[0].astimezone(BERLIN).utcoffset() == timedelta(hours=2)  # CEST: the first 02:30


def test_hourly_across_both_transitions() -> None:
    spring = fires_between("0 * * * *", BERLIN, local(2026, 3, 29, 0, 30), local(2026, 3, 29, 4, 30))
    assert [f.astimezone(BERLIN).strftime("%H:%M%z") for f in spring] == [
        "01:00+0100",
        "03:00+0200",
        "04:00+0200",
    ]
    assert {b - a for a, b in itertools.pairwise(spring)} == {timedelta(hours=1)}  # no hour lost in real time
    fall = fires_between("0 * * * *", BERLIN, local(2026, 10, 25, 0, 30), local(2026, 10, 25, 4, 30, fold=0))
    assert [f.astimezone(BERLIN).strftime("%H:%M%z") for f in fall] == [
        "01:00+0200",
        "02:00+0200",
        "03:00+0100",
        "04:00+0100",
    ]


def test_new_york_transitions() -> None:
    spring = fires_between(
        "30 2 * * *", NEW_YORK, local(2026, 3, 7, 12, tz=NEW_YORK), local(2026, 3, 9, 12, tz=NEW_YORK)
    )
    assert [f.astimezone(NEW_YORK).isoformat() for f in spring] == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
    ]
    fall = fires_between(
        "*/30 1 * * *", NEW_YORK, local(2026, 10, 31, 12, tz=NEW_YORK), local(2026, 11, 2, 12, tz=NEW_YORK)
    )
    assert [f.astimezone(NEW_YORK).isoformat() for f in fall] == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:00:00-05:00",
        "2026-11-02T01:30:00-05:00",
    ]


def test_next_fire_from_inside_the_repeated_hour_skips_the_repeat() -> None:
    schedule = CronSchedule("*/20 * * * *", "Europe/Berlin")
    second_pass = datetime(2026, 10, 25, 1, 10, tzinfo=UTC)  # 02:10 CET, the second 02:10
    assert second_pass.astimezone(BERLIN).fold == 1
    assert schedule.next_fire(second_pass) == datetime(2026, 10, 25, 2, 0, tzinfo=UTC)  # 03:00 CET
    first_pass = datetime(2026, 10, 25, 0, 10, tzinfo=UTC)  # 02:10 CEST
    assert schedule.next_fire(first_pass) == datetime(2026, 10, 25, 0, 20, tzinfo=UTC)


def _expected_by_rule(expr: str, tz: ZoneInfo, start: datetime, end: datetime) -> list[datetime]:
    """The DST rule computed the slow, obvious way: every matching wall-clock time in the window
    (croniter's calendar on naive times), placed at its first occurrence, or at the first instant
    at or past it if the wall-clock time does not exist that day."""
    expected: set[datetime] = set()
    first_wall = start.astimezone(tz).replace(tzinfo=None) - timedelta(hours=3)
    last_wall = end.astimezone(tz).replace(tzinfo=None) + timedelta(hours=3)
    walls = croniter(expr, first_wall)
    while (wall := walls.get_next(datetime)) <= last_wall:
        first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
        other = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
        if first > other:  # in a gap: walk forward to the first instant at or past this wall time
            instant = other
            while instant.astimezone(tz).replace(tzinfo=None) < wall:
                instant += timedelta(minutes=1)
            first = instant
        if start < first <= end:
            expected.add(first)
    return sorted(expected)


@pytest.mark.parametrize(
    "zone",
    ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago", "Europe/London"],
)
@pytest.mark.parametrize(
    "expr", ["*/10 * * * *", "30 2 * * *", "0 1-3 * * *", "15,45 0-4 * * 0", "0 */2 * * *"]
)
def test_transition_days_follow_the_rule_in_every_zone(zone: str, expr: str) -> None:
    tz = ZoneInfo(zone)
    schedule = CronSchedule(expr, zone)
    for day in _transition_days(tz, 2026):
        start = datetime(day.year, day.month, day.day, tzinfo=tz) - timedelta(hours=6)
        end = start + timedelta(hours=36)
        fires = list(schedule.fires(start.astimezone(UTC), end.astimezone(UTC)))
        assert fires == _expected_by_rule(expr, tz, start, end), (zone, day)
        walls = [f.astimezone(tz).replace(tzinfo=None) for f in fires]
        assert len(walls) == len(set(walls)), "a wall-clock time fired twice"


@functools.cache
def _transition_days(tz: ZoneInfo, year: int) -> list[datetime]:
    days = []
    instant = datetime(year, 1, 1, tzinfo=UTC)
    while instant.year == year:
        nxt = instant + timedelta(hours=1)
        if instant.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            days.append(nxt.astimezone(tz))
        instant = nxt
    assert len(days) == 2, f"expected two transitions in {tz} in {year}"
    return days


# --- catch-up helpers --------------------------------------------------------------------------


def test_latest_fire_and_count() -> None:
    schedule = CronSchedule("*/20 * * * *", "UTC")
    after, until = datetime(2026, 5, 1, 10, 0, tzinfo=UTC), datetime(2026, 5, 1, 10, 59, tzinfo=UTC)
    assert schedule.latest_fire(after, until) == datetime(2026, 5, 1, 10, 40, tzinfo=UTC)
    assert schedule.count_fires(after, until) == 2  # 10:20, 10:40 (10:00 is not after `after`)
    assert schedule.latest_fire(after, after + timedelta(minutes=19)) is None


def test_latest_fire_of_a_yearly_schedule_long_ago() -> None:
    schedule = CronSchedule("0 0 1 1 *", "Europe/Berlin")
    until = datetime(2026, 12, 1, tzinfo=UTC)
    assert schedule.latest_fire(datetime(2020, 1, 1, tzinfo=UTC), until) == datetime(
        2025, 12, 31, 23, 0, tzinfo=UTC
    )
    assert schedule.latest_fire(datetime(2026, 2, 1, tzinfo=UTC), until) is None


def test_per_second_schedule_over_a_week_counts_up_to_the_cap() -> None:
    schedule = CronSchedule("* * * * * *", "UTC")
    until = datetime(2026, 5, 8, 12, 0, 0, 500000, tzinfo=UTC)
    after = until - timedelta(days=7)
    assert schedule.latest_fire(after, until) == datetime(2026, 5, 8, 12, 0, 0, tzinfo=UTC)
    assert schedule.count_fires(after, until) == MISSED_FIRES_CAP
