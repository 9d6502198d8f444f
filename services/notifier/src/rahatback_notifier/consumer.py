"""The notifier's loop: pull one event at a time from EVENTS, notify every channel it names, once.

Idempotency: after a channel succeeded (or was given up on) its key `<event id>.<channel id>` is
written to the NOTIFICATIONS_SENT bucket, and a redelivered event skips it. Only a crash between
the hand-over and that write can repeat a notification (at-least-once, never silently lost).

Retries: when a channel fails the event is nak'ed with a growing delay and, on the next delivery,
only the channels without a key are tried again. On the last attempt (`max_attempts` deliveries)
each still-failing channel is dead-lettered: a `NotificationDeadLetter` on DEAD_LETTERS, a log
line, a metric, and a `dead` key so it is never tried again. Then the event is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
import nats
import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import AwareDatetime, BaseModel, ConfigDict
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import DomainEvent, NotifyTarget, parse_event
from rahatback_jetstream import create_consumer_if_missing, create_stream_if_missing, key_value
from structlog.typing import FilteringBoundLogger

from . import metrics
from .delivery import Deliverer, DeliveryError, delivery_id
from .email import Mailer, mailer_for
from .settings import NotifierSettings
from .webhooks import USER_AGENT, WebhookSender

__all__ = ["NotificationDeadLetter", "Notifier", "idempotency_key"]

log = structlog.get_logger(__name__)

SENT = b"sent"
DEAD = b"dead"
_KEY_PART = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")


class NotificationDeadLetter(BaseModel):
    """Published on `notification.deadletter` (stream DEAD_LETTERS) when a notification is given up.

    Enough to find the event and the channel and to see why; no recipients' secrets, no URL.
    """

    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    event_id: str
    event_type: str
    org_id: str
    channel_id: str
    channel_name: str
    channel_kind: str
    error: str
    attempts: int
    dead_at: AwareDatetime

    def msg_id(self) -> str:
        return f"{self.event_id}.{self.channel_id}.dead"


def idempotency_key(event_id: str, channel_id: str) -> str:
    """KV key `<event id>.<channel id>`; an id with characters a KV key cannot hold is hashed."""

    def part(value: str) -> str:
        if _KEY_PART.fullmatch(value):
            return value
        return "h-" + hashlib.sha256(value.encode()).hexdigest()[:40]

    return f"{part(event_id)}.{part(channel_id)}"


async def ensure_jetstream(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Create what the notifier needs if it is missing; never change what the API created."""
    for spec in (streams.EVENTS, streams.DEAD_LETTERS):
        await create_stream_if_missing(js, spec, replicas)
    await create_consumer_if_missing(js, streams.NOTIFIER_EVENTS_CONSUMER)
    return await key_value(js, streams.NOTIFICATIONS_SENT, replicas)


class Notifier:
    def __init__(
        self,
        settings: NotifierSettings,
        *,
        private_key: X25519PrivateKey | None,
        mailer: Mailer | None = None,
    ) -> None:
        self.settings = settings
        self.private_key = private_key
        self.mailer = mailer or mailer_for(settings)
        # set once the consumer exists and the loop is about to fetch (tests and health checks)
        self.ready = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        nc = await self._connect()
        try:
            js = nc.jetstream()
            kv = await ensure_jetstream(js, self.settings.stream_replicas)
            spec = streams.NOTIFIER_EVENTS_CONSUMER
            sub = await js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
            async with httpx.AsyncClient(
                timeout=self.settings.http_timeout_seconds,
                follow_redirects=False,  # a redirect could send the signed body somewhere else
                headers={"User-Agent": USER_AGENT},
            ) as http:
                handler = EventHandler(
                    self.settings,
                    js,
                    kv,
                    Deliverer(
                        private_key=self.private_key,
                        mailer=self.mailer,
                        webhooks=WebhookSender(http),
                        mail_from=self.settings.mail_from,
                    ),
                )
                log.info(
                    "notifier.started",
                    email="outbox" if self.settings.dev_mode else "smtp",
                    outbox=str(self.settings.outbox_dir) if self.settings.dev_mode else None,
                    sealed_channels=self.private_key is not None,
                )
                if self.private_key is None:
                    log.warning(
                        "notifier.no_private_key",
                        consequence="webhook and Slack channels will be dead-lettered",
                    )
                self.ready.set()
                try:
                    await self._loop(sub, handler, stop)
                finally:
                    # nats-py's drain of a pull subscription waits for queue items that fetch() never
                    # marks done and so always hits the drain timeout (30 s): let it go first
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
        finally:
            self.ready.clear()
            if not nc.is_closed:
                await nc.drain()
            log.info("notifier.stopped")

    async def _connect(self) -> Client:
        async def on_error(exc: Exception) -> None:
            log.warning("nats.error", error=str(exc))

        async def on_disconnect() -> None:
            log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            log.info("nats.reconnected")

        return await nats.connect(
            servers=[self.settings.nats_url],
            name="rahatback-notifier",
            # JWT mode: its own user, replies in its own inbox (docs/nats-security.md)
            user_credentials=str(self.settings.nats_creds) if self.settings.nats_creds else None,
            inbox_prefix="_INBOX.notifier" if self.settings.nats_creds else "_INBOX",
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )

    async def _loop(
        self, sub: JetStreamContext.PullSubscription, handler: EventHandler, stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                # one at a time: a batch fetch lingers until the batch fills or times out
                batch = await sub.fetch(1, timeout=self.settings.fetch_timeout_seconds)
            except NatsTimeoutError:
                continue
            except ConnectionClosedError:
                if stop.is_set():
                    break
                log.warning("notifier.connection_closed")
                await asyncio.sleep(1)
                continue
            except Exception as exc:  # e.g. during a reconnect; the durable consumer keeps our place
                log.warning("notifier.fetch_failed", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1)
                continue
            for msg in batch:
                await handler.handle(msg)


class EventHandler:
    def __init__(
        self, settings: NotifierSettings, js: JetStreamContext, kv: KeyValue, deliverer: Deliverer
    ) -> None:
        self.settings = settings
        self.js = js
        self.kv = kv
        self.deliverer = deliverer

    async def handle(self, msg: Msg) -> None:
        try:
            data = json.loads(msg.data)
            if not isinstance(data, dict):
                raise ValueError("the event is not a JSON object")
            event = parse_event(msg.data)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            metrics.EVENTS_MALFORMED.inc()
            log.warning(
                "event.malformed",
                subject=msg.subject,
                stream_seq=msg.metadata.sequence.stream,
                error=str(exc)[:500],
            )
            await msg.term()
            return
        attempt = msg.metadata.num_delivered
        bound = log.bind(event_id=event.event_id, event_type=event.type, attempt=attempt)
        try:
            await self._notify(msg, event, data, attempt, bound)
        except Exception:
            # the KV or the dead-letter stream is unreachable, or a bug: try the event again later
            bound.exception("event.handling_failed")
            try:
                await msg.nak(delay=self.settings.backoff(attempt))
            except Exception as exc:  # the ack wait will bring it back anyway
                bound.warning("event.nak_failed", error=f"{type(exc).__name__}: {exc}")

    async def _notify(
        self, msg: Msg, event: DomainEvent, data: dict[str, Any], attempt: int, bound: FilteringBoundLogger
    ) -> None:
        failures: list[tuple[NotifyTarget, str]] = []
        labels = {"event_type": metrics.event_type_label(event.type)}
        for target in event.notify:
            key = idempotency_key(event.event_id, target.channel_id)
            state = await self._state(key)
            if state is not None:
                bound.debug("notification.skipped", channel_id=target.channel_id, state=state)
                continue
            await msg.in_progress()  # several slow channels must not outlast the ack wait
            try:
                await self.deliverer.deliver(event, data, target)
            except DeliveryError as exc:
                metrics.FAILED.labels(kind=target.kind, **labels).inc()
                bound.warning(
                    "notification.failed",
                    channel_id=target.channel_id,
                    kind=target.kind,
                    error=exc.message,
                    permanent=exc.permanent,
                )
                if exc.permanent:
                    await self._dead_letter(event, target, exc.message, attempt, bound)
                else:
                    failures.append((target, exc.message))
                continue
            await self.kv.put(key, SENT)
            metrics.SENT.labels(kind=target.kind, **labels).inc()
            bound.info("notification.sent", channel_id=target.channel_id, kind=target.kind)

        if not failures:
            await msg.ack()
            return
        if attempt >= self.settings.max_attempts:
            for target, error in failures:
                await self._dead_letter(event, target, error, attempt, bound)
            await msg.ack()
            return
        delay = self.settings.backoff(attempt)
        for target, _ in failures:
            metrics.RETRIES.labels(kind=target.kind, **labels).inc()
        bound.info(
            "event.retry_scheduled",
            channels=[target.channel_id for target, _ in failures],
            delay_seconds=delay,
            attempts_left=self.settings.max_attempts - attempt,
        )
        await msg.nak(delay=delay)

    async def _state(self, key: str) -> Literal["sent", "dead"] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return "dead" if entry.value == DEAD else "sent"

    async def _dead_letter(
        self, event: DomainEvent, target: NotifyTarget, error: str, attempts: int, bound: FilteringBoundLogger
    ) -> None:
        letter = NotificationDeadLetter(
            event_id=event.event_id,
            event_type=event.type,
            org_id=event.org_id,
            channel_id=target.channel_id,
            channel_name=target.channel_name,
            channel_kind=target.kind,
            error=error,
            attempts=attempts,
            dead_at=datetime.now(UTC),
        )
        await self.js.publish(
            subjects.NOTIFICATION_DEAD_LETTER,
            letter.model_dump_json().encode(),
            headers={"Nats-Msg-Id": letter.msg_id()},
            timeout=5,
        )
        await self.kv.put(idempotency_key(event.event_id, target.channel_id), DEAD)
        metrics.DEAD_LETTERED.labels(kind=target.kind, event_type=metrics.event_type_label(event.type)).inc()
        bound.error(
            "notification.dead_lettered",
            channel_id=target.channel_id,
            channel_name=target.channel_name,
            kind=target.kind,
            error=error,
            attempts=attempts,
            delivery_id=delivery_id(event.event_id, target.channel_id),
        )
