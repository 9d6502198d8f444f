"""`rahatback-scheduler next`: preview an expression's fire times in its time zone."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from rahatback_scheduler.main import main


def test_next_prints_local_fire_times(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["next", "30 2 * * 1-5", "--tz", "Europe/Berlin", "-n", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    for line in lines:
        fire = datetime.fromisoformat(line.split()[0])
        local = fire.astimezone(ZoneInfo("Europe/Berlin"))
        assert local.isoweekday() <= 5  # Monday to Friday, crontab numbering
        assert (local.hour, local.minute) in {(2, 30), (3, 0)}  # 03:00 only on a spring-forward day


def test_next_refuses_what_it_cannot_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["next", "0 0 * * 5#2"]) == 2
    assert "nth/last weekday" in capsys.readouterr().err
