"""The shared language: subjects resist wildcard forgery, messages round-trip, streams never overlap."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from rahatback_contracts import messages as m
from rahatback_contracts import streams, subjects

AGENT = "0123456789abcdef0123456789abcdef"  # fixed: it names parametrized tests (pytest-xdist)


def test_subjects_are_built_from_checked_agent_ids() -> None:
    assert subjects.agent_command(AGENT, "job.execute") == f"agent.{AGENT}.job.execute"
    assert subjects.agent_report(AGENT, "backup", "completed") == f"agent.{AGENT}.report.backup.completed"
    assert subjects.agent_inbox_prefix(AGENT) == f"_INBOX.{AGENT}"
    assert subjects.agent_id_of(subjects.agent_progress(AGENT)) == AGENT


@pytest.mark.parametrize("bad", ["*", ">", "a.b", "", AGENT.upper(), AGENT + "0", "x" * 32])
def test_agent_ids_that_could_widen_a_subject_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="agent id"):
        subjects.agent_heartbeat(bad)
    with pytest.raises(ValueError):
        subjects.agent_id_of(f"agent.{bad}.heartbeat")


def test_messages_round_trip_and_are_frozen() -> None:
    now = datetime.now(UTC)
    report = m.BackupCompleted(
        agent_id=AGENT,
        occurred_at=now,
        run_id="r1",
        started_at=now,
        finished_at=now,
        storage_key="k",
        manifest_key="k.manifest.json",
        dump_size=10,
        artifact_size=5,
        dump_sha256="a" * 64,
        artifact_sha256="b" * 64,
        dump_format="postgresql-plain-sql",
        agent_version="0.1.0",
    )
    again = m.BackupCompleted.from_bytes(report.to_bytes())
    assert again == report and again.schema_version == 1
    with pytest.raises(ValidationError):
        report.dump_size = 11  # type: ignore[misc]


def test_newer_producers_may_add_fields() -> None:
    body = b'{"agent_id": "%s", "version": "9", "at": "2026-01-01T00:00:00Z", "future": 1}' % AGENT.encode()
    assert m.Heartbeat.from_bytes(body).version == "9"


def test_stream_subjects_never_overlap() -> None:
    owned = [(spec.name, subject) for spec in streams.ALL_STREAMS for subject in spec.subjects]
    for i, (name_a, a) in enumerate(owned):
        for name_b, b in owned[i + 1 :]:
            assert not _overlap(a, b), f"{name_a}:{a} overlaps {name_b}:{b}"


def test_events_stream_carries_every_event_type_but_not_control() -> None:
    assert "backup.requested" not in streams.EVENTS.subjects
    assert subjects.BACKUP_REQUESTED in streams.CONTROL.subjects
    assert streams.AGENT_COMMANDS.retention == "workqueue"
    consumer = streams.agent_commands_consumer(AGENT)
    assert consumer.filter_subjects == (f"agent.{AGENT}.>",) and consumer.durable == f"agent-{AGENT}"


def _overlap(a: str, b: str) -> bool:
    """NATS subject overlap: `*` matches one token, `>` the rest."""
    ta, tb = a.split("."), b.split(".")
    for i, (x, y) in enumerate(zip(ta, tb, strict=False)):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
        if i == min(len(ta), len(tb)) - 1 and len(ta) != len(tb):
            return False
    return len(ta) == len(tb)


@pytest.mark.parametrize("reply_model", [m.DbTestReply, m.DbListReply, m.StorageTestReply])
def test_every_rpc_reply_model_reads_the_agents_failure_reply(
    reply_model: type[m.DbTestReply | m.DbListReply | m.StorageTestReply],
) -> None:
    """The agent answers a refused or crashed request of any kind with one shape; the API reads it
    with the reply model of the request it sent (operations.service.ask_agent)."""
    failure = m.RpcFailureReply(error_code="refused", error="the agent refused this request: replayed")
    reply = reply_model.from_bytes(failure.to_bytes())
    assert isinstance(reply, reply_model)
    assert (reply.ok, reply.error_code, reply.error) == (False, "refused", failure.error)
