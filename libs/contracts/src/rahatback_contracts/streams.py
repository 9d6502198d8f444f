"""JetStream stream and consumer definitions, in one place.

Plain data (no nats import): the services turn these into `nats.js.api.StreamConfig` objects.
Streams list their subjects exactly; JetStream refuses overlapping streams.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from . import subjects

DAY = 24 * 3600


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"] = "limits"
    max_age_seconds: int = 7 * DAY
    duplicate_window_seconds: int = 2 * 60
    description: str = ""


AGENT_COMMANDS = StreamSpec(
    name="AGENT_COMMANDS",
    subjects=(
        "agent.*.job.execute",
        "agent.*.restore.execute",
        "agent.*.verify.execute",
        "agent.*.prune.execute",
        "agent.*.job.cancel",
    ),
    retention="workqueue",
    # a command nobody picked up within a day is stale; the API's watchdog has failed its run long before
    max_age_seconds=1 * DAY,
    # the outbox may re-publish a command after a long DB outage: it must still be deduplicated
    duplicate_window_seconds=1 * DAY,
    description="API → agent durable commands; each agent pulls from its own durable consumer",
)

AGENT_REPORTS = StreamSpec(
    name="AGENT_REPORTS",
    subjects=(subjects.ALL_REPORTS,),
    max_age_seconds=7 * DAY,
    # reports retried by an agent after a long outage must still be deduplicated
    duplicate_window_seconds=1 * DAY,
    description="agent → API run reports (untrusted; the API checks ownership and transitions)",
)

CONTROL = StreamSpec(
    name="CONTROL",
    subjects=(subjects.BACKUP_REQUESTED, subjects.VERIFY_REQUESTED),
    max_age_seconds=1 * DAY,
    duplicate_window_seconds=1 * DAY,
    description="scheduler → API requests",
)

EVENT_TYPES: tuple[str, ...] = (
    "backup.started",
    "backup.completed",
    "backup.partial",
    "backup.failed",
    "backup.overdue",
    "restore.started",
    "restore.completed",
    "restore.failed",
    "verify.completed",
    "verify.failed",
    "presence.online",
    "presence.offline",
)

EVENTS = StreamSpec(
    name="EVENTS",
    subjects=EVENT_TYPES,
    max_age_seconds=30 * DAY,
    duplicate_window_seconds=1 * DAY,
    description="API → notifier and live clients: committed domain events",
)

DEAD_LETTERS = StreamSpec(
    name="DEAD_LETTERS",
    subjects=(subjects.NOTIFICATION_DEAD_LETTER,),
    max_age_seconds=30 * DAY,
    duplicate_window_seconds=1 * DAY,
    description="notifications that failed after their last retry, for a person to inspect",
)

ALL_STREAMS: tuple[StreamSpec, ...] = (AGENT_COMMANDS, AGENT_REPORTS, CONTROL, EVENTS, DEAD_LETTERS)


@dataclass(frozen=True)
class KeyValueSpec:
    bucket: str
    history: int = 1
    ttl_seconds: int = 0  # 0 = keep forever
    description: str = ""


# job schedules: the API writes, the scheduler watches (its only source of truth)
SCHEDULES = KeyValueSpec(
    bucket="SCHEDULES", history=5, description="job schedules: key `<kind>.<job id>` → ScheduleEntry"
)
# the scheduler's own memory of the last fire per schedule key, for catch-up after downtime
SCHEDULER_STATE = KeyValueSpec(bucket="SCHEDULER_STATE", description="schedule key → last fire time")
# notifications already sent, by `<event id>.<channel id>`: a redelivered event sends nothing twice
NOTIFICATIONS_SENT = KeyValueSpec(
    bucket="NOTIFICATIONS_SENT", ttl_seconds=35 * DAY, description="idempotency keys of sent notifications"
)

ALL_KEY_VALUES: tuple[KeyValueSpec, ...] = (SCHEDULES, SCHEDULER_STATE, NOTIFICATIONS_SENT)


@dataclass(frozen=True)
class ConsumerSpec:
    stream: str
    durable: str
    filter_subjects: tuple[str, ...] = field(default_factory=tuple)
    ack_wait_seconds: int = 30
    max_deliver: int = 20
    # where a new consumer starts: "new" skips what the stream already held when it was created
    deliver_policy: Literal["all", "new"] = "all"


# never give up on a report (malformed ones are terminated explicitly): during a database outage
# the API keeps redelivering with a growing delay instead of dropping a finished backup's result
API_REPORTS_CONSUMER = ConsumerSpec(stream=AGENT_REPORTS.name, durable="api-reports", max_deliver=-1)
API_CONTROL_CONSUMER = ConsumerSpec(stream=CONTROL.name, durable="api-control")
# the notifier retries a failing channel with nak(delay) and dead-letters it after its last attempt
NOTIFIER_EVENTS_CONSUMER = ConsumerSpec(
    stream=EVENTS.name,
    durable="notifier",
    ack_wait_seconds=60,
    max_deliver=-1,
    # created by the API at start (so events wait for a notifier started later) and by the notifier
    # if it comes first; either way it starts at new events, never mailing weeks of history at once
    deliver_policy="new",
)


def agent_commands_consumer(agent_id: str) -> ConsumerSpec:
    """Created by the API at enrollment; the agent only binds to it."""
    return ConsumerSpec(
        stream=AGENT_COMMANDS.name,
        durable=f"agent-{agent_id}",
        filter_subjects=(subjects.agent_commands_filter(agent_id),),
        # the agent acks a command once it has reported `started`; the watchdog handles the rest
        ack_wait_seconds=60,
        max_deliver=5,
    )
