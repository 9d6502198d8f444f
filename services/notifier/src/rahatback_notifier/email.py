"""Email: a multipart/alternative message (plain text + HTML) sent over SMTP, or, in dev mode, written
to an outbox folder as an `.eml` file a person can open with any mail client."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from pathlib import Path
from typing import Protocol

import aiosmtplib
import structlog

from .rendering import Rendered
from .settings import NotifierSettings

__all__ = ["EmailError", "Mailer", "OutboxMailer", "SmtpMailer", "build_message", "mailer_for"]

log = structlog.get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class EmailError(Exception):
    """The email could not be handed over; the message says why (never a password)."""


class Mailer(Protocol):
    async def send(self, message: EmailMessage) -> str:
        """Hand the message over; return where it went (for the log)."""
        ...


def _safe(part: str) -> str:
    return _UNSAFE.sub("_", part)[:64] or "_"


def build_message(
    rendered: Rendered, *, mail_from: str, recipients: list[str], event_id: str, channel_id: str
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = rendered.subject
    message["From"] = mail_from
    message["To"] = ", ".join(recipients)
    message["Date"] = formatdate(localtime=False, usegmt=True)
    domain = parseaddr(mail_from)[1].rpartition("@")[2] or "rahatback.local"
    # the same notification always has the same Message-ID: mail systems can drop a duplicate
    message["Message-ID"] = f"<{_safe(event_id)}.{_safe(channel_id)}@{_safe(domain)}>"
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


class SmtpMailer:
    def __init__(self, settings: NotifierSettings) -> None:
        if not settings.smtp_host:
            raise ValueError("SmtpMailer needs smtp_host")
        self.host = settings.smtp_host
        self.port = settings.resolved_smtp_port
        self.security = settings.smtp_security
        self.username = settings.smtp_username
        self.password = settings.smtp_password
        self.timeout = settings.smtp_timeout_seconds
        self.tls_context: ssl.SSLContext | None = None
        if self.security != "none":
            cafile = str(settings.smtp_ca_file) if settings.smtp_ca_file else None
            self.tls_context = ssl.create_default_context(cafile=cafile)

    async def send(self, message: EmailMessage) -> str:
        password = self.password.get_secret_value() if self.password is not None else None
        try:
            errors, _ = await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=password if self.username else None,
                use_tls=self.security == "tls",
                # never opportunistic: "none" means plain, "starttls" means STARTTLS or fail
                start_tls=self.security == "starttls",
                tls_context=self.tls_context,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            detail = str(exc) or type(exc).__name__
            if password:
                detail = detail.replace(password, "***")
            raise EmailError(f"SMTP {self.host}:{self.port}: {detail}") from None
        if errors:
            # some recipients were refused, the others accepted: retrying would mail those twice
            log.warning("email.recipients_refused", refused=len(errors), host=self.host)
        return f"smtp://{self.host}:{self.port}"


class OutboxMailer:
    """Dev mode: no SMTP server configured, every email becomes a file in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, message: EmailMessage) -> str:
        return str(await asyncio.to_thread(self._write, message))

    def _write(self, message: EmailMessage) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        msg_id = str(message["Message-ID"] or "").strip("<>").partition("@")[0]
        path = self.directory / f"{stamp}_{_safe(msg_id)}.eml"
        partial = path.with_suffix(".eml.partial")
        partial.write_bytes(bytes(message))
        os.replace(partial, path)  # a reader never sees half a message
        return path


def mailer_for(settings: NotifierSettings) -> Mailer:
    if settings.dev_mode:
        return OutboxMailer(settings.outbox_dir)
    return SmtpMailer(settings)
