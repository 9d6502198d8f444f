"""Whatever fails, the rendered log lines never contain a webhook URL, a signing secret or the SMTP
password (CONVENTIONS: a test greps for them)."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Iterator

import pytest
import structlog
from nats.js import JetStreamContext
from rahatback_logging import configure_logging
from rahatback_notifier.main import QUIET_LOGGERS
from rahatback_notifier.settings import NotifierSettings

from tests.servers import free_port

from .conftest import (
    NotifierKey,
    TlsFiles,
    WebhookReceiver,
    backup_event,
    dead_letters,
    email_target,
    handled,
    publish,
    running_notifier,
    running_smtp,
    sealed_target,
)

SettingsFactory = Callable[..., NotifierSettings]


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The notifier's rendered log output: configure_logging binds whatever sys.stderr is."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    configure_logging("json", "debug", quiet=QUIET_LOGGERS)
    yield buffer
    structlog.reset_defaults()


async def test_secrets_never_reach_the_logs(
    stderr: io.StringIO,
    js: JetStreamContext,
    receiver: WebhookReceiver,
    tls_files: TlsFiles,
    notifier_key: NotifierKey,
    make_settings: SettingsFactory,
) -> None:
    receiver.statuses = [500]
    event_id = "evt-" + "f" * 28
    webhook_secret = "whsec-LOGS-must-not-see-this"
    webhook_url = receiver.url("/hooks/path-token-8d2f1a?key=query-token-5e7c")
    # nobody listens there: a connection error, whose message could quote the URL
    slack_url = f"http://127.0.0.1:{free_port()}/services/T0/B0/slack-token-93ab"
    targets = [
        sealed_target(notifier_key, event_id, "webhook", webhook_url, webhook_secret),
        sealed_target(notifier_key, event_id, "slack", slack_url),
        email_target("ops@example.com"),
    ]
    event = backup_event("backup.failed", event_id=event_id, notify=targets, error="boom")

    with running_smtp("starttls", tls_files) as server:
        settings = make_settings(
            smtp_host=server.host,
            smtp_port=server.port,
            smtp_security="starttls",
            smtp_username=server.login,
            smtp_password="wrong-Pa55word-LOGS-must-not-see",  # refused: AUTH fails every time
            smtp_ca_file=tls_files.cert,
            max_attempts=2,
        )
        async with running_notifier(settings, notifier_key):
            await handled(js, await publish(js, event))
    assert server.messages == []
    assert len(await dead_letters(js, event_id)) == 3

    logged = stderr.getvalue()
    lines = [json.loads(line) for line in logged.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    # the failures were logged, with their reasons...
    assert events.count("notification.dead_lettered") == 3
    failures = {line["kind"]: line["error"] for line in lines if line["event"] == "notification.failed"}
    assert "HTTP 500" in failures["webhook"]
    assert "SMTP" in failures["email"]
    assert failures["slack"]
    # ...and none of the secrets
    for secret in (
        webhook_secret,
        "path-token-8d2f1a",
        "query-token-5e7c",
        "slack-token-93ab",
        "wrong-Pa55word-LOGS-must-not-see",
    ):
        assert secret not in logged
