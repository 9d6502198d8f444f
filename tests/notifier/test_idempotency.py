"""At-least-once without duplicates: a notifier that was down catches up, and an event delivered
again (restart, re-published by the API's outbox) notifies nobody twice."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from rahatback_contracts import streams
from rahatback_notifier.consumer import idempotency_key
from rahatback_notifier.settings import NotifierSettings

from .conftest import (
    NotifierKey,
    SmtpServer,
    WebhookReceiver,
    backup_event,
    email_target,
    handled,
    publish,
    running_notifier,
    sealed_target,
)

SettingsFactory = Callable[..., NotifierSettings]


async def test_event_published_while_stopped_is_mailed_exactly_once(
    js: JetStreamContext, smtp: SmtpServer, make_settings: SettingsFactory
) -> None:
    settings = make_settings(smtp_host=smtp.host, smtp_port=smtp.port, smtp_security="none")
    async with running_notifier(settings, None):
        pass  # first start: the durable consumer now exists and remembers our place

    event = backup_event("backup.completed", notify=[email_target("ops@example.com")])
    seq = await publish(js, event)  # the notifier is down
    assert smtp.messages == []

    async with running_notifier(settings, None):
        await handled(js, seq)
    assert len(smtp.messages) == 1

    # started again, and the same event arrives again (the API's outbox re-published it after the
    # stream's duplicate window, so JetStream stores it a second time under another Msg-Id)
    async with running_notifier(settings, None):
        again = await publish(js, event, msg_id=f"republished:{event.event_id}")
        assert again > seq
        await handled(js, again)
    assert len(smtp.messages) == 1

    kv = await js.key_value(streams.NOTIFICATIONS_SENT.bucket)
    entry = await kv.get(idempotency_key(event.event_id, event.notify[0].channel_id))
    assert entry.value == b"sent"


async def test_only_the_failed_channel_is_retried(
    js: JetStreamContext,
    smtp: SmtpServer,
    receiver: WebhookReceiver,
    notifier_key: NotifierKey,
    make_settings: SettingsFactory,
) -> None:
    receiver.statuses = [503, 200]  # down once, then back
    event_id = "evt-" + "b" * 28
    webhook = sealed_target(notifier_key, event_id, "webhook", receiver.url("/hooks/x"), secret="s3cr3t")
    event = backup_event(
        "backup.completed", event_id=event_id, notify=[email_target("ops@example.com"), webhook]
    )
    settings = make_settings(smtp_host=smtp.host, smtp_port=smtp.port, smtp_security="none")
    async with running_notifier(settings, notifier_key):
        await handled(js, await publish(js, event))

    assert len(receiver.requests) == 2  # the failure and the retry
    assert len(smtp.messages) == 1  # the email, sent on the first delivery, was not sent again
    # both attempts carry the same delivery id, so a receiver can deduplicate too
    assert {r.headers["x-rahatback-delivery"] for r in receiver.requests} == {
        f"{event_id}.{webhook.channel_id}"
    }
