"""Notification channels, and the targets the API attaches to each domain event.

The notifier has no database: every event carries whom to tell. Email recipients travel in clear;
a webhook's URL and signing secret (and a Slack URL, itself a credential) are sealed to the
notifier's X25519 key for that one event and channel.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import structlog
from rahatback_contracts import messages as m
from rahatback_contracts import subjects
from rahatback_contracts.sealing import seal
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col, select

from rahatback_api.columns import utcnow
from rahatback_api.context import AppContext, app_context
from rahatback_api.errors import AppError, Conflict, NotFound
from rahatback_api.messaging.outbox import enqueue
from rahatback_api.models import BackupJob
from rahatback_api.notifications.models import (
    DEFAULT_EVENTS,
    NotificationChannel,
    NotificationChannelCreate,
    NotificationChannelPublic,
    NotificationChannelUpdate,
)
from rahatback_api.security.secretbox import SecretBox

log = structlog.get_logger(__name__)

E = TypeVar("E", bound=m.DomainEvent)


def _aad(channel_id: str) -> bytes:
    return f"notification-channel:{channel_id}".encode()


def channel_public(channel: NotificationChannel) -> NotificationChannelPublic:
    secrets = bool(channel.secrets_encrypted)
    return NotificationChannelPublic(
        id=channel.id,
        name=channel.name,
        kind=channel.kind,
        enabled=channel.enabled,
        events=list(channel.events),
        job_ids=None if channel.job_ids is None else list(channel.job_ids),
        recipients=list(channel.recipients),
        has_url=secrets,
        has_secret=secrets and channel.kind == "webhook",
        created_at=channel.created_at,
        updated_at=channel.updated_at,
    )


async def _check_jobs(session: AsyncSession, org_id: str, job_ids: list[str] | None) -> None:
    if not job_ids:
        return
    found = set(
        (
            await session.execute(
                select(BackupJob.id).where(BackupJob.org_id == org_id, col(BackupJob.id).in_(job_ids))
            )
        ).scalars()
    )
    missing = sorted(set(job_ids) - found)
    if missing:
        raise AppError(
            f"no such backup job(s) in this organization: {', '.join(missing)}", 422, field="job_ids"
        )


async def _check_name_free(
    session: AsyncSession, org_id: str, name: str, exclude_id: str | None = None
) -> None:
    query = select(NotificationChannel.id).where(
        NotificationChannel.org_id == org_id, NotificationChannel.name == name
    )
    if exclude_id is not None:
        query = query.where(NotificationChannel.id != exclude_id)
    if (await session.execute(query)).first() is not None:
        raise Conflict(f"a notification channel named {name!r} already exists", field="name")


def _require_notifier_key(kind: str, notifier_public_key: str | None) -> None:
    if kind != "email" and notifier_public_key is None:
        raise Conflict(
            f"{kind} channels need the notifier's public key so their URL travels sealed: "
            "set RAHATBACK_NOTIFIER_PUBLIC_KEY on the API (printed by `rahatback-notifier keygen`)"
        )


async def create_channel(
    session: AsyncSession,
    box: SecretBox,
    org_id: str,
    data: NotificationChannelCreate,
    notifier_public_key: str | None,
) -> NotificationChannel:
    _require_notifier_key(data.kind, notifier_public_key)
    await _check_name_free(session, org_id, data.name)
    await _check_jobs(session, org_id, data.job_ids)
    channel = NotificationChannel(
        org_id=org_id,
        name=data.name,
        kind=data.kind,
        enabled=True if data.enabled is None else data.enabled,
        events=sorted(DEFAULT_EVENTS) if data.events is None else data.events,
        job_ids=data.job_ids,
        recipients=[str(r) for r in data.recipients or []],
    )
    if data.url is not None:
        secrets = {"url": str(data.url), **({"secret": data.secret} if data.secret else {})}
        channel.secrets_encrypted = box.encrypt(json.dumps(secrets).encode(), _aad(channel.id))
    session.add(channel)
    await session.flush()
    return channel


async def list_channels(session: AsyncSession, org_id: str) -> list[NotificationChannel]:
    result = await session.execute(
        select(NotificationChannel)
        .where(NotificationChannel.org_id == org_id)
        .order_by(col(NotificationChannel.name))
    )
    return list(result.scalars())


async def get_channel(session: AsyncSession, org_id: str, channel_id: str) -> NotificationChannel:
    channel = await session.get(NotificationChannel, channel_id)
    if channel is None or channel.org_id != org_id:
        raise NotFound("notification channel")
    return channel


async def update_channel(
    session: AsyncSession, box: SecretBox, org_id: str, channel_id: str, data: NotificationChannelUpdate
) -> NotificationChannel:
    channel = await get_channel(session, org_id, channel_id)
    fields = data.model_fields_set
    if data.name is not None and data.name != channel.name:
        await _check_name_free(session, org_id, data.name, exclude_id=channel.id)
        channel.name = data.name
    if data.enabled is not None:
        channel.enabled = data.enabled
    if data.events is not None:
        channel.events = data.events
    if "job_ids" in fields:
        await _check_jobs(session, org_id, data.job_ids)
        channel.job_ids = data.job_ids
    if data.recipients is not None:
        if channel.kind != "email":
            raise AppError("`recipients` are for email channels", 422, field="recipients")
        if not data.recipients:
            raise AppError("an email channel needs at least one address", 422, field="recipients")
        channel.recipients = [str(r) for r in data.recipients]
    if data.url is not None or data.secret is not None:
        if channel.kind == "email":
            raise AppError("email channels take no `url` or `secret`", 422, field="url")
        if data.secret is not None and channel.kind != "webhook":
            raise AppError("only webhook channels take a signing `secret`", 422, field="secret")
        # write-only fields: what is not sent stays as stored
        secrets = _channel_secrets(box, channel)
        if data.url is not None:
            secrets["url"] = str(data.url)
        if data.secret is not None:
            secrets["secret"] = data.secret
        channel.secrets_encrypted = box.encrypt(json.dumps(secrets).encode(), _aad(channel.id))
    channel.updated_at = utcnow()
    await session.flush()
    return channel


async def delete_channel(session: AsyncSession, org_id: str, channel_id: str) -> None:
    await session.delete(await get_channel(session, org_id, channel_id))
    await session.flush()


def _channel_secrets(box: SecretBox, channel: NotificationChannel) -> dict[str, Any]:
    if channel.secrets_encrypted is None:
        return {}
    secrets: dict[str, Any] = json.loads(box.decrypt(channel.secrets_encrypted, _aad(channel.id)))
    return secrets


# ------------------------------------------------------------------------------------ events


async def _targets(
    session: AsyncSession, ctx: AppContext, event: m.DomainEvent, job_id: str | None
) -> list[m.NotifyTarget]:
    channels = (
        await session.execute(
            select(NotificationChannel).where(
                NotificationChannel.org_id == event.org_id, col(NotificationChannel.enabled).is_(True)
            )
        )
    ).scalars()
    targets = []
    for channel in channels:
        if event.type not in channel.events:
            continue
        if channel.job_ids is not None and (job_id is None or job_id not in channel.job_ids):
            continue
        sealed = None
        if channel.kind != "email":
            if ctx.notifier_public_key is None:
                log.warning("notify.skipped_no_notifier_key", channel_id=channel.id, event=event.type)
                continue
            info = m.seal_info("notify", f"{event.event_id}:{channel.id}")
            sealed = seal(ctx.notifier_public_key, _channel_secrets(ctx.box, channel), info)
        targets.append(
            m.NotifyTarget(
                channel_id=channel.id,
                channel_name=channel.name,
                kind=channel.kind,
                recipients=list(channel.recipients),
                secrets=sealed,
            )
        )
    return targets


async def enqueue_event(
    session: AsyncSession, event: E, msg_id: str, *, job_id: str | None = None, link_path: str | None = None
) -> E:
    """Publish a domain event after the commit (outbox), with whom to notify attached.

    `job_id` scopes per-job channels; `link_path` (e.g. `/v1/backups/history/<run id>`) becomes the
    event's link under the API's public URL.
    """
    ctx = app_context(session)
    targets = await _targets(session, ctx, event, job_id)
    link = f"{ctx.public_url.rstrip('/')}{link_path}" if link_path else None
    event = event.model_copy(update={"notify": targets, "link": link})
    enqueue(session, subjects.event_subject(event.type), event, msg_id)
    return event
