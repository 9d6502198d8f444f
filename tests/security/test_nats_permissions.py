"""What each NATS identity may do, against a real nats-server in operator/JWT mode (issue 7).

Agents get their permissions from the account's scoped signing key (template with `{{name()}}` =
agent id); services from their own user JWTs written by `rahatback-api nats-setup`. A refused
publish or subscription shows only in `error_cb` (DESIGN.md "NATS notes"), so every refusal is
asserted there, and where something could have leaked, on what the other side received.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import nats.errors
import pytest
from nats.js.api import DeliverPolicy
from rahatback_api.messaging.bus import Bus
from rahatback_api.security import nats_jwt
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import ScheduleEntry, schedule_key
from rahatback_notifier.consumer import ensure_jetstream
from rahatback_scheduler.metrics import Metrics
from rahatback_scheduler.scheduler import Scheduler
from rahatback_scheduler.settings import SchedulerSettings

from tests.security.conftest import ConnectAs, JwtApi, JwtNats, Watched, assert_refused

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(connect_as: ConnectAs) -> AsyncIterator[Bus]:
    """The API's own user: it creates the streams and each agent's consumer, as at enrollment."""
    watched = await connect_as(service="api")
    bus = Bus(nc=watched.nc, js=watched.nc.jetstream())
    await bus.ensure_streams()
    yield bus
    assert not watched.errors, watched.errors  # nothing the API did here was refused


async def new_agent(api: Bus, connect_as: ConnectAs) -> tuple[str, Watched]:
    agent_id = uuid.uuid4().hex
    await api.ensure_agent_consumer(agent_id)
    return agent_id, await connect_as(agent_id=agent_id, user=nats_jwt.new_nkey("user"))


async def pending_commands(api: Bus, agent_id: str) -> int:
    spec = streams.agent_commands_consumer(agent_id)
    info = await api.js.consumer_info(spec.stream, spec.durable)
    return int(info.num_pending or 0)


async def test_an_agents_own_traffic_works(api: Bus, connect_as: ConnectAs) -> None:
    agent_id, agent = await new_agent(api, connect_as)
    heard: list[str] = []

    async def on_agent_subject(msg: nats.aio.msg.Msg) -> None:
        heard.append(msg.subject)

    await api.nc.subscribe(subjects.ALL_HEARTBEATS, cb=on_agent_subject)
    await api.nc.subscribe(subjects.ALL_PROGRESS, cb=on_agent_subject)
    await api.nc.flush()

    # heartbeat and progress (core), a report (JetStream: publish + the ack in its own inbox)
    await agent.nc.publish(subjects.agent_heartbeat(agent_id), b"{}")
    await agent.nc.publish(subjects.agent_progress(agent_id), b"{}")
    ack = await agent.nc.jetstream().publish(
        subjects.agent_report(agent_id, "backup", "started"), b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex}
    )
    assert ack.stream == streams.AGENT_REPORTS.name

    # a command: bound (not looked up or created) and fetched from its own consumer, then acked
    await api.publish_durable(subjects.agent_command(agent_id, "job.execute"), b"command", uuid.uuid4().hex)
    spec = streams.agent_commands_consumer(agent_id)
    psub = await agent.nc.jetstream().pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    (command,) = await psub.fetch(1, timeout=5)
    assert command.data == b"command"
    await command.ack_sync(timeout=5)
    assert await pending_commands(api, agent_id) == 0

    # an RPC: the agent answers the API's request once, from its own rpc subject
    async def answer(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"pong")

    await agent.nc.subscribe(subjects.agent_rpc(agent_id, "db.test"), cb=answer)
    await agent.nc.flush()
    reply = await api.nc.request(subjects.agent_rpc(agent_id, "db.test"), b"ping", timeout=5)
    assert reply.data == b"pong"

    for _ in range(50):
        if len(heard) == 2:
            break
        await asyncio.sleep(0.05)
    assert sorted(heard) == sorted([subjects.agent_heartbeat(agent_id), subjects.agent_progress(agent_id)])
    assert agent.errors == []


async def test_an_agent_cannot_read_or_forge_another_agents_traffic(api: Bus, connect_as: ConnectAs) -> None:
    a_id, a = await new_agent(api, connect_as)
    b_id, b = await new_agent(api, connect_as)
    leaked: list[str] = []

    async def collect(msg: nats.aio.msg.Msg) -> None:
        leaked.append(msg.subject)

    # subscriptions to B's subjects, everyone's heartbeats and every inbox are refused
    for subject in (
        f"agent.{b_id}.>",
        subjects.agent_rpc(b_id, "db.test"),
        subjects.ALL_HEARTBEATS,
        "_INBOX.>",
    ):
        await a.nc.subscribe(subject, cb=collect)
        await a.violation(f'subscription to "{subject}"')
    # …so B's RPCs and B's command fetches (delivered to B's inbox) never reach A
    await api.nc.publish(subjects.agent_rpc(b_id, "db.test"), b"secret for B")
    await b.nc.publish(subjects.agent_heartbeat(b_id), b"{}")

    # A cannot publish B's reports, heartbeat or progress
    forged = subjects.agent_report(b_id, "backup", "completed")
    for subject in (forged, subjects.agent_heartbeat(b_id), subjects.agent_progress(b_id)):
        await a.nc.publish(subject, b"{}")
        await a.violation(f'publish to "{subject}"')
    with pytest.raises(nats.errors.TimeoutError):
        await a.nc.jetstream().publish(forged, b"{}", timeout=1)
    with pytest.raises(nats.js.errors.NotFoundError):
        await api.js.get_last_msg(streams.AGENT_REPORTS.name, forged)

    # A cannot fetch from (or ack on) B's consumer: B's command stays for B
    await api.publish_durable(subjects.agent_command(b_id, "job.execute"), b"for B", uuid.uuid4().hex)
    b_spec = streams.agent_commands_consumer(b_id)
    next_b = f"$JS.API.CONSUMER.MSG.NEXT.{b_spec.stream}.{b_spec.durable}"
    await a.nc.publish(next_b, b'{"batch": 1}', reply=f"{subjects.agent_inbox_prefix(a_id)}.steal")
    await a.violation(f'publish to "{next_b}"')
    with pytest.raises(Exception):  # noqa: B017 - refused (timeout) whatever nats-py calls it
        psub = await a.nc.jetstream().pull_subscribe_bind(durable=b_spec.durable, stream=b_spec.stream)
        await psub.fetch(1, timeout=1)
    ack_b = f"$JS.ACK.{b_spec.stream}.{b_spec.durable}.1.1.1.0.0"
    await a.nc.publish(ack_b, b"+ACK")
    await a.violation(f'publish to "{ack_b}"')
    assert await pending_commands(api, b_id) == 1
    psub_b = await b.nc.jetstream().pull_subscribe_bind(durable=b_spec.durable, stream=b_spec.stream)
    (command,) = await psub_b.fetch(1, timeout=5)
    assert command.data == b"for B"
    await command.ack()

    await asyncio.sleep(0.3)
    assert leaked == []
    assert b.errors == []


async def test_an_agent_cannot_administer_jetstream(api: Bus, connect_as: ConnectAs) -> None:
    agent_id, agent = await new_agent(api, connect_as)
    js = agent.nc.jetstream(timeout=1)
    spec = streams.agent_commands_consumer(agent_id)
    attempts: dict[str, Callable[[], Awaitable[object]]] = {
        "$JS.API.STREAM.CREATE.EVIL": lambda: js.add_stream(name="EVIL", subjects=["evil.>"]),
        f"$JS.API.STREAM.DELETE.{streams.AGENT_REPORTS.name}": lambda: js.delete_stream(
            streams.AGENT_REPORTS.name
        ),
        f"$JS.API.STREAM.PURGE.{streams.AGENT_COMMANDS.name}": lambda: js.purge_stream(
            streams.AGENT_COMMANDS.name
        ),
        f"$JS.API.CONSUMER.DELETE.{spec.stream}.{spec.durable}": lambda: js.delete_consumer(
            spec.stream, spec.durable
        ),
        f"$JS.API.CONSUMER.DURABLE.CREATE.{spec.stream}.mine": lambda: js.add_consumer(
            spec.stream, durable_name="mine"
        ),
        f"$JS.API.STREAM.INFO.{streams.AGENT_COMMANDS.name}": lambda: js.stream_info(
            streams.AGENT_COMMANDS.name
        ),
    }
    for api_subject, attempt in attempts.items():
        with pytest.raises(nats.errors.TimeoutError):
            await attempt()
        await agent.violation(f'publish to "{api_subject}"')
    # everything is still there, untouched
    assert (await api.js.stream_info(streams.AGENT_REPORTS.name)).config.name == streams.AGENT_REPORTS.name
    assert (await api.js.consumer_info(spec.stream, spec.durable)).name == spec.durable
    with pytest.raises(nats.js.errors.NotFoundError):
        await api.js.stream_info("EVIL")


async def test_an_agent_jwt_signed_by_another_key_is_refused(nats_jwt_server: JwtNats) -> None:
    """Only the account's agent signing key (held by the API) makes valid agents."""
    user = nats_jwt.new_nkey("user")
    forged = nats_jwt.agent_user_jwt(
        agent_id=uuid.uuid4().hex,
        user_public_key=user.public,
        account_public_key=nats_jwt_server.signing["account_public_key"],
        signing_key=nats_jwt.new_nkey("account"),
        expires_at=int(datetime.now(UTC).timestamp()) + 600,
    )
    await assert_refused(
        nats_jwt_server.url,
        user_jwt_cb=lambda: forged.encode(),
        signature_cb=lambda nonce: base64.b64encode(user.sign(nonce.encode())),
    )


async def test_the_notifier_does_its_job_and_nothing_more(api: Bus, connect_as: ConnectAs) -> None:
    notifier = await connect_as(service="notifier")
    js = notifier.nc.jetstream()
    sent = await ensure_jetstream(js)  # streams, its consumer and its bucket: looked up, not changed
    await sent.put(f"check.{uuid.uuid4().hex}", b"1")
    spec = streams.NOTIFIER_EVENTS_CONSUMER
    psub = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    with contextlib.suppress(nats.errors.TimeoutError):  # drain what earlier tests left
        for msg in await psub.fetch(100, timeout=1):
            await msg.ack()
    await api.publish_durable("backup.completed", b'{"event": "x"}', uuid.uuid4().hex)
    (event,) = await psub.fetch(1, timeout=5)
    await event.ack_sync(timeout=5)
    ack = await js.publish(
        subjects.NOTIFICATION_DEAD_LETTER, b"{}", headers={"Nats-Msg-Id": uuid.uuid4().hex}
    )
    assert ack.stream == streams.DEAD_LETTERS.name
    assert notifier.errors == []

    agent_id = uuid.uuid4().hex
    refused = {
        "publish": [subjects.agent_command(agent_id, "job.execute"), "backup.completed", "backup.requested"],
        "subscription": [subjects.ALL_HEARTBEATS, f"agent.{agent_id}.>", "_INBOX.>"],
    }
    for subject in refused["publish"]:
        await notifier.nc.publish(subject, b"{}")
        await notifier.violation(f'publish to "{subject}"')
    for subject in refused["subscription"]:
        await notifier.nc.subscribe(subject)
        await notifier.violation(f'subscription to "{subject}"')
    with pytest.raises(nats.errors.TimeoutError):
        await js.delete_stream(
            streams.AGENT_COMMANDS.name,
        )


async def test_the_scheduler_does_its_job_and_nothing_more(
    api: Bus, connect_as: ConnectAs, nats_jwt_server: JwtNats
) -> None:
    settings = SchedulerSettings(nats_url=nats_jwt_server.url, nats_creds=nats_jwt_server.creds("scheduler"))
    scheduler = Scheduler(settings, Metrics())
    stop = asyncio.Event()
    task = asyncio.create_task(scheduler.run(stop))
    job_id = uuid.uuid4().hex
    schedules = await api.ensure_key_value(streams.SCHEDULES)
    key = schedule_key("backup", job_id)
    try:
        await asyncio.wait_for(scheduler.synced.wait(), 30)
        entry = ScheduleEntry(
            kind="backup",
            job_id=job_id,
            org_id="org",
            cron="* * * * * *",
            timezone="UTC",
            enabled=True,
            updated_at=datetime.now(UTC),
        )
        await schedules.put(key, entry.to_bytes())  # the API's part
        sub = await api.js.subscribe(
            subjects.BACKUP_REQUESTED,
            stream=streams.CONTROL.name,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )
        request = await sub.next_msg(timeout=15)
        assert job_id.encode() in request.data
        await sub.unsubscribe()
    finally:
        await schedules.delete(key)
        stop.set()
        await asyncio.wait_for(task, 30)

    scheduler_nc = await connect_as(service="scheduler")
    for subject in (
        subjects.agent_command(job_id, "job.execute"),
        "backup.completed",
        f"$KV.SCHEDULES.{key}",
    ):
        await scheduler_nc.nc.publish(subject, b"{}")
        await scheduler_nc.violation(f'publish to "{subject}"')
    await scheduler_nc.nc.subscribe(subjects.ALL_PROGRESS)
    await scheduler_nc.violation(f'subscription to "{subjects.ALL_PROGRESS}"')


async def test_the_api_cannot_speak_as_an_agent(api: Bus, connect_as: ConnectAs) -> None:
    api_user = await connect_as(service="api")
    agent_id = uuid.uuid4().hex
    for subject in (
        subjects.agent_report(agent_id, "backup", "completed"),
        subjects.agent_heartbeat(agent_id),
        subjects.agent_progress(agent_id),
    ):
        await api_user.nc.publish(subject, b"{}")
        await api_user.violation(f'publish to "{subject}"')


async def test_the_api_system_user_listens_only_on_its_own_inbox_and_still_pushes_revocations(
    jwt_api: JwtApi, connect_as: ConnectAs
) -> None:
    """The system-account user sees the whole SYS account's traffic if it may subscribe to every
    inbox there: it gets `_INBOX.api-system.>` only, and the revocation push still works."""
    system = await connect_as(service="api-system")
    for subject in ("_INBOX.>", "_INBOX.other.>", "$SYS.>"):
        await system.nc.subscribe(subject)
        await system.violation(f'subscription to "{subject}"')

    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent = await connect_as(agent_id=enrolled["agent_id"], user=user, jwt=enrolled["nats_jwt"])
    revoked = await jwt_api.ok("POST", f"/v1/agents/{enrolled['agent_id']}/revoke")
    assert revoked["nats_user_revoked"] is True
    await asyncio.wait_for(agent.closed.wait(), 5)  # the pushed account JWT closed it
    async with jwt_api.app.state.sessionmaker() as session:
        assert await jwt_api.app.state.nats_authority.push_revocations(session) >= 1
