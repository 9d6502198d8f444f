"""Schedule validation: cron expressions (the scheduler's own parser) and IANA time zones."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rahatback_contracts.cron import CronError
from rahatback_contracts.cron import check_cron as parse_cron


def check_cron(expression: str) -> str:
    try:
        return parse_cron(expression)
    except CronError as exc:
        # the parser's message says what is wrong; add what a good one looks like
        raise ValueError(f"{exc} (e.g. '0 3 * * *' for 03:00 every day)") from None


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. 'Europe/Istanbul')") from None
    return name
