"""Crontab expressions (parsed by rahatback_contracts.cron) → APScheduler cron triggers, and DST-correct
fire times. Pure: no I/O, no clock.

The API validates a schedule's `cron` with the same parser, so whatever it accepts fires here.

APScheduler 3's `CronTrigger.from_crontab` numbers weekdays from Monday and ANDs day-of-month with
day-of-week, so it is not used: every field is expanded to explicit values here and handed to
`CronTrigger(...)` by name (weekdays as `sun`..`sat`), with one trigger per side of an OR.

The triggers run in UTC and serve only as a wall-clock calendar ("which local times match");
`CronSchedule` maps those wall-clock times to instants in the schedule's time zone with the DST
rule documented in docs/scheduling.md:

- a wall-clock time that does not exist (spring forward) fires once, at the first instant after the
  gap (02:30 on a day Berlin jumps from 02:00 to 03:00 fires at 03:00 CEST; several such times
  collapse into that one fire, together with a fire the expression names at 03:00 itself);
- a wall-clock time that happens twice (fall back) fires once, at its first occurrence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]  # APScheduler 3 ships no type hints
from rahatback_contracts.cron import (
    FIELDS,
    WEEKDAY_NAMES,
    CronError,
    CronField,
    Values,
    expand_crontab,
)

__all__ = [
    "MISSED_FIRES_CAP",
    "CronError",
    "CronSchedule",
    "crontab_triggers",
    "expand_crontab",
]

# counting missed fires stops here: "1000" then means "1000 or more"
MISSED_FIRES_CAP = 1000

_ONE_SECOND = timedelta(seconds=1)
MINUTE, HOUR, DAY, MONTH, DOW, SECOND, YEAR = FIELDS


def _as_trigger_arg(field: CronField, values: Values) -> str:
    if values is None:
        return "*"
    numbers = sorted(v for v in values if isinstance(v, int))
    parts: list[str] = []
    if field is DOW:
        parts = [WEEKDAY_NAMES[v] for v in numbers]
    else:
        start = previous = None
        for number in [*numbers, None]:  # runs of consecutive values become "a-b"
            if number is not None and previous is not None and number == previous + 1:
                previous = number
                continue
            if start is not None:
                parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = previous = number
    if "l" in values:
        parts.append("last")
    return ",".join(parts)


def _days_possible(days: Values, months: Values) -> bool:
    """False when no listed day of month exists in any listed month (e.g. 30 and 31 February)."""
    if days is None or "l" in days:
        return True
    month_lengths = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
    longest = max(month_lengths[m - 1] for m in (months or range(1, 13)) if isinstance(m, int))
    return any(isinstance(d, int) and d <= longest for d in days)


def crontab_triggers(expr: str) -> tuple[CronTrigger, ...]:
    """APScheduler triggers (in UTC, i.e. on the bare wall-clock calendar) whose union is `expr`.

    Two triggers when croniter's OR applies (day of month and day of week both restricted): one per
    side, since CronTrigger ANDs them. A side that can never match (31 February) is left out.
    """
    minute, hour, day, month, dow, second, year = expand_crontab(expr)
    common = {
        "second": _as_trigger_arg(SECOND, second),
        "minute": _as_trigger_arg(MINUTE, minute),
        "hour": _as_trigger_arg(HOUR, hour),
        "month": _as_trigger_arg(MONTH, month),
        "year": _as_trigger_arg(YEAR, year),
        "timezone": UTC,
    }
    both_restricted = day is not None and dow is not None
    sides: list[tuple[Values, Values]] = [(day, None), (None, dow)] if both_restricted else [(day, dow)]
    triggers = tuple(
        CronTrigger(day=_as_trigger_arg(DAY, d), day_of_week=_as_trigger_arg(DOW, w), **common)
        for d, w in sides
        if _days_possible(d, month)
    )
    if not triggers:
        raise CronError(f"{expr!r} never fires: no listed day of month exists in the listed months")
    return triggers


def _zone(name: str) -> tzinfo:
    if name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronError(f"{name!r} is not an IANA time zone name (e.g. Europe/Berlin, UTC)") from exc


def _at(wall: datetime, zone: tzinfo, fold: int) -> datetime:
    return wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)


def _epoch_seconds(instant: datetime) -> int:
    return int(instant.timestamp())


class CronSchedule:
    """A crontab expression in an IANA time zone: its fire instants, with the DST rule applied."""

    def __init__(self, expr: str, timezone: str) -> None:
        self.expr = expr
        self.timezone = timezone
        self.zone = _zone(timezone)
        self._triggers = crontab_triggers(expr)

    def __repr__(self) -> str:
        return f"CronSchedule({self.expr!r}, {self.timezone!r})"

    # --- the wall-clock calendar -------------------------------------------------------------

    def _next_wall(self, start: datetime) -> datetime | None:
        """The first matching wall-clock time at or after the naive `start`."""
        at = start.replace(tzinfo=UTC)
        found = [t.get_next_fire_time(None, at) for t in self._triggers]
        candidates: list[datetime] = [f for f in found if f is not None]
        return min(candidates).replace(tzinfo=None) if candidates else None

    # --- wall clock → instant ----------------------------------------------------------------

    def _instant(self, wall: datetime) -> datetime:
        first, second = _at(wall, self.zone, 0), _at(wall, self.zone, 1)
        if first <= second:  # exists once, or twice (fall back): fold=0 is the earlier instant
            return first
        # does not exist (spring forward): the first instant whose local time is at or past `wall`,
        # which is the instant of the transition itself
        low, high = _epoch_seconds(second), _epoch_seconds(first)  # local(low) < wall <= local(high)
        while high - low > 1:
            middle = (low + high) // 2
            if self._local_wall(datetime.fromtimestamp(middle, UTC)) >= wall:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)

    def _local_wall(self, instant: datetime) -> datetime:
        return instant.astimezone(self.zone).replace(tzinfo=None)

    def _end_of_repeat(self, wall: datetime) -> datetime:
        """The first wall-clock time at or after `wall` (inside a repeated hour) that happens once."""

        def repeated(w: datetime) -> bool:
            return _at(w, self.zone, 0) < _at(w, self.zone, 1)

        low = wall.replace(microsecond=0)
        high = low + (_at(wall, self.zone, 1) - _at(wall, self.zone, 0))
        if not repeated(low):
            return low
        while (high - low) > _ONE_SECOND:  # repeated(low) and not repeated(high)
            middle = low + (high - low) // 2
            middle = middle.replace(microsecond=0)
            if repeated(middle):
                low = middle
            else:
                high = middle
        return high

    # --- fire times ----------------------------------------------------------------------------

    def next_fire(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after the aware `after` (UTC), None if it never fires again."""
        if after.tzinfo is None:
            raise ValueError("next_fire needs an aware datetime")
        local = after.astimezone(self.zone)
        wall = local.replace(tzinfo=None)
        if local.fold == 1 and _at(wall, self.zone, 0) < after:
            # `after` is in the second pass of a repeated hour: every wall time from here to the end
            # of the repetition already fired on the first pass
            start = self._end_of_repeat(wall)
        else:
            start = wall.replace(microsecond=0) + _ONE_SECOND
        while True:
            candidate = self._next_wall(start)
            if candidate is None:
                return None
            instant = self._instant(candidate)
            if instant > after:
                return instant
            start = candidate + _ONE_SECOND

    def fires(
        self, after: datetime, until: datetime | None = None, limit: int | None = None
    ) -> Iterator[datetime]:
        """Fire instants in (after, until], in order, at most `limit` of them."""
        count = 0
        current = after
        while limit is None or count < limit:
            fire = self.next_fire(current)
            if fire is None or (until is not None and fire > until):
                return
            yield fire
            count += 1
            current = fire

    def count_fires(self, after: datetime, until: datetime, cap: int = MISSED_FIRES_CAP) -> int:
        """How many fires fall in (after, until], counting no further than `cap`."""
        return sum(1 for _ in self.fires(after, until, limit=cap))

    def latest_fire(self, after: datetime, until: datetime) -> datetime | None:
        """The last fire instant in (after, until], or None. Searches backwards from `until` in
        doubling windows, then bisects: cheap even for a per-second schedule and a long outage."""
        if until <= after:
            return None
        window = _ONE_SECOND
        while True:
            start = max(until - window, after)
            fire = self.next_fire(start)
            if fire is not None and fire <= until:
                break
            if start == after:
                return None
            window *= 2
        # next_fire(start) <= until < next_fire(until): bisect to the last start that still fires in time
        low, high = start, until
        while high - low > _ONE_SECOND:
            middle = low + (high - low) / 2
            probe = self.next_fire(middle)
            if probe is not None and probe <= until:
                low = middle
            else:
                high = middle
        return self.next_fire(low)

    def preview(self, after: datetime, count: int) -> Sequence[datetime]:
        return list(self.fires(after, limit=count))
