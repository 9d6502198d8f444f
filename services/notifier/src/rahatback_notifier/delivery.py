"""One notification to one channel: open its sealed secrets, render, hand it over.

Every failure becomes a `DeliveryError` whose message is safe to log and to dead-letter: it names
what went wrong, never a URL, a signing secret or a password.
"""

from __future__ import annotations

from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_contracts.messages import DomainEvent, NotifyTarget, seal_info
from rahatback_contracts.sealing import SealingError, open_sealed

from .email import EmailError, Mailer, build_message
from .rendering import render, render_context
from .webhooks import WebhookError, WebhookSender

__all__ = ["Deliverer", "DeliveryError", "delivery_id", "seal_binding"]

log = structlog.get_logger(__name__)


class DeliveryError(Exception):
    """`permanent`: retrying cannot help (e.g. secrets sealed to another key); dead-letter at once."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent


def delivery_id(event_id: str, channel_id: str) -> str:
    """The idempotency key of one notification, also sent to webhook receivers."""
    return f"{event_id}.{channel_id}"


def seal_binding(event_id: str, channel_id: str) -> str:
    """What a channel's secrets are sealed to (HPKE info), see `NotifyTarget`."""
    return seal_info("notify", f"{event_id}:{channel_id}")


class Deliverer:
    def __init__(
        self,
        *,
        private_key: X25519PrivateKey | None,
        mailer: Mailer,
        webhooks: WebhookSender,
        mail_from: str,
    ) -> None:
        self.private_key = private_key
        self.mailer = mailer
        self.webhooks = webhooks
        self.mail_from = mail_from

    async def deliver(self, event: DomainEvent, data: dict[str, Any], target: NotifyTarget) -> None:
        if target.kind == "email":
            await self._email(event, data, target)
            return
        url, secret = self._open_secrets(event, target)
        try:
            if target.kind == "webhook":
                payload = {key: value for key, value in data.items() if key != "notify"}
                await self.webhooks.post_generic(
                    url,
                    secret,
                    payload,
                    event_type=event.type,
                    delivery_id=delivery_id(event.event_id, target.channel_id),
                )
            else:
                link = render_context(event, data)["link"]
                await self.webhooks.post_slack(url, render(event, data), link)
        except WebhookError as exc:
            raise DeliveryError(f"{target.kind}: {exc}") from None

    async def _email(self, event: DomainEvent, data: dict[str, Any], target: NotifyTarget) -> None:
        if not target.recipients:
            raise DeliveryError("email channel without recipients", permanent=True)
        try:
            message = build_message(
                render(event, data),
                mail_from=self.mail_from,
                recipients=target.recipients,
                event_id=event.event_id,
                channel_id=target.channel_id,
            )
        except ValueError as exc:  # e.g. an address the email library cannot put in a header
            raise DeliveryError(f"email: cannot build the message: {exc}", permanent=True) from None
        try:
            where = await self.mailer.send(message)
        except EmailError as exc:
            raise DeliveryError(f"email: {exc}") from None
        log.info(
            "email.handed_over", to=where, recipients=len(target.recipients), channel_id=target.channel_id
        )

    def _open_secrets(self, event: DomainEvent, target: NotifyTarget) -> tuple[str, str | None]:
        if self.private_key is None:
            raise DeliveryError(
                f"{target.kind}: the notifier has no private key to open the channel's sealed URL "
                "(set RAHATBACK_NOTIFIER_PRIVATE_KEY or RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE)",
                permanent=True,
            )
        if target.secrets is None:
            raise DeliveryError(f"{target.kind}: the channel carries no sealed URL", permanent=True)
        try:
            opened = open_sealed(
                self.private_key, target.secrets, seal_binding(event.event_id, target.channel_id)
            )
        except SealingError as exc:
            raise DeliveryError(f"{target.kind}: {exc}", permanent=True) from None
        url = opened.get("url")
        secret = opened.get("secret")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise DeliveryError(f"{target.kind}: the sealed URL is not an http(s) URL", permanent=True)
        if secret is not None and not isinstance(secret, str):
            raise DeliveryError(f"{target.kind}: the sealed signing secret is not a string", permanent=True)
        return url, secret or None
