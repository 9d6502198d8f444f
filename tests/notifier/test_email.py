"""Email through a real SMTP server (aiosmtpd): what a recipient reads, over plain SMTP, STARTTLS and
implicit TLS with AUTH, and in dev mode from the outbox folder."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage

import pytest
from nats.js import JetStreamContext
from rahatback_notifier.settings import NotifierSettings

from .conftest import (
    Received,
    SmtpServer,
    TlsFiles,
    backup_event,
    email_target,
    handled,
    publish,
    running_notifier,
    running_smtp,
)

SettingsFactory = Callable[..., NotifierSettings]


def smtp_settings(make_settings: SettingsFactory, server: SmtpServer, **extra: object) -> NotifierSettings:
    return make_settings(smtp_host=server.host, smtp_port=server.port, smtp_security="none", **extra)


async def test_backup_completed_email_names_database_size_and_duration(
    js: JetStreamContext, smtp: SmtpServer, make_settings: SettingsFactory
) -> None:
    target = email_target("ops@example.com", "dba@example.com")
    event = backup_event("backup.completed", notify=[target])
    async with running_notifier(smtp_settings(make_settings, smtp), None):
        await handled(js, await publish(js, event))

    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert sorted(mail.rcpt_tos) == ["dba@example.com", "ops@example.com"]
    assert mail.mail_from == "backups@rahatback.test"
    assert mail.message["Subject"] == "✅ Backup succeeded: Nightly orders (orders_db)"
    assert mail.message.get_content_type() == "multipart/alternative"
    for body in (mail.part("plain"), mail.part("html")):
        assert "orders_db" in body
        assert "117.7 MiB" in body  # dump size
        assert "22.4 MiB" in body  # stored size
        assert "2 min 05 s" in body
        assert "http://127.0.0.1:8000/v1/backups/history/run-1" in body
    # the same notification always carries the same Message-ID, so mail systems can deduplicate it
    assert mail.message["Message-ID"] == f"<{event.event_id}.{target.channel_id}@rahatback.test>"


async def test_backup_failed_email_carries_the_error(
    js: JetStreamContext, smtp: SmtpServer, make_settings: SettingsFactory
) -> None:
    error = 'pg_dump: error: connection to server at "db.internal" (10.0.0.5), port 5432 failed'
    event = backup_event(
        "backup.failed",
        notify=[email_target("ops@example.com")],
        error=error,
        job_name="Hourly <billing> & co",
        dump_size=None,
        artifact_size=None,
        duration_ms=4_200,
    )
    async with running_notifier(smtp_settings(make_settings, smtp), None):
        await handled(js, await publish(js, event))

    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert mail.message["Subject"] == "❌ Backup FAILED: Hourly <billing> & co (orders_db)"
    text, html = mail.part("plain"), mail.part("html")
    assert error in text
    assert "orders_db" in text and "NOT backed up" in text
    # the HTML part escapes what users typed and what the database said
    assert "Hourly &lt;billing&gt; &amp; co" in html and "<billing>" not in html
    assert error.replace('"', "&#34;") in html


@pytest.mark.parametrize("security", ["starttls", "tls"])
async def test_smtp_over_tls_with_authentication(
    security: str, js: JetStreamContext, tls_files: TlsFiles, make_settings: SettingsFactory
) -> None:
    with running_smtp("starttls" if security == "starttls" else "tls", tls_files) as server:
        settings = make_settings(
            smtp_host=server.host,
            smtp_port=server.port,
            smtp_security=security,
            smtp_username=server.login,
            smtp_password=server.password,
            smtp_ca_file=tls_files.cert,
        )
        event = backup_event("backup.completed", notify=[email_target("ops@example.com")])
        async with running_notifier(settings, None):
            await handled(js, await publish(js, event))

    assert len(server.messages) == 1
    mail: Received = server.messages[0]
    assert mail.login == server.login  # the server saw the AUTH
    assert mail.rcpt_tos == ["ops@example.com"]
    assert "orders_db" in mail.part("plain")


async def test_dev_mode_writes_an_eml_file_a_person_can_open(
    js: JetStreamContext, make_settings: SettingsFactory
) -> None:
    settings = make_settings(smtp_host=None)
    assert settings.dev_mode
    event = backup_event("backup.completed", notify=[email_target("ops@example.com")])
    async with running_notifier(settings, None):
        await handled(js, await publish(js, event))

    files = sorted(settings.outbox_dir.glob("*.eml"))
    assert len(files) == 1, files
    message = message_from_bytes(files[0].read_bytes(), policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert message["To"] == "ops@example.com"
    assert message["Subject"] == "✅ Backup succeeded: Nightly orders (orders_db)"
    plain = message.get_body(preferencelist=("plain",))
    html = message.get_body(preferencelist=("html",))
    assert plain is not None and html is not None
    assert "117.7 MiB" in plain.get_content() and "orders_db" in plain.get_content()  # type: ignore[attr-defined]
    assert "2 min 05 s" in html.get_content()  # type: ignore[attr-defined]
    assert not list(settings.outbox_dir.glob("*.partial"))


async def test_event_without_targets_sends_nothing_and_is_acknowledged(
    js: JetStreamContext, smtp: SmtpServer, make_settings: SettingsFactory
) -> None:
    quiet = backup_event("backup.completed", notify=[])
    loud = backup_event("backup.completed", notify=[email_target("ops@example.com")])
    async with running_notifier(smtp_settings(make_settings, smtp), None):
        await publish(js, quiet)
        await handled(js, await publish(js, loud))
    assert len(smtp.messages) == 1
    assert smtp.messages[0].message["Message-ID"].startswith(f"<{loud.event_id}.")
