"""Retention selection: properties over generated histories and policies, plus worked examples."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rahatback_api.retention.policy import Backup, Policy, expired

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
ISTANBUL = ZoneInfo("Europe/Istanbul")

limits = st.none() | st.integers(min_value=1, max_value=12)
policies = st.builds(
    Policy,
    keep_last=limits,
    keep_days=limits,
    keep_daily=limits,
    keep_weekly=limits,
    keep_monthly=limits,
    keep_yearly=limits,
)
histories = st.lists(
    st.integers(min_value=0, max_value=3 * 365 * 24 * 60),  # minutes before NOW
    min_size=0,
    max_size=60,
    unique=True,
).map(lambda ages: [Backup(f"b{age}", NOW - timedelta(minutes=age)) for age in ages])


def newest(backups: list[Backup]) -> Backup:
    return max(backups, key=lambda b: (b.finished_at, b.id))


@settings(max_examples=300)
@given(histories, policies)
def test_expires_only_known_backups_and_never_the_newest(backups: list[Backup], policy: Policy) -> None:
    gone = expired(backups, policy, NOW, ISTANBUL)
    assert gone <= {b.id for b in backups}
    if backups:
        assert newest(backups).id not in gone


@given(histories)
def test_no_rule_keeps_everything(backups: list[Backup]) -> None:
    assert expired(backups, Policy(), NOW, ISTANBUL) == set()


@settings(max_examples=300)
@given(histories, policies)
def test_keep_last_and_keep_days_are_honoured(backups: list[Backup], policy: Policy) -> None:
    gone = expired(backups, policy, NOW, ISTANBUL)
    ordered = sorted(backups, key=lambda b: (b.finished_at, b.id), reverse=True)
    if policy.keep_last:
        assert not gone & {b.id for b in ordered[: policy.keep_last]}
    if policy.keep_days:
        recent = {b.id for b in backups if b.finished_at >= NOW - timedelta(days=policy.keep_days)}
        assert not gone & recent


@settings(max_examples=300)
@given(histories, policies)
def test_each_kept_daily_bucket_keeps_its_newest_backup(backups: list[Backup], policy: Policy) -> None:
    gone = expired(backups, policy, NOW, ISTANBUL)
    days: dict[object, Backup] = {}
    for b in backups:
        day = b.finished_at.astimezone(ISTANBUL).date()
        if day not in days or (b.finished_at, b.id) > (days[day].finished_at, days[day].id):
            days[day] = b
    recent_days = sorted(days, reverse=True)[: policy.keep_daily or 0]
    assert not gone & {days[d].id for d in recent_days}


@settings(max_examples=300)
@given(histories, policies, st.sampled_from(["keep_last", "keep_days", "keep_daily", "keep_weekly"]))
def test_a_more_generous_policy_never_expires_more(backups: list[Backup], policy: Policy, rule: str) -> None:
    current = getattr(policy, rule)
    assume(current is not None)  # adding a first rule is not "more generous": no rule keeps everything
    generous = replace(policy, **{rule: current + 3})
    assert expired(backups, generous, NOW, ISTANBUL) <= expired(backups, policy, NOW, ISTANBUL)


@settings(max_examples=300)
@given(histories, policies)
def test_applying_the_policy_again_expires_nothing_more(backups: list[Backup], policy: Policy) -> None:
    gone = expired(backups, policy, NOW, ISTANBUL)
    kept = [b for b in backups if b.id not in gone]
    assert expired(kept, policy, NOW, ISTANBUL) == set()


def test_gfs_example_in_the_jobs_time_zone() -> None:
    # one backup a day at 22:30 UTC (01:30 the next day in Istanbul) for 60 days
    backups = [Backup(f"d{i}", NOW.replace(hour=22, minute=30) - timedelta(days=i + 1)) for i in range(60)]
    gone = expired(backups, Policy(keep_daily=7, keep_weekly=4, keep_monthly=2), NOW, ISTANBUL)
    kept = sorted((b for b in backups if b.id not in gone), key=lambda b: b.finished_at, reverse=True)
    assert [b.id for b in kept[:7]] == [f"d{i}" for i in range(7)]  # the last seven days
    local_days = [b.finished_at.astimezone(ISTANBUL) for b in kept]
    # beyond the dailies: the newest of each older ISO week and month (Istanbul dates, not UTC)
    assert len(kept) < len(backups)
    assert all(d.hour == 1 and d.minute == 30 for d in local_days)
    weeks = {tuple(d.isocalendar())[:2] for d in local_days}
    assert len(weeks) >= 4


def test_keep_last_one_keeps_only_the_newest() -> None:
    backups = [Backup(f"r{i}", NOW - timedelta(hours=i)) for i in range(5)]
    assert expired(backups, Policy(keep_last=1), NOW, ISTANBUL) == {"r1", "r2", "r3", "r4"}
