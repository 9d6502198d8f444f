"""Schedule validation: cron expressions and IANA time zones."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter  # type: ignore[import-untyped]  # croniter ships no type hints


def check_cron(expression: str) -> str:
    expression = " ".join(expression.split())
    if not croniter.is_valid(expression):
        raise ValueError(f"{expression!r} is not a valid cron expression (e.g. '0 3 * * *')")
    return expression


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. 'Europe/Istanbul')") from None
    return name
