"""GET /metrics of the API: per-job backup state after reports are applied, agents, consumer lag and
HTTP latency, scraped from the real app (SQLite and PostgreSQL, real nats-server) and parsed with
prometheus_client's own text parser."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from rahatback_api import metrics as api_metrics
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.models import Agent, BackupJob
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.api.conftest import Tenant, create_job
from tests.api.test_operations import add_agent, apply, completed, run_now

Samples = list[tuple[str, dict[str, str], float]]


async def scrape(client: httpx.AsyncClient) -> tuple[str, Samples]:
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    ]
    return r.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def absent(samples: Samples, name: str, **labels: str) -> bool:
    return not [v for n, lab, v in samples if n == name and labels.items() <= lab.items()]


async def test_a_completed_backup_shows_its_job_state_without_run_ids(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant, name="shop-nightly")
    report = completed(agent.id, run["id"], dump_size=123_456, artifact_size=45_678)
    subject = subjects.agent_report(agent.id, "backup", "completed")
    assert await apply(sessionmaker, subject, report, f"{run['id']}:completed") is True

    text, samples = await scrape(client)
    job = {"job_id": run["job_id"], "job_name": "shop-nightly", "org_id": tenant.org_id}
    last_success = value(samples, "rahatback_backup_last_success_timestamp_seconds", **job)
    assert last_success == pytest.approx(report.finished_at.timestamp(), abs=0.001)
    assert value(samples, "rahatback_backup_last_success_dump_bytes", **job) == 123_456
    assert value(samples, "rahatback_backup_last_success_artifact_bytes", **job) == 45_678
    assert value(samples, "rahatback_backup_last_success_duration_seconds", **job) == pytest.approx(3.0)
    assert value(samples, "rahatback_backup_last_run_duration_seconds", **job) == pytest.approx(3.0)
    assert value(samples, "rahatback_backup_last_run_status", status="completed", **job) == 1
    assert value(samples, "rahatback_backup_last_run_status", status="failed", **job) == 0
    assert value(samples, "rahatback_backup_runs_total", status="completed", **job) == 1
    assert value(samples, "rahatback_backup_runs_total", status="failed", **job) == 0
    assert value(samples, "rahatback_backup_dump_bytes_total", **job) == 123_456
    assert value(samples, "rahatback_backup_overdue", **job) == 0
    assert absent(samples, "rahatback_backup_last_verification_timestamp_seconds")
    assert "# TYPE rahatback_backup_last_verification_timestamp_seconds gauge" in text

    assert value(samples, "rahatback_agent_online", agent_id=agent.id, org_id=tenant.org_id) == 1
    assert value(samples, "rahatback_agents", org_id=tenant.org_id, state="online") == 1
    assert value(samples, "rahatback_api_metrics_source_up", source="database") == 1
    assert value(samples, "rahatback_api_metrics_source_up", source="nats") == 1
    for consumer in ("api-reports", "api-control", "notifier"):
        assert value(samples, "rahatback_nats_consumer_pending_messages", consumer=consumer) >= 0
        assert value(samples, "rahatback_nats_consumer_redelivered_messages", consumer=consumer) >= 0
        assert value(samples, "rahatback_nats_consumer_ack_pending_messages", consumer=consumer) >= 0

    # bounded labels: the run id is nowhere, and routes are templates, not paths with ids in them;
    # no label Prometheus attaches itself (it would rename ours to exported_job)
    assert run["id"] not in text
    assert not [labels for _, labels, _ in samples if {"job", "instance"} & labels.keys()]
    routes = {lab["route"] for n, lab, _ in samples if n.startswith("rahatback_http_request_duration")}
    assert "/v1/backups/jobs/{job_id}/run" in routes
    assert not [route for route in routes if run["job_id"] in route]
    assert (
        value(
            samples,
            "rahatback_http_request_duration_seconds_count",
            method="POST",
            route="/v1/backups/jobs/{job_id}/run",
            status_class="2xx",
        )
        == 1
    )


async def test_a_failed_run_and_an_offline_agent(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant)
    failed = m.BackupFailed(agent_id=agent.id, occurred_at=utcnow(), run_id=run["id"], error="disk full")
    subject = subjects.agent_report(agent.id, "backup", "failed")
    assert await apply(sessionmaker, subject, failed, f"{run['id']}:failed") is True
    async with session_scope(sessionmaker) as session:
        stored = await session.get(Agent, agent.id)
        assert stored is not None
        stored.last_seen_at = utcnow() - timedelta(hours=1)

    _, samples = await scrape(client)
    job = {"job_id": run["job_id"]}
    assert value(samples, "rahatback_backup_last_run_status", status="failed", **job) == 1
    assert value(samples, "rahatback_backup_last_run_status", status="completed", **job) == 0
    assert value(samples, "rahatback_backup_runs_total", status="failed", **job) == 1
    assert absent(samples, "rahatback_backup_last_success_timestamp_seconds", **job)
    assert absent(samples, "rahatback_backup_last_success_dump_bytes", **job)
    assert value(samples, "rahatback_agent_online", agent_id=agent.id) == 0
    assert value(samples, "rahatback_agents", org_id=tenant.org_id, state="offline") == 1
    assert value(samples, "rahatback_agents", org_id=tenant.org_id, state="online") == 0


async def test_verification_outcome_and_age(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    await add_agent(tenant)
    run = await run_now(client, tenant, name="verified")
    passed_at = utcnow() - timedelta(days=2)
    async with session_scope(sessionmaker) as session:
        job = await session.get(BackupJob, run["job_id"])
        assert job is not None
        job.last_verify_ok_at, job.last_verified_at, job.last_verify_status = passed_at, utcnow(), "failed"
    _, samples = await scrape(client)
    labels = {"job_id": run["job_id"]}
    assert value(samples, "rahatback_backup_last_verification_failed", **labels) == 1
    age_source = value(samples, "rahatback_backup_last_verification_timestamp_seconds", **labels)
    assert age_source == pytest.approx(passed_at.timestamp(), abs=0.001)  # the last one that passed


async def test_state_is_read_at_most_once_per_refresh_interval(
    client: httpx.AsyncClient,
    tenant: Tenant,
    sessionmaker: async_sessionmaker[AsyncSession],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = await create_job(client, tenant, name="first")
    _, samples = await scrape(client)
    assert not absent(samples, "rahatback_backup_job_enabled", job_id=str(first["id"]))
    second = await create_job(client, tenant, name="second")
    verified_at = utcnow() - timedelta(hours=5)
    async with session_scope(sessionmaker) as session:
        job = await session.get(BackupJob, first["id"])
        assert job is not None
        job.last_verify_ok_at = verified_at
    _, samples = await scrape(client)
    assert absent(samples, "rahatback_backup_job_enabled", job_id=str(second["id"])), "served from cache"
    assert absent(samples, "rahatback_backup_last_verification_timestamp_seconds", job_id=str(first["id"]))
    monkeypatch.setattr(api_metrics, "REFRESH_SECONDS", 0.0)
    _, samples = await scrape(client)
    assert value(samples, "rahatback_backup_job_enabled", job_id=str(second["id"])) == 1
    name = "rahatback_backup_last_verification_timestamp_seconds"
    verification = value(samples, name, job_id=str(first["id"]))
    assert verification == pytest.approx(verified_at.timestamp(), abs=0.001)


async def test_unknown_paths_share_one_route_label(client: httpx.AsyncClient) -> None:
    for n in range(3):
        assert (await client.get(f"/no/such/path/{n}")).status_code == 404
    text, samples = await scrape(client)
    assert "/no/such/path" not in text
    count = value(
        samples, "rahatback_http_request_duration_seconds_count", route="unmatched", status_class="4xx"
    )
    assert count == 3
