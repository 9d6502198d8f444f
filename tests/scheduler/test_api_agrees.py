"""What the API accepts as a schedule is exactly what the scheduler can fire (one parser, in contracts)."""

from __future__ import annotations

import pytest
from rahatback_api.backups.schedule import check_cron
from rahatback_scheduler.cron import CronError, crontab_triggers

EXPRESSIONS = [
    "0 3 * * *",
    "*/5 * * * *",
    "* * * * * */2",
    "@daily",
    "0 9 * * mon-fri",
    "0 0 1,15 * 0",
    "0 0 29 2 *",
    "0 0 L * *",
    "0 0 31 2 *",
    "0 0 31 4,6,9,11 *",
    "5-5 * * * *",
    "0 3 * * 1#2",
    "0 3 15W * *",
    "H * * * *",
    "61 * * * *",
    "0 24 * * *",
    "every day",
    "* * * *",
]


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_the_api_accepts_exactly_what_the_scheduler_can_fire(expression: str) -> None:
    try:
        check_cron(expression)
        api_accepts = True
    except ValueError:
        api_accepts = False
    try:
        scheduler_can = bool(crontab_triggers(expression))
    except CronError:
        scheduler_can = False
    assert api_accepts == scheduler_can
