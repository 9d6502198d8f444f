from __future__ import annotations

from fastapi import APIRouter, status

from rahatback_api.auth.deps import AdminPrincipal, CurrentPrincipal
from rahatback_api.db import SessionDep
from rahatback_api.deps import SecretBoxDep, SettingsDep
from rahatback_api.notifications import service
from rahatback_api.notifications.models import (
    NotificationChannelCreate,
    NotificationChannelPublic,
    NotificationChannelUpdate,
)

router = APIRouter(prefix="/v1/notifications/channels", tags=["notifications"])


@router.post("", response_model=NotificationChannelPublic, status_code=status.HTTP_201_CREATED)
async def create_channel(
    body: NotificationChannelCreate,
    principal: AdminPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
    settings: SettingsDep,
) -> NotificationChannelPublic:
    channel = await service.create_channel(session, box, principal.org_id, body, settings.notifier_public_key)
    return service.channel_public(channel)


@router.get("", response_model=list[NotificationChannelPublic])
async def list_channels(principal: CurrentPrincipal, session: SessionDep) -> list[NotificationChannelPublic]:
    return [service.channel_public(c) for c in await service.list_channels(session, principal.org_id)]


@router.get("/{channel_id}", response_model=NotificationChannelPublic)
async def get_channel(
    channel_id: str, principal: CurrentPrincipal, session: SessionDep
) -> NotificationChannelPublic:
    return service.channel_public(await service.get_channel(session, principal.org_id, channel_id))


@router.patch("/{channel_id}", response_model=NotificationChannelPublic)
async def update_channel(
    channel_id: str,
    body: NotificationChannelUpdate,
    principal: AdminPrincipal,
    session: SessionDep,
    box: SecretBoxDep,
) -> NotificationChannelPublic:
    channel = await service.update_channel(session, box, principal.org_id, channel_id, body)
    return service.channel_public(channel)


@router.delete("/{channel_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_channel(channel_id: str, principal: AdminPrincipal, session: SessionDep) -> None:
    await service.delete_channel(session, principal.org_id, channel_id)
