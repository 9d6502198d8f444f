"""The scheduler against a real nats-server: KV SCHEDULES in, backup.requested in CONTROL out."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import schedule_key, scheduled_msg_id
from rahatback_scheduler.metrics import Metrics

from tests.scheduler.conftest import Bus, RunScheduler, Seen, bucket, fire_seconds
from tests.servers import NatsServer, start_nats

pytestmark = pytest.mark.integration

TWO_SECONDS = timedelta(seconds=2)


def fire_times(seen: list[Seen]) -> list[datetime]:
    return [s.request.fire_time for s in seen]


def metric_value(body: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


async def test_a_schedule_fires_requests_with_their_msg_ids(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    metrics = Metrics()
    port = metrics.serve("127.0.0.1", 0)
    try:
        async with run_scheduler(metrics=metrics):
            await bus.put_schedule(job_id, "* * * * * */2", org_id="org-1")
            seen = await bus.wait_for(job_id, lambda s: len(s) >= 4)
            async with httpx.AsyncClient() as client:
                body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    finally:
        metrics.close()
    assert len(seen) >= 4
    for s in seen:
        assert s.msg_id == scheduled_msg_id("backup", job_id, s.request.fire_time)
        assert s.msg_id.startswith(f"sched:{job_id}:")
        assert s.subject == subjects.BACKUP_REQUESTED
        assert (s.request.org_id, s.request.missed, s.request.missed_fires) == ("org-1", False, 0)
        assert s.request.fire_time.second % 2 == 0 and s.request.fire_time.microsecond == 0
    times = fire_times(seen)
    assert all(b - a == TWO_SECONDS for a, b in itertools.pairwise(times)), times  # none lost, none doubled
    assert metric_value(body, "rahatback_scheduler_fires_total", {"kind": "backup"}) >= 3
    assert metric_value(body, "rahatback_scheduler_schedules_loaded") >= 1


async def test_verify_schedules_fire_verify_requested(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    async with run_scheduler():
        await bus.put_schedule(job_id, "* * * * * */2", kind="verify")
        seen = await bus.wait_for(job_id, lambda s: len(s) >= 2, subject=subjects.VERIFY_REQUESTED)
    assert len(seen) >= 2
    assert all(s.msg_id == scheduled_msg_id("verify", job_id, s.request.fire_time) for s in seen)
    assert seen[0].msg_id.startswith(f"sched-verify:{job_id}:")
    assert await bus.requests(job_id) == []  # nothing on backup.requested


async def test_changes_take_effect_without_a_restart(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    async with run_scheduler():
        await bus.put_schedule(job_id, "* * * * * */2")  # even seconds
        await bus.wait_for(job_id, lambda s: len(s) >= 2)

        changed_at = datetime.now(UTC)
        await bus.put_schedule(job_id, "* * * * * 1-59/2")  # odd seconds
        seen = await bus.wait_for(job_id, lambda s: sum(sec % 2 for sec in fire_seconds(s)) >= 3)
        after_change = [s for s in seen if s.request.fire_time > changed_at + TWO_SECONDS]
        assert len(after_change) >= 2
        assert all(s.request.fire_time.second % 2 == 1 for s in after_change), fire_times(seen)

        await bus.put_schedule(job_id, "* * * * * 1-59/2", enabled=False)
        disabled_at = datetime.now(UTC)
        await asyncio.sleep(4)
        seen = await bus.requests(job_id)
        assert [s for s in seen if s.request.fire_time > disabled_at + TWO_SECONDS] == []

        # enabled again: fires resume, and the disabled stretch is owed to nobody (no missed run)
        before = len(seen)
        await bus.put_schedule(job_id, "* * * * * */2")
        seen = await bus.wait_for(job_id, lambda s: len(s) >= before + 2)
        resumed = seen[before:]
        assert len(resumed) >= 2
        assert not any(s.request.missed for s in resumed)

        await bus.delete_schedule(job_id)
        deleted_at = datetime.now(UTC)
        await asyncio.sleep(4)
        seen = await bus.requests(job_id)
        assert [s for s in seen if s.request.fire_time > deleted_at + TWO_SECONDS] == []
    assert len(fire_times(seen)) == len(set(fire_times(seen)))


# --- the misfire rule ---------------------------------------------------------------------------


def daily_at(fire: datetime) -> str:
    return f"{fire.minute} {fire.hour} * * * {fire.second}"  # croniter's 6th field: seconds


async def remember(bus: Bus, job_id: str, last_fire: datetime) -> None:
    await bus.state.put(schedule_key("backup", job_id), last_fire.isoformat().encode())


async def settle(bus: Bus, job_id: str, expected: int) -> list[Seen]:
    """Wait for `expected` requests, then a little longer: anything more would be a double."""
    await bus.wait_for(job_id, lambda s: len(s) >= expected)
    await asyncio.sleep(3)
    return await bus.requests(job_id)


async def test_downtime_beyond_grace_is_one_missed_request(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=60)
    await remember(bus, job_id, fire - timedelta(days=3))  # last fired three days ago
    await bus.put_schedule(job_id, daily_at(fire), updated_at=fire - timedelta(days=30))
    # two replicas start at once: still one request
    async with run_scheduler(misfire_grace_seconds=5), run_scheduler(misfire_grace_seconds=5):
        seen = await settle(bus, job_id, 1)
    assert len(seen) == 1
    request = seen[0].request
    assert (request.missed, request.missed_fires, request.fire_time) == (True, 3, fire)
    assert seen[0].msg_id == scheduled_msg_id("backup", job_id, fire)
    state = await bus.state.get(schedule_key("backup", job_id))
    assert datetime.fromisoformat((state.value or b"").decode()) == fire


async def test_downtime_within_grace_runs_the_fire_once(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    await remember(bus, job_id, fire - timedelta(days=1))  # only today's fire is owed
    await bus.put_schedule(job_id, daily_at(fire), updated_at=fire - timedelta(days=30))
    async with run_scheduler():  # grace: the default 300 s
        seen = await settle(bus, job_id, 1)
    assert [(s.msg_id, s.request.missed, s.request.fire_time) for s in seen] == [
        (scheduled_msg_id("backup", job_id, fire), False, fire)
    ]


async def test_older_misses_are_reported_besides_the_fire_within_grace(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    await remember(bus, job_id, fire - timedelta(days=3))
    await bus.put_schedule(job_id, daily_at(fire), updated_at=fire - timedelta(days=30))
    async with run_scheduler():
        seen = await settle(bus, job_id, 2)
    yesterday = fire - timedelta(days=1)
    assert [(s.request.fire_time, s.request.missed, s.request.missed_fires) for s in seen] == [
        (yesterday, True, 2),
        (fire, False, 0),
    ]


async def test_a_disabled_schedule_neither_fires_nor_catches_up(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    await remember(bus, job_id, fire - timedelta(days=3))
    await bus.put_schedule(job_id, daily_at(fire), updated_at=fire - timedelta(days=30), enabled=False)
    other = job_id[::-1]  # an enabled twin proves the scheduler was up and catching up meanwhile
    await remember(bus, other, fire - timedelta(days=3))
    await bus.put_schedule(other, daily_at(fire), updated_at=fire - timedelta(days=30))
    async with run_scheduler():
        await settle(bus, other, 2)
    assert len(await bus.requests(other)) == 2
    assert await bus.requests(job_id) == []


# --- processes and restarts ---------------------------------------------------------------------


def _events(log: Path) -> list[dict[str, object]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


async def _wait_for_log(log: Path, event: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a deadline
    deadline = time.monotonic() + timeout
    while not any(e.get("event") == event for e in await asyncio.to_thread(_events, log)):
        assert time.monotonic() < deadline, f"{log.name} never logged {event!r}"
        await asyncio.sleep(0.2)


def _start_scheduler_process(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """The console script's module, as `rahatback-scheduler run` runs it."""
    with log.open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "rahatback_scheduler.main", "run"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )


async def test_two_scheduler_processes_publish_each_fire_once(
    bus: Bus, job_id: str, nats_server: NatsServer, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "RAHATBACK_SCHEDULER_NATS_URL": nats_server.url,
        "RAHATBACK_SCHEDULER_LOG_FORMAT": "json",
        "RAHATBACK_SCHEDULER_LOG_LEVEL": "debug",
    }
    logs = [tmp_path / f"scheduler-{i}.log" for i in range(2)]
    processes = [_start_scheduler_process(env, log) for log in logs]
    try:
        for log in logs:
            await _wait_for_log(log, "watch.synced")
        await bus.put_schedule(job_id, "* * * * * */2")
        seen = await bus.wait_for(job_id, lambda s: len(s) >= 5, timeout=40)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(process.wait, 30) for process in processes]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]

    times = fire_times(seen)
    assert len(times) >= 5
    assert len(times) == len(set(times)) and len(seen) == len({s.msg_id for s in seen})
    assert all(b - a == TWO_SECONDS for a, b in itertools.pairwise(times)), times

    # both replicas fired the same times; JetStream stored each once and told the other "duplicate"
    def attempts(log: Path, event: str) -> set[str]:
        return {
            str(e["msg_id"]) for e in _events(log) if e.get("event") == event and job_id in str(e["msg_id"])
        }

    stored = [attempts(log, "fire.published") for log in logs]
    refused = [attempts(log, "fire.duplicate") for log in logs]
    assert stored[0].isdisjoint(stored[1])
    assert (stored[0] | stored[1]) == {s.msg_id for s in seen}
    both_fired = (stored[0] | refused[0]) & (stored[1] | refused[1])
    assert len(both_fired) >= 3, (stored, refused)
    assert all(msg_id in refused[0] | refused[1] for msg_id in both_fired)


async def test_fires_continue_after_nats_restarts(
    tmp_path: Path, job_id: str, run_scheduler: RunScheduler
) -> None:
    server = start_nats(tmp_path / "nats")
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        bus = Bus(nc, js, await bucket(js, streams.SCHEDULES), await bucket(js, streams.SCHEDULER_STATE), [])
        async with run_scheduler(url=server.url):
            await bus.put_schedule(job_id, "* * * * * */2")
            await bus.wait_for(job_id, lambda s: len(s) >= 2)
            await nc.close()

            server.stop()
            await asyncio.sleep(3)
            server = start_nats(tmp_path / "nats", port=server.port)  # same store: streams and KV survive
            restarted_at = datetime.now(UTC)

            nc = await nats.connect(server.url)
            js = nc.jetstream()
            bus = Bus(
                nc, js, await bucket(js, streams.SCHEDULES), await bucket(js, streams.SCHEDULER_STATE), []
            )
            seen = await bus.wait_for(job_id, lambda s: sum(t > restarted_at for t in fire_times(s)) >= 2)
            assert sum(t > restarted_at for t in fire_times(seen)) >= 2

            # the watch was re-established: a change still takes effect
            changed_at = datetime.now(UTC)
            await bus.put_schedule(job_id, "* * * * * 1-59/2")
            seen = await bus.wait_for(
                job_id,
                lambda s: sum(t > changed_at + TWO_SECONDS and t.second % 2 == 1 for t in fire_times(s)) >= 2,
            )
            after_change = [t for t in fire_times(seen) if t > changed_at + TWO_SECONDS]
            assert len(after_change) >= 2 and all(t.second % 2 == 1 for t in after_change), after_change
            await bus.delete_schedule(job_id)
        await nc.drain()
    finally:
        server.stop()
    times = fire_times(seen)
    assert len(times) == len(set(times)), times


async def test_a_stalled_process_reports_one_missed_run_instead_of_a_burst(
    bus: Bus, job_id: str, run_scheduler: RunScheduler
) -> None:
    async with run_scheduler(misfire_grace_seconds=1):
        await bus.put_schedule(job_id, "* * * * * *")  # every second
        await bus.wait_for(job_id, lambda s: len(s) >= 2)
        stalled_from = datetime.now(UTC)
        time.sleep(5)  # noqa: ASYNC251 - the point: the whole process stands still, as if suspended
        resumed_at = datetime.now(UTC)
        seen = await bus.wait_for(job_id, lambda s: sum(t > resumed_at for t in fire_times(s)) >= 2)
    times = fire_times(seen)
    assert len(times) == len(set(times))
    during = [s for s in seen if stalled_from + timedelta(seconds=1) < s.request.fire_time <= resumed_at]
    missed = [s for s in seen if s.request.missed]
    assert len(missed) == 1, [(s.request.fire_time, s.request.missed) for s in seen]
    assert missed[0].request.missed_fires >= 2
    assert len(during) <= 2, [(s.request.fire_time, s.request.missed) for s in during]  # never one per fire
    assert sum(t > resumed_at for t in times) >= 2  # and then on time again
