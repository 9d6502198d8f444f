"""Templates without servers: every event family renders a subject a person can triage from."""

from __future__ import annotations

import json
from typing import Any

import pytest
from rahatback_contracts.messages import parse_event
from rahatback_notifier.rendering import Rendered, human_duration, human_size, render

BASE: dict[str, Any] = {
    "event_id": "e1",
    "org_id": "o1",
    "occurred_at": "2026-11-26T10:15:00Z",
    "link": "https://backup.example.com/v1/backups/history/r1",
}


def rendered(event_type: str, **fields: Any) -> Rendered:
    data = {**BASE, "type": event_type, **fields}
    return render(parse_event(json.dumps(data).encode()), data)


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "unknown"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (5 * 1024**3, "5.0 GiB")],
)
def test_human_size(size: int | None, text: str) -> None:
    assert human_size(size) == text


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "unknown"),
        (850, "850 ms"),
        (12_300, "12.3 s"),
        (125_000, "2 min 05 s"),
        (3_780_000, "1 h 03 min"),
    ],
)
def test_human_duration(ms: int | None, text: str) -> None:
    assert human_duration(ms) == text


RESTORE = {"restore_id": "x1", "backup_run_id": "r7", "database_id": "d1", "database_name": "orders_db"}
OVERDUE = {
    "job_id": "j1",
    "job_name": "Nightly",
    "database_id": "d1",
    "database_name": "orders_db",
    "cron": "0 3 * * *",
    "timezone": "Europe/Istanbul",
    "expected_by": "2026-11-26T01:30:00Z",
}


@pytest.mark.parametrize(
    ("event_type", "fields", "subject", "in_body"),
    [
        (
            "restore.completed",
            {**RESTORE, "status": "completed", "duration_ms": 61_000, "job_name": "Nightly"},
            "✅ Restore succeeded: orders_db (from Nightly)",
            "1 min 01 s",
        ),
        (
            "restore.failed",
            {**RESTORE, "status": "failed", "error": "pg_restore: relation exists"},
            "❌ Restore FAILED: orders_db",
            "pg_restore: relation exists",
        ),
        (
            "backup.overdue",
            {**OVERDUE, "last_success_at": "2026-11-24T00:00:00Z"},
            "⏰ Backup overdue: Nightly (orders_db)",
            "2026-11-26 04:30 Europe/Istanbul (2026-11-26 01:30 UTC)",
        ),
        (
            "backup.overdue",
            OVERDUE,  # never succeeded
            "⏰ Backup overdue: Nightly (orders_db)",
            "No successful backup of orders_db yet",
        ),
        (
            "presence.offline",
            {"agent_id": "a1", "agent_name": "db-host-1", "online": False},
            "🔌 Agent offline: db-host-1",
            "stopped reporting at 2026-11-26 10:15 UTC",
        ),
        (
            "presence.online",
            {"agent_id": "a1", "agent_name": "db-host-1", "online": True},
            "🟢 Agent back online: db-host-1",
            "reporting again",
        ),
        (
            "verify.failed",
            {
                "verify_id": "v1",
                "backup_run_id": "r9",
                "job_name": "Nightly",
                "database_id": "d1",
                "database_name": "orders_db",
                "level": "test_restore",
                "status": "failed",
                "mismatches": [{"table": "public.orders", "expected": 1000, "found": 640}],
                "error": "public.orders expected 1000 rows, found 640",
            },
            "❌ Verification FAILED: Nightly (orders_db)",
            "1000 rows at backup time, 640 after the test restore",
        ),
        (
            "backup.partial",
            {
                "run_id": "r1",
                "job_id": "j1",
                "job_name": "Nightly",
                "database_id": "d1",
                "database_name": "orders_db",
                "status": "partial",
                "error": "2 of 3 storages failed",
            },
            "⚠️ Backup PARTIAL: Nightly (orders_db)",
            "2 of 3 storages failed",
        ),
        (
            "something.new",
            {"widget": "sprocket"},
            "RahatBack: something.new",
            "sprocket",
        ),
    ],
)
def test_every_family_renders_subject_text_and_html(
    event_type: str, fields: dict[str, Any], subject: str, in_body: str
) -> None:
    out = rendered(event_type, **fields)
    assert out.subject == subject
    assert in_body in out.text
    assert in_body in out.html
    assert BASE["link"] in out.text and f'href="{BASE["link"]}"' in out.html


def test_html_is_escaped_and_links_must_be_web_links() -> None:
    out = rendered(
        "presence.offline",
        agent_id="a1",
        agent_name="<script>alert(1)</script>",
        online=False,
        link="javascript:alert(1)",
    )
    assert "<script>" not in out.html and "&lt;script&gt;" in out.html
    assert "javascript:" not in out.html and "javascript:" not in out.text


def test_subject_is_one_bounded_line() -> None:
    out = rendered(
        "presence.offline",
        agent_id="a1",
        agent_name="evil\r\nBcc: victim@example.com" + "x" * 500,
        online=False,
    )
    assert "\n" not in out.subject and "\r" not in out.subject
    assert len(out.subject) <= 200
