"""Crontab expressions → APScheduler cron triggers, and DST-correct fire times. Pure: no I/O, no clock.

The API validates a schedule's `cron` with croniter, so this module reads crontab the way croniter
does (standard 5 fields, day of week 0 and 7 = Sunday, names, croniter's optional 6th field =
seconds and 7th = year, day-of-month OR day-of-week when both are restricted) and refuses, with a
`CronError` that says why, the few croniter forms it cannot honour faithfully.

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

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped]  # APScheduler 3 ships no type hints

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
_WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = Sunday
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_WEEKDAYS = {d: i for i, d in enumerate(_WEEKDAY_NAMES)}

_ALIASES = {
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

# croniter splits on ASCII whitespace only: a no-break space is part of a field (and makes it invalid)
_FIELD_TOKEN = re.compile(r"[^ \t\n\r\f\v]+")
_RANGE = re.compile(r"^([^-]+)-([^-/]+)(/(\d+))?$", re.ASCII)
_START_STEP = re.compile(r"^(.+)/(.+)$", re.ASCII)
_INT = re.compile(r"^\d+$", re.ASCII)
_NTH_WEEKDAY = re.compile(r"#|^l\d+$", re.ASCII)
_NEAREST_WEEKDAY = re.compile(r"^(\d+w|w\d+)$", re.ASCII)
_HASHED = re.compile(r"^[hr](\(|/|$)", re.ASCII)


class CronError(ValueError):
    """The expression or time zone cannot be scheduled; the message says what to change."""


@dataclass(frozen=True)
class _Field:
    label: str  # as a person calls it, for error messages
    trigger_arg: str  # CronTrigger's keyword
    low: int
    high: int
    names: dict[str, int]


_MINUTE = _Field("minute", "minute", 0, 59, {})
_HOUR = _Field("hour", "hour", 0, 23, {})
_DAY = _Field("day of month", "day", 1, 31, {})
_MONTH = _Field("month", "month", 1, 12, _MONTHS)
_DOW = _Field("day of week", "day_of_week", 0, 6, _WEEKDAYS)
_SECOND = _Field("second", "second", 0, 59, {})
_YEAR = _Field("year", "year", 1970, 2099, {})
_FIELDS = (_MINUTE, _HOUR, _DAY, _MONTH, _DOW, _SECOND, _YEAR)
_DAY_INDEX, _DOW_INDEX = 2, 4

# the expansion of one field: None = every value ("*"), else the sorted values ("l" = last day of month)
Values = tuple[int | str, ...] | None


def _number(field: _Field, token: str, expr: str) -> int:
    if _INT.match(token):
        return int(token)
    if token in field.names:
        return field.names[token]
    raise CronError(f"{expr!r}: {token!r} is not a valid {field.label}")


def _out_of_range(expr: str, item: str, field: _Field) -> CronError:
    return CronError(f"{expr!r}: {item!r} is out of range for the {field.label} ({field.low}-{field.high})")


def _weekday_alias(field: _Field, value: int) -> int:
    return 0 if field is _DOW and value == 7 else value


def _expand_range(field: _Field, item: str, expr: str) -> list[int | str] | None:
    """`a-b`, `a-b/s`, `*/s` and `a/s` as croniter expands them; None if `item` is not a range."""
    token = re.sub(r"^\*(/.+)$", rf"{field.low}-{field.high}\1", item)
    match = _RANGE.search(token)
    start_with_step = False
    if not match:
        token = _START_STEP.sub(rf"\1-{field.high}/\2", token)
        match = _RANGE.search(token)
        start_with_step = bool(match)
    if not match:
        return None
    low_token, high_token, step_token = match.group(1), match.group(2), match.group(4) or "1"
    if field is _DAY and high_token == "l":  # noqa: S105 - "L" = last day of month, not a password
        high_token = str(_DAY.high)
    written_low, written_high = _number(field, low_token, expr), _number(field, high_token, expr)
    step = int(step_token)
    if step == 0:
        raise CronError(f"{expr!r}: a step of 0 in the {field.label} field never advances")
    if written_low == written_high and not start_with_step:
        # croniter reads an equal range ("5-5", "mon-mon") as the WHOLE field, standard cron as one
        # value: refuse rather than pick one and surprise somebody
        raise CronError(
            f"{expr!r}: the range {item!r} in the {field.label} field starts and ends on the same "
            f"value; write the single value {low_token!r} (or '*' for every {field.label})"
        )
    low, high = _weekday_alias(field, written_low), _weekday_alias(field, written_high)
    if max(low, high) > field.high or min(written_low, written_high) < field.low:
        raise _out_of_range(expr, item, field)
    if start_with_step and low == high:  # "59/15": the start is the field's last value
        return [low]
    if low == high:  # only "0-7" / "sun-7" in the day of week get here: every day
        low, high = field.low, field.high
    if low > high:  # wraps around, e.g. "fri-mon" or "22-2"; croniter's phase rule for steps
        whole = list(range(field.low, field.high + 1))
        values = list(range(low, field.high + 1, step))
        to_skip = 0
        if values:
            already_skipped = whole[::-1].index(values[-1])
            position = whole.index(values[-1])
            if position + step > len(whole) and already_skipped < step:
                to_skip = step - already_skipped
        values += range(field.low + to_skip, high + 1, step)
        return list(values)
    return list(range(low, high + 1, step))


def _expand_field(field: _Field, raw: str, expr: str) -> list[int | str]:
    if "?" in raw:
        if raw != "?" or field not in (_DAY, _DOW):
            raise CronError(f"{expr!r}: '?' stands alone and only in the day-of-month or day-of-week field")
        return ["*"]
    values: list[int | str] = []
    for item in raw.split(","):
        if _HASHED.match(item):
            raise CronError(f"{expr!r}: hashed/random values ({item!r}) are not supported")
        if field is _DOW and _NTH_WEEKDAY.search(item):
            raise CronError(f"{expr!r}: nth/last weekday ({item!r}) is not supported; use day of month")
        if field is _DAY and _NEAREST_WEEKDAY.match(item):
            raise CronError(f"{expr!r}: nearest weekday ({item!r}) is not supported")
        expanded = _expand_range(field, item, expr)
        if expanded is not None:
            values.extend(expanded)
            continue
        if item == "*" or (field is _DAY and item == "l"):
            values.append(item)
            continue
        if item.startswith("-") or not item:
            raise CronError(f"{expr!r}: {item!r} is not a valid {field.label}")
        value = _weekday_alias(field, _number(field, item, expr))
        if not field.low <= value <= field.high:
            raise _out_of_range(expr, item, field)
        values.append(value)
    return values


def _sort_key(value: int | str) -> str:
    return f"{value:02}" if isinstance(value, int) else value


def expand_crontab(expr: str) -> tuple[Values, ...]:
    """The seven fields (minute, hour, day, month, day of week, second, year) as croniter expands
    them; None = unrestricted. A 5-field expression fires at second 0."""
    text = expr.strip().lower()
    text = _ALIASES.get(text, text)
    raw_fields = _FIELD_TOKEN.findall(text)
    if len(raw_fields) not in (5, 6, 7):
        raise CronError(
            f"{expr!r}: a cron expression has 5 fields (minute hour day-of-month month day-of-week), "
            f"optionally a 6th (seconds) and 7th (year); got {len(raw_fields)}"
        )
    if len(raw_fields) == 5:
        raw_fields.append("0")
    expanded: list[Values] = []
    for index, (field, raw) in enumerate(zip(_FIELDS, raw_fields, strict=False)):
        values = sorted(set(_expand_field(field, raw, expr)), key=_sort_key)
        full = field.high - field.low + 1
        if len(values) == full:
            # croniter: a complete day-of-month (day-of-week) list still counts as a restriction when
            # the other day field has no '*' in it, which matters for the OR rule below
            other = raw_fields[_DOW_INDEX] if index == _DAY_INDEX else raw_fields[_DAY_INDEX]
            if index not in (_DAY_INDEX, _DOW_INDEX) or "*" in other:
                values = ["*"]
        expanded.append(None if values == ["*"] or "*" in values else tuple(values))
    if len(expanded) == 6:
        expanded.append(None)
    return tuple(expanded)


def _as_trigger_arg(field: _Field, values: Values) -> str:
    if values is None:
        return "*"
    numbers = sorted(v for v in values if isinstance(v, int))
    parts: list[str] = []
    if field is _DOW:
        parts = [_WEEKDAY_NAMES[v] for v in numbers]
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
        "second": _as_trigger_arg(_SECOND, second),
        "minute": _as_trigger_arg(_MINUTE, minute),
        "hour": _as_trigger_arg(_HOUR, hour),
        "month": _as_trigger_arg(_MONTH, month),
        "year": _as_trigger_arg(_YEAR, year),
        "timezone": UTC,
    }
    both_restricted = day is not None and dow is not None
    sides: list[tuple[Values, Values]] = [(day, None), (None, dow)] if both_restricted else [(day, dow)]
    triggers = tuple(
        CronTrigger(day=_as_trigger_arg(_DAY, d), day_of_week=_as_trigger_arg(_DOW, w), **common)
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
