"""Webhooks against a real local HTTP server: signed generic JSON, Slack payloads, retries and dead
letters."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable

from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from rahatback_contracts import streams
from rahatback_notifier.consumer import idempotency_key
from rahatback_notifier.settings import NotifierSettings

from .conftest import (
    NotifierKey,
    WebhookReceiver,
    backup_event,
    dead_letters,
    handled,
    publish,
    running_notifier,
    sealed_target,
)

SettingsFactory = Callable[..., NotifierSettings]


def receiver_accepts(secret: str, headers: dict[str, str], body: bytes, tolerance: int = 300) -> bool:
    """What a receiver does (docs/notifications.md), written independently of the notifier."""
    timestamp = headers["x-rahatback-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    signature = headers["x-rahatback-signature"].removeprefix("sha256=")
    return hmac.compare_digest(expected, signature) and abs(time.time() - int(timestamp)) <= tolerance


async def test_generic_webhook_is_signed_and_carries_the_event(
    js: JetStreamContext, receiver: WebhookReceiver, notifier_key: NotifierKey, make_settings: SettingsFactory
) -> None:
    event_id = "evt-" + "a" * 28
    secret = "whsec-7f1e0c9b2a"
    target = sealed_target(notifier_key, event_id, "webhook", receiver.url("/hooks/rahatback"), secret)
    event = backup_event("backup.completed", event_id=event_id, notify=[target])
    async with running_notifier(make_settings(), notifier_key):
        await handled(js, await publish(js, event))

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.path == "/hooks/rahatback"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-rahatback-event"] == "backup.completed"
    assert request.headers["x-rahatback-delivery"] == f"{event_id}.{target.channel_id}"
    assert receiver_accepts(secret, request.headers, request.body)
    assert not receiver_accepts("another secret", request.headers, request.body)
    assert not receiver_accepts(secret, request.headers, request.body + b" ")

    payload = json.loads(request.body)
    assert "notify" not in payload  # other channels' recipients and sealed secrets stay private
    assert payload["event_id"] == event_id
    assert payload["type"] == "backup.completed"
    assert payload["database_name"] == "orders_db"
    assert payload["dump_size"] == 123_456_789


async def test_slack_webhook_gets_text_and_blocks(
    js: JetStreamContext, receiver: WebhookReceiver, notifier_key: NotifierKey, make_settings: SettingsFactory
) -> None:
    event_id = "evt-" + "c" * 28
    target = sealed_target(notifier_key, event_id, "slack", receiver.url("/services/T000/B000/XXXX"))
    event = backup_event(
        "backup.failed", event_id=event_id, notify=[target], error="disk full <on> /var & co"
    )
    async with running_notifier(make_settings(), notifier_key):
        await handled(js, await publish(js, event))

    assert len(receiver.requests) == 1
    payload = json.loads(receiver.requests[0].body)
    assert payload["text"].startswith("❌ Backup FAILED: Nightly orders (orders_db)")
    assert "http://127.0.0.1:8000/v1/backups/history/run-1" in payload["text"]
    blocks = json.dumps(payload["blocks"])
    assert "disk full &lt;on&gt; /var &amp; co" in blocks  # Slack's own escaping of &, <, >
    assert "x-rahatback-signature" not in receiver.requests[0].headers


def dead_lettered_count(kind: str, event_type: str) -> float:
    value = REGISTRY.get_sample_value(
        "rahatback_notifier_notifications_dead_lettered_total", {"kind": kind, "event_type": event_type}
    )
    return value or 0.0


async def test_failing_receiver_is_retried_then_dead_lettered(
    js: JetStreamContext, receiver: WebhookReceiver, notifier_key: NotifierKey, make_settings: SettingsFactory
) -> None:
    receiver.statuses = [500]
    event_id = "evt-" + "d" * 28
    secret = "whsec-never-in-a-dead-letter"
    url = receiver.url("/hooks/token-4c1d9e")
    target = sealed_target(notifier_key, event_id, "webhook", url, secret, name="Ops hook")
    event = backup_event("backup.failed", event_id=event_id, notify=[target], error="boom")
    before = dead_lettered_count("webhook", "backup.failed")
    settings = make_settings(max_attempts=3)

    async with running_notifier(settings, notifier_key):
        seq = await publish(js, event)
        await handled(js, seq)  # acknowledged after the last attempt, not redelivered forever
    assert len(receiver.requests) == 3

    letters = await dead_letters(js, event_id)
    assert len(letters) == 1
    raw, letter = letters[0]
    assert letter["channel_id"] == target.channel_id
    assert letter["channel_kind"] == "webhook"
    assert letter["channel_name"] == "Ops hook"
    assert letter["event_type"] == "backup.failed"
    assert letter["attempts"] == 3
    assert "HTTP 500" in letter["error"]
    for leaked in (secret, url, "token-4c1d9e", receiver.base_url.removeprefix("http://")):
        assert leaked.encode() not in raw
    assert dead_lettered_count("webhook", "backup.failed") == before + 1

    kv = await js.key_value(streams.NOTIFICATIONS_SENT.bucket)
    assert (await kv.get(idempotency_key(event_id, target.channel_id))).value == b"dead"

    # delivered again later: a dead channel is not tried again
    async with running_notifier(settings, notifier_key):
        await handled(js, await publish(js, event, msg_id=f"again:{event_id}"))
    assert len(receiver.requests) == 3
    assert len(await dead_letters(js, event_id)) == 1


async def test_secrets_sealed_to_another_key_are_dead_lettered_at_once(
    js: JetStreamContext, receiver: WebhookReceiver, notifier_key: NotifierKey, make_settings: SettingsFactory
) -> None:
    event_id = "evt-" + "e" * 28
    target = sealed_target(notifier_key, event_id, "webhook", receiver.url("/hooks/x"), "k")
    # the same sealed blob replayed into another event: its binding does not match
    other = backup_event("backup.completed", notify=[target])
    async with running_notifier(make_settings(max_attempts=5), notifier_key):
        await handled(js, await publish(js, other))

    assert receiver.requests == []
    letters = await dead_letters(js, other.event_id)
    assert len(letters) == 1
    assert letters[0][1]["attempts"] == 1  # retrying cannot help: given up on the first delivery
    assert "sealed" in letters[0][1]["error"]


async def test_malformed_event_is_terminated(
    js: JetStreamContext, receiver: WebhookReceiver, notifier_key: NotifierKey, make_settings: SettingsFactory
) -> None:
    before = REGISTRY.get_sample_value("rahatback_notifier_events_malformed_total") or 0.0
    async with running_notifier(make_settings(), notifier_key):
        ack = await js.publish("backup.completed", b'{"type": "backup.completed", "event_id": 5}')
        await handled(js, ack.seq)
        info = await js.consumer_info(streams.EVENTS.name, streams.NOTIFIER_EVENTS_CONSUMER.durable)
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0
    assert REGISTRY.get_sample_value("rahatback_notifier_events_malformed_total") == before + 1
