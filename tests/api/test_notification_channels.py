"""Notification channels: validated, secrets write-only, and attached to the events they ask for."""

from __future__ import annotations

import httpx
import pytest
from rahatback_api.db import session_scope
from rahatback_api.models import OutboxMessage
from rahatback_api.operations import reports
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from rahatback_contracts.sealing import SealingError, open_sealed
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from tests.api.conftest import NOTIFIER_KEY, Tenant, create_job
from tests.api.test_operations import add_agent, completed, run_now

HOOK_URL = "https://hooks.example.com/rahatback/T0KEN-in-the-path"
HOOK_SECRET = "whsec-0123456789abcdef-do-not-leak"


async def create_channel(client: httpx.AsyncClient, tenant: Tenant, **body: object) -> dict[str, object]:
    r = await client.post("/v1/notifications/channels", json=body, headers=tenant.headers)
    assert r.status_code == 201, r.text
    created: dict[str, object] = r.json()
    return created


async def test_channels_are_validated_and_their_secrets_never_come_back(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    for body, needle in (
        ({"name": "x", "kind": "email"}, "recipients"),
        ({"name": "x", "kind": "email", "recipients": ["not-an-address"]}, "recipients"),
        ({"name": "x", "kind": "webhook"}, "url"),
        ({"name": "x", "kind": "slack", "url": HOOK_URL, "secret": HOOK_SECRET}, "secret"),
        (
            {"name": "x", "kind": "email", "recipients": ["a@example.com"], "events": ["backup.exploded"]},
            "events",
        ),
        ({"name": "x", "kind": "pager", "recipients": ["a@example.com"]}, "kind"),
    ):
        r = await client.post("/v1/notifications/channels", json=body, headers=tenant.headers)
        assert r.status_code == 422, (body, r.text)
        assert needle in r.text

    r = await client.post(
        "/v1/notifications/channels",
        json={"name": "ops", "kind": "email", "recipients": ["ops@example.com"], "job_ids": ["nope"]},
        headers=tenant.headers,
    )
    assert r.status_code == 422 and r.json()["field"] == "job_ids"

    email = await create_channel(client, tenant, name="ops", kind="email", recipients=["ops@example.com"])
    assert email["events"] == sorted(
        ["backup.failed", "backup.partial", "backup.overdue", "restore.failed", "verify.failed"]
    )
    again = await client.post(
        "/v1/notifications/channels",
        json={"name": "ops", "kind": "email", "recipients": ["x@example.com"]},
        headers=tenant.headers,
    )
    assert again.status_code == 409

    hook = await create_channel(client, tenant, name="hook", kind="webhook", url=HOOK_URL, secret=HOOK_SECRET)
    assert hook["has_url"] is True and hook["has_secret"] is True
    listed = await client.get("/v1/notifications/channels", headers=tenant.headers)
    assert listed.status_code == 200 and len(listed.json()) == 2
    assert HOOK_SECRET not in listed.text and "T0KEN" not in listed.text

    patched = await client.patch(
        f"/v1/notifications/channels/{hook['id']}",
        json={"events": ["backup.completed"]},
        headers=tenant.headers,
    )
    assert patched.status_code == 200 and patched.json()["has_secret"] is True
    viewer = await tenant.member("viewer")
    assert (
        await client.delete(f"/v1/notifications/channels/{hook['id']}", headers=viewer)
    ).status_code == 403
    assert (
        await client.delete(f"/v1/notifications/channels/{hook['id']}", headers=tenant.headers)
    ).status_code == 204
    assert (
        await client.get(f"/v1/notifications/channels/{hook['id']}", headers=tenant.headers)
    ).status_code == 404


async def test_events_carry_their_targets_with_webhook_secrets_sealed_to_the_notifier(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    agent = await add_agent(tenant)
    run = await run_now(client, tenant, name="nightly")
    other_job = await create_job(client, tenant, name="other")
    await create_channel(
        client, tenant, name="team", kind="email", recipients=["dba@example.com"], events=["backup.completed"]
    )
    hook = await create_channel(
        client,
        tenant,
        name="hook",
        kind="webhook",
        url=HOOK_URL,
        secret=HOOK_SECRET,
        events=["backup.completed"],
        job_ids=[run["job_id"]],
    )
    # a channel for another job and one for failures only: not for this event
    await create_channel(
        client,
        tenant,
        name="other",
        kind="email",
        recipients=["x@example.com"],
        job_ids=[other_job["id"]],
        events=["backup.completed"],
    )
    await create_channel(client, tenant, name="failures", kind="email", recipients=["y@example.com"])

    async with session_scope(sessionmaker) as session:
        subject = subjects.agent_report(agent.id, "backup", "completed")
        _, _, report = reports.parse_report(subject, completed(agent.id, run["id"]).to_bytes())
        assert await reports.apply_report(session, agent.id, "c1", report)
    async with session_scope(sessionmaker) as session:
        row = (
            await session.execute(select(OutboxMessage).where(OutboxMessage.subject == "backup.completed"))
        ).scalar_one()
    assert HOOK_SECRET not in row.payload and "T0KEN" not in row.payload
    event = m.parse_event(row.payload.encode())
    assert isinstance(event, m.BackupEvent)
    assert event.link is not None and event.link.endswith(f"/v1/backups/history/{run['id']}")
    by_name = {t.channel_name: t for t in event.notify}
    assert set(by_name) == {"team", "hook"}
    assert by_name["team"].recipients == ["dba@example.com"] and by_name["team"].secrets is None
    sealed = by_name["hook"].secrets
    assert sealed is not None
    info = m.seal_info("notify", f"{event.event_id}:{hook['id']}")
    assert open_sealed(NOTIFIER_KEY, sealed, info) == {"url": HOOK_URL, "secret": HOOK_SECRET}
    with pytest.raises(SealingError):  # bound to this event: useless in another
        open_sealed(NOTIFIER_KEY, sealed, m.seal_info("notify", f"other:{hook['id']}"))
