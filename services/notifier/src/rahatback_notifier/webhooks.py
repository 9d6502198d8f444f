"""Webhooks: a generic signed JSON POST and Slack-compatible incoming webhooks.

Generic webhook requests carry:
  X-RahatBack-Event: the event type, e.g. `backup.completed`
  X-RahatBack-Delivery: `<event id>.<channel id>`, the same for every retry (receivers dedupe on it)
  X-RahatBack-Timestamp: Unix seconds when this attempt was signed
  X-RahatBack-Signature: `sha256=` + hex HMAC-SHA256(secret, f"{timestamp}.{raw body}")
A receiver recomputes the HMAC over the raw body bytes it received, compares it in constant time,
and rejects timestamps too far from its clock (replays). See docs/notifications.md.

The URL (and Slack's URL is itself a credential) never appears in an error message or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from . import __version__
from .rendering import Rendered

__all__ = ["WebhookError", "WebhookSender", "sign", "slack_payload"]

USER_AGENT = f"RahatBack-Notifier/{__version__}"
_SLACK_SECTION_MAX = 2900  # Slack refuses section texts over 3000 characters


class WebhookError(Exception):
    """The receiver did not take the notification; the message never contains the URL or secret."""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(rendered: Rendered, link: str | None) -> dict[str, Any]:
    body = rendered.text.split("\n-- \n", 1)[0].strip()  # the plain text without the email signature
    text = rendered.subject + (f"\n{link}" if link else "")
    section = _slack_escape(body)
    if len(section) > _SLACK_SECTION_MAX:
        section = section[: _SLACK_SECTION_MAX - 1] + "…"
    return {
        "text": text,  # what notifications and clients without blocks show
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": rendered.subject[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": section or rendered.subject}},
        ],
    }


def _scrubbed(text: str, secrets: list[str]) -> str:
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


class WebhookSender:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post_generic(
        self, url: str, secret: str | None, payload: dict[str, Any], *, event_type: str, delivery_id: str
    ) -> int:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-RahatBack-Event": event_type,
            "X-RahatBack-Delivery": delivery_id,
            "X-RahatBack-Timestamp": timestamp,
        }
        if secret:
            headers["X-RahatBack-Signature"] = sign(secret, timestamp, body)
        return await self._post(url, body, headers, [secret or ""])

    async def post_slack(self, url: str, rendered: Rendered, link: str | None) -> int:
        body = json.dumps(slack_payload(rendered, link), ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        return await self._post(url, body, headers, [])

    async def _post(self, url: str, body: bytes, headers: dict[str, str], secrets: list[str]) -> int:
        parts = urlsplit(url)
        hidden = [url, parts.netloc, parts.path if len(parts.path) > 1 else "", parts.query, *secrets]
        try:
            response = await self.client.post(url, content=body, headers=headers)
        except Exception as exc:  # httpx.HTTPError, InvalidURL, ...: some messages quote the URL
            detail = _scrubbed(str(exc), hidden) or "no detail"
            raise WebhookError(f"request failed ({type(exc).__name__}): {detail}") from None
        if not response.is_success:
            raise WebhookError(f"the receiver answered HTTP {response.status_code}")
        return response.status_code
