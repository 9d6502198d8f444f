"""The contracts' stream, consumer and key-value specs turned into nats-py configs, and created.

The API owns the configuration (it creates and updates); the scheduler and the notifier create
what they need only if it is missing, so whichever service starts first works, and none of them
undoes another's settings. `replicas` is 3 on a 3-node JetStream cluster in production.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StreamConfig,
)
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from rahatback_contracts import streams

__all__ = [
    "consumer_config",
    "create_consumer_if_missing",
    "create_stream_if_missing",
    "key_value",
    "stream_config",
]


def stream_config(spec: streams.StreamSpec, replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=spec.name,
        description=spec.description,
        subjects=list(spec.subjects),
        retention=RetentionPolicy.WORK_QUEUE if spec.retention == "workqueue" else RetentionPolicy.LIMITS,
        max_age=float(spec.max_age_seconds),
        duplicate_window=float(spec.duplicate_window_seconds),
        num_replicas=replicas,
    )


def consumer_config(spec: streams.ConsumerSpec) -> ConsumerConfig:
    filters = list(spec.filter_subjects)
    return ConsumerConfig(
        durable_name=spec.durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=float(spec.ack_wait_seconds),
        max_deliver=spec.max_deliver,
        deliver_policy=DeliverPolicy.NEW if spec.deliver_policy == "new" else DeliverPolicy.ALL,
        filter_subject=filters[0] if len(filters) == 1 else None,
        filter_subjects=filters if len(filters) > 1 else None,
    )


async def create_stream_if_missing(js: JetStreamContext, spec: streams.StreamSpec, replicas: int = 1) -> None:
    try:
        await js.stream_info(spec.name)
    except NotFoundError:
        try:
            await js.add_stream(stream_config(spec, replicas))
        except BadRequestError:  # created meanwhile by another service or replica
            await js.stream_info(spec.name)


async def create_consumer_if_missing(js: JetStreamContext, spec: streams.ConsumerSpec) -> None:
    try:
        await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        try:
            await js.add_consumer(spec.stream, consumer_config(spec))
        except BadRequestError:  # created meanwhile
            await js.consumer_info(spec.stream, spec.durable)


async def key_value(js: JetStreamContext, spec: streams.KeyValueSpec, replicas: int = 1) -> KeyValue:
    """The bucket, created if missing."""
    try:
        return await js.key_value(spec.bucket)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=spec.bucket,
                description=spec.description,
                history=spec.history,
                ttl=float(spec.ttl_seconds) or None,
                replicas=replicas,
            )
        )
    except BadRequestError:  # created meanwhile
        return await js.key_value(spec.bucket)
