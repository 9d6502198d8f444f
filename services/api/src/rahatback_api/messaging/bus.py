"""The API's NATS connection: streams, per-agent consumers, request/reply and deduplicated publishes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import structlog
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError, OutboundBufferLimitError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from rahatback_api.security.signing import CommandSigner
from rahatback_contracts import streams
from rahatback_contracts.messages import Message
from rahatback_jetstream import consumer_config, key_value, stream_config

log = structlog.get_logger(__name__)

API_INBOX = "_INBOX.api"  # what the API's NATS user may subscribe to in JWT mode (nats-setup)


class NatsUnreachable(RuntimeError):
    """NATS did not answer at start-up: the API cannot do anything useful without it."""


class AgentOffline(Exception):
    """No agent answered a request: NATS said "no responders"."""


class AgentTimeout(Exception):
    """The agent is there but did not answer in time."""


class BusUnavailable(Exception):
    """The API's own NATS connection is down."""


@dataclass
class Bus:
    nc: Client
    js: JetStreamContext
    # loop time of the last (re)connection: presence heard over a broken connection means nothing
    connected_since: float = field(default_factory=time.monotonic)
    # JetStream replicas of the streams and buckets the API creates (3 on a 3-node cluster)
    replicas: int = 1
    # signs requests to agents (operations.service.ask_agent); set by the lifespan
    command_signer: CommandSigner | None = None

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str = "rahatback-api",
        first_connect_seconds: float = 30,
        replicas: int = 1,
        creds: Path | None = None,
    ) -> Bus:
        """Connect (and later reconnect forever); refuse to start if NATS is unreachable at first."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats.error", error=str(exc))

        async def on_disconnect() -> None:
            log.warning("nats.disconnected")

        async def on_reconnect() -> None:
            log.info("nats.reconnected")
            bus.connected_since = time.monotonic()

        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=[url],
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    # JWT mode (docs/nats-security.md): the API's own user, its replies in its own inbox
                    user_credentials=str(creds) if creds else None,
                    inbox_prefix=API_INBOX if creds else "_INBOX",
                ),
                first_connect_seconds,
            )
        except TimeoutError as exc:
            raise NatsUnreachable(f"cannot reach NATS at {url} within {first_connect_seconds:.0f} s") from exc
        bus = cls(nc=nc, js=nc.jetstream(), replicas=replicas)
        await bus.ensure_streams()
        return bus

    async def ensure_streams(self) -> None:
        for spec in streams.ALL_STREAMS:
            config = stream_config(spec, self.replicas)
            try:
                await self.js.stream_info(spec.name)
                await self.js.update_stream(config)
            except NotFoundError:
                await self.js.add_stream(config)
        for consumer in (streams.API_REPORTS_CONSUMER, streams.API_CONTROL_CONSUMER):
            await self.ensure_consumer(consumer)
        # created here too, so events committed before the notifier first starts still reach it
        with contextlib.suppress(BadRequestError):  # the notifier created it already, maybe differently
            await self.ensure_consumer(streams.NOTIFIER_EVENTS_CONSUMER)
        for kv in streams.ALL_KEY_VALUES:
            await self.ensure_key_value(kv)

    async def ensure_key_value(self, spec: streams.KeyValueSpec) -> KeyValue:
        return await key_value(self.js, spec, self.replicas)

    async def ensure_consumer(self, spec: streams.ConsumerSpec) -> None:
        await self.js.add_consumer(spec.stream, consumer_config(spec))

    async def ensure_agent_consumer(self, agent_id: str) -> None:
        await self.ensure_consumer(streams.agent_commands_consumer(agent_id))

    async def request(
        self,
        subject: str,
        message: Message,
        timeout: float,  # noqa: ASYNC109 - passed to NATS
        headers: dict[str, str] | None = None,
    ) -> bytes:
        try:
            reply = await self.nc.request(subject, message.to_bytes(), timeout=timeout, headers=headers)
        except NoRespondersError as exc:
            raise AgentOffline("the agent is offline (no responder on NATS)") from exc
        except NatsTimeoutError as exc:
            raise AgentTimeout(f"the agent did not answer within {timeout:.0f} s") from exc
        except (ConnectionClosedError, OutboundBufferLimitError) as exc:
            raise BusUnavailable("the API is not connected to NATS right now; retry in a moment") from exc
        return reply.data

    async def publish_durable(
        self,
        subject: str,
        payload: bytes,
        msg_id: str,
        headers: dict[str, str] | None = None,
        attempts: int = 5,
    ) -> None:
        """JetStream publish, retried with the same Msg-Id: a timed-out publish may have been stored."""
        delay = 0.2
        all_headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
        for attempt in range(1, attempts + 1):
            try:
                await self.js.publish(subject, payload, headers=all_headers, timeout=5)
                return
            except (NatsTimeoutError, NoRespondersError):
                if attempt == attempts:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def connected_for(self) -> float:
        """Seconds this connection has been up without interruption (0 while disconnected)."""
        return time.monotonic() - self.connected_since if self.connected else 0.0
