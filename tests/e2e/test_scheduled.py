"""Backups that run by themselves: scheduler → API → agent, retention, and email through a real SMTP server.

The stack is started the way `make up` starts it (nats-server, API, scheduler, notifier, agent), with
the notifier pointed at an aiosmtpd server on loopback.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.devstack import BIN, Stack
from tests.e2e.conftest import Client, sqlite_and_folder, stack_logs
from tests.notifier.conftest import SmtpServer, running_smtp
from tests.servers import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    with running_smtp() as server:
        yield server


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, smtp: SmtpServer) -> Iterator[Client]:
    var = tmp_path_factory.mktemp("scheduled-stack")
    stack = Stack(var, api_port=free_port(), nats_port=free_port())
    stack.env.update(
        {
            "RAHATBACK_NOTIFIER_SMTP_HOST": smtp.host,
            "RAHATBACK_NOTIFIER_SMTP_PORT": str(smtp.port),
            "RAHATBACK_NOTIFIER_SMTP_SECURITY": "none",
            "RAHATBACK_NOTIFIER_MAIL_FROM": "RahatBack <backups@example.com>",
        }
    )
    try:
        yield Client(stack, stack.start())
    finally:
        stack.stop()


def wait_until(what: str, check: Callable[[], Any], stack: Client, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{stack_logs(stack.stack.var)[-6000:]}")


def emails_about(smtp: SmtpServer, run_id: str) -> list[Any]:
    return [m for m in smtp.messages if run_id in m.part("plain")]


def test_a_schedule_runs_by_itself_prunes_with_retention_and_emails_each_success(
    stack: Client, smtp: SmtpServer, tmp_path: Path
) -> None:
    setup = sqlite_and_folder(stack, tmp_path, "shop")
    db, storage, folder = setup.database, setup.storage, setup.folder
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {
            "name": "every-20-seconds",
            "database_id": db["id"],
            "storage_id": storage["id"],
            "cron": "* * * * * */20",  # croniter's 6th field: seconds
            "retention": {"keep_last": 1},
        },
    )
    stack.ok(
        "POST",
        "/v1/notifications/channels",
        {"name": "dba", "kind": "email", "recipients": ["dba@example.com"], "events": ["backup.completed"]},
    )

    def scheduled_successes() -> list[dict[str, Any]]:
        runs = stack.ok("GET", f"/v1/backups/history?job_id={job['id']}&status=completed")["items"]
        done = [r for r in runs if r["trigger"] == "schedule"]
        return done if len(done) >= 2 else []

    runs = wait_until("two scheduled backups", scheduled_successes, stack)
    stack.ok("PATCH", f"/v1/backups/jobs/{job['id']}", {"enabled": False})
    newest, older = runs[0], runs[1]

    # retention (keep 1) deleted the older artifact and its manifest; the newest is intact
    pruned = wait_until(
        "the older backup to be pruned",
        lambda: (r := stack.ok("GET", f"/v1/backups/history/{older['id']}"))["pruned_at"] and r,
        stack,
    )
    assert pruned["prune_error"] is None
    assert not (folder / older["storage_key"]).exists()
    assert not (folder / older["manifest_key"]).exists()
    assert (folder / newest["storage_key"]).stat().st_size == newest["artifact_size"]
    assert stack.ok("GET", f"/v1/backups/history/{newest['id']}")["pruned_at"] is None

    # one email per success, to the channel's recipient, naming job and database
    for run in (older, newest):
        received = wait_until(
            f"the email about {run['id']}", lambda r=run: emails_about(smtp, r["id"]), stack
        )
        assert len(received) == 1
        assert received[0].rcpt_tos == ["dba@example.com"]
        subject = str(received[0].message["Subject"])
        assert "every-20-seconds" in subject and "shop" in subject


def test_an_event_committed_while_the_notifier_is_down_is_emailed_exactly_once(
    stack: Client, smtp: SmtpServer, tmp_path: Path
) -> None:
    setup = sqlite_and_folder(stack, tmp_path, "crm")
    db, storage = setup.database, setup.storage
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {"name": "crm-manual", "database_id": db["id"], "storage_id": storage["id"]},
    )

    stack.stack.stop_child("notifier")
    run = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    wait_until(
        "the backup to complete",
        lambda: stack.ok("GET", f"/v1/backups/history/{run['id']}")["status"] == "completed",
        stack,
    )
    time.sleep(2)
    assert emails_about(smtp, run["id"]) == []  # nobody was there to send it

    stack.stack.spawn("notifier", [str(BIN / "rahatback-notifier"), "run"])
    wait_until("the email after the notifier came back", lambda: emails_about(smtp, run["id"]), stack)
    time.sleep(3)  # a redelivery would show up here
    assert len(emails_about(smtp, run["id"])) == 1


def test_a_scheduled_verification_runs_by_itself_and_a_corrupt_backup_is_reported(
    stack: Client, smtp: SmtpServer, tmp_path: Path
) -> None:
    setup = sqlite_and_folder(stack, tmp_path, "ledger")
    db, storage, folder = setup.database, setup.storage, setup.folder
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {"name": "ledger-verified", "database_id": db["id"], "storage_id": storage["id"]},
    )
    stack.ok(
        "POST",
        "/v1/notifications/channels",
        {"name": "auditors", "kind": "email", "recipients": ["audit@example.com"], "job_ids": [job["id"]]},
    )
    run = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    run = wait_until(
        "the backup",
        lambda: (r := stack.ok("GET", f"/v1/backups/history/{run['id']}"))["status"] == "completed" and r,
        stack,
    )
    # a test restore every 15 seconds, by the scheduler alone
    stack.ok(
        "PATCH",
        f"/v1/backups/jobs/{job['id']}",
        {"verify_cron": "* * * * * */15", "verify_level": "test_restore"},
    )

    def verified(status: str) -> list[dict[str, Any]]:
        items = stack.ok("GET", f"/v1/backups/verifications?job_id={job['id']}")["items"]
        return [v for v in items if v["trigger"] == "schedule" and v["status"] == status]

    passed = wait_until("a scheduled verification that passes", lambda: verified("completed"), stack)
    assert passed[0]["backup_run_id"] == run["id"] and passed[0]["tables_compared"] >= 1
    assert passed[0]["mismatches"] == []
    shown = stack.ok("GET", f"/v1/backups/jobs/{job['id']}")
    assert shown["last_verify_ok_at"] is not None

    # a flipped bit in the stored artifact: the next scheduled verification fails and says so
    artifact = folder / run["storage_key"]
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    failed = wait_until("a scheduled verification that fails", lambda: verified("failed"), stack)
    stack.ok("PATCH", f"/v1/backups/jobs/{job['id']}", {"verify_cron": None})
    assert failed[0]["error"]
    assert stack.ok("GET", f"/v1/backups/jobs/{job['id']}")["last_verify_status"] == "failed"
    mails = wait_until(
        "the verification failure email",
        lambda: [m for m in smtp.messages if "Verification FAILED" in str(m.message["Subject"])],
        stack,
    )
    assert mails[0].rcpt_tos == ["audit@example.com"] and "ledger-verified" in str(
        mails[0].message["Subject"]
    )
