"""Cron expressions as RahatBack reads them: one parser for the API (validation) and the scheduler.

Standard 5-field crontab (minute hour day-of-month month day-of-week; day of week 0 and 7 = Sunday;
names like `mon-fri`, `jan`; `@daily` and friends), croniter's optional 6th field = seconds and 7th
= year, and day-of-month OR day-of-week when both are restricted. Forms that cannot be honoured
faithfully (`5#2`, `L5`, `15W`, hashed `H`/`R`, a range like `5-5` that croniter reads as "every",
dates that never happen such as `0 0 31 2 *`) are refused with a `CronError` that says why.
Pure: no I/O, standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DAY_INDEX",
    "DOW_INDEX",
    "FIELDS",
    "WEEKDAY_NAMES",
    "CronError",
    "CronField",
    "Values",
    "check_cron",
    "expand_crontab",
]

WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # crontab numbering: 0 = Sunday
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTHS = {m: i for i, m in enumerate(_MONTH_NAMES, 1)}
_WEEKDAYS = {d: i for i, d in enumerate(WEEKDAY_NAMES)}

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
class CronField:
    label: str  # as a person calls it, for error messages
    trigger_arg: str  # CronTrigger's keyword
    low: int
    high: int
    names: dict[str, int]


_MINUTE = CronField("minute", "minute", 0, 59, {})
_HOUR = CronField("hour", "hour", 0, 23, {})
_DAY = CronField("day of month", "day", 1, 31, {})
_MONTH = CronField("month", "month", 1, 12, _MONTHS)
_DOW = CronField("day of week", "day_of_week", 0, 6, _WEEKDAYS)
_SECOND = CronField("second", "second", 0, 59, {})
_YEAR = CronField("year", "year", 1970, 2099, {})
FIELDS = (_MINUTE, _HOUR, _DAY, _MONTH, _DOW, _SECOND, _YEAR)
DAY_INDEX, DOW_INDEX = 2, 4

# the expansion of one field: None = every value ("*"), else the sorted values ("l" = last day of month)
Values = tuple[int | str, ...] | None


def _number(field: CronField, token: str, expr: str) -> int:
    if _INT.match(token):
        return int(token)
    if token in field.names:
        return field.names[token]
    raise CronError(f"{expr!r}: {token!r} is not a valid {field.label}")


def _out_of_range(expr: str, item: str, field: CronField) -> CronError:
    return CronError(f"{expr!r}: {item!r} is out of range for the {field.label} ({field.low}-{field.high})")


def _weekday_alias(field: CronField, value: int) -> int:
    return 0 if field is _DOW and value == 7 else value


def _expand_range(field: CronField, item: str, expr: str) -> list[int | str] | None:
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


def _expand_field(field: CronField, raw: str, expr: str) -> list[int | str]:
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
    for index, (field, raw) in enumerate(zip(FIELDS, raw_fields, strict=False)):
        values = sorted(set(_expand_field(field, raw, expr)), key=_sort_key)
        full = field.high - field.low + 1
        if len(values) == full:
            # croniter: a complete day-of-month (day-of-week) list still counts as a restriction when
            # the other day field has no '*' in it, which matters for the OR rule below
            other = raw_fields[DOW_INDEX] if index == DAY_INDEX else raw_fields[DAY_INDEX]
            if index not in (DAY_INDEX, DOW_INDEX) or "*" in other:
                values = ["*"]
        expanded.append(None if values == ["*"] or "*" in values else tuple(values))
    if len(expanded) == 6:
        expanded.append(None)
    return tuple(expanded)


_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def check_cron(expr: str) -> str:
    """The expression with its whitespace normalised, or CronError saying what to change
    (including a date that never comes, such as `0 0 31 2 *`)."""
    _, _, days, months, weekdays, _, _ = expand_crontab(expr)
    if days is not None and weekdays is None:
        month_numbers = [m for m in months or range(1, 13) if isinstance(m, int)]
        if not any(
            d == "l" or (isinstance(d, int) and any(d <= _DAYS_IN_MONTH[m - 1] for m in month_numbers))
            for d in days
        ):
            raise CronError(f"{expr!r}: that day of the month never occurs in the chosen month(s)")
    return " ".join(expr.split())
