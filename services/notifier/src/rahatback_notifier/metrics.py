"""Prometheus counters. Labels are bounded: the channel kind and the event type (unknown types are
counted as "other"); never an id, an address or a URL."""

from __future__ import annotations

from prometheus_client import Counter
from rahatback_contracts import streams

__all__ = [
    "DEAD_LETTERED",
    "EVENTS_MALFORMED",
    "FAILED",
    "RETRIES",
    "SENT",
    "event_type_label",
]

_KNOWN_TYPES = frozenset(streams.EVENT_TYPES)

SENT = Counter(
    "rahatback_notifier_notifications_sent_total",
    "Notifications handed over (SMTP accepted, outbox written, webhook answered 2xx)",
    ["kind", "event_type"],
)
FAILED = Counter(
    "rahatback_notifier_notifications_failed_total",
    "Failed delivery attempts (each attempt counts; a retried one may succeed later)",
    ["kind", "event_type"],
)
DEAD_LETTERED = Counter(
    "rahatback_notifier_notifications_dead_lettered_total",
    "Notifications given up on and published to the DEAD_LETTERS stream",
    ["kind", "event_type"],
)
RETRIES = Counter(
    "rahatback_notifier_retries_total",
    "Channels scheduled for another attempt (the event was nak'ed with a delay)",
    ["kind", "event_type"],
)
EVENTS_MALFORMED = Counter(
    "rahatback_notifier_events_malformed_total",
    "Events that could not be decoded and were terminated",
)


def event_type_label(event_type: str) -> str:
    return event_type if event_type in _KNOWN_TYPES else "other"
