"""NATS subject builders. The only place a subject string is spelled out."""

from __future__ import annotations

import re
from typing import Literal

RunKind = Literal["backup", "restore", "verify", "prune"]
ReportOutcome = Literal["started", "completed", "failed"]
CommandKind = Literal["job.execute", "restore.execute", "verify.execute", "prune.execute", "job.cancel"]

# Agent ids are UUID hex strings; anything else could smuggle wildcards or dots into a subject.
_AGENT_ID = re.compile(r"^[0-9a-f]{32}$")


def _checked(agent_id: str) -> str:
    if not _AGENT_ID.fullmatch(agent_id):
        raise ValueError(f"agent id must be 32 lowercase hex characters, got {agent_id!r}")
    return agent_id


def agent_command(agent_id: str, kind: CommandKind) -> str:
    return f"agent.{_checked(agent_id)}.{kind}"


def agent_commands_filter(agent_id: str) -> str:
    """Filter of an agent's durable consumer on AGENT_COMMANDS: everything addressed to it."""
    return f"agent.{_checked(agent_id)}.>"


def agent_rpc(agent_id: str, name: Literal["db.test", "storage.test", "db.list"]) -> str:
    return f"agent.{_checked(agent_id)}.rpc.{name}"


def agent_report(agent_id: str, kind: RunKind, outcome: ReportOutcome) -> str:
    return f"agent.{_checked(agent_id)}.report.{kind}.{outcome}"


def agent_command_refused(agent_id: str) -> str:
    """Where an agent reports a command or request it refused (inside AGENT_REPORTS)."""
    return f"agent.{_checked(agent_id)}.report.command.refused"


def agent_progress(agent_id: str) -> str:
    return f"agent.{_checked(agent_id)}.progress"


def agent_heartbeat(agent_id: str) -> str:
    return f"agent.{_checked(agent_id)}.heartbeat"


def agent_inbox_prefix(agent_id: str) -> str:
    return f"_INBOX.{_checked(agent_id)}"


def agent_credentials_renew(agent_id: str) -> str:
    """Request/reply: the agent asks the API for a fresh NATS user JWT (JWT mode only)."""
    return f"agent.{_checked(agent_id)}.credentials.renew"


ALL_PROGRESS = "agent.*.progress"
ALL_HEARTBEATS = "agent.*.heartbeat"
ALL_REPORTS = "agent.*.report.>"
ALL_CREDENTIAL_RENEWALS = "agent.*.credentials.renew"

BACKUP_REQUESTED = "backup.requested"
VERIFY_REQUESTED = "verify.requested"
NOTIFICATION_DEAD_LETTER = "notification.deadletter"


def agent_id_of(subject: str) -> str:
    """The agent id in `agent.<id>.…`; the API trusts this (NATS permissions bind it), never the body."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "agent":
        raise ValueError(f"not an agent subject: {subject!r}")
    return _checked(parts[1])


def event_subject(event_type: str) -> str:
    """Domain events are published on a subject equal to their type, e.g. `backup.completed`."""
    return event_type
