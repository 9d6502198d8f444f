"""Request dependencies for the objects the lifespan creates (settings, the secret box)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from rahatback_api.security.secretbox import SecretBox
from rahatback_api.settings import Settings


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _secretbox(request: Request) -> SecretBox:
    box: SecretBox = request.app.state.secretbox
    return box


SettingsDep = Annotated[Settings, Depends(_settings)]
SecretBoxDep = Annotated[SecretBox, Depends(_secretbox)]
