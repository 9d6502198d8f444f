"""Storage kind → implementation. Adding a storage = one module + one line here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rahatback_contracts.messages import StorageTarget

from .base import Storage, StorageError


def _local(settings: dict[str, Any], secrets: dict[str, Any]) -> Storage:
    from .local import LocalStorage

    return LocalStorage.from_settings(settings)


def _s3(settings: dict[str, Any], secrets: dict[str, Any]) -> Storage:
    from .s3 import S3Storage

    return S3Storage.from_settings(settings, secrets)


def _gdrive(settings: dict[str, Any], secrets: dict[str, Any]) -> Storage:
    from .gdrive import GDriveStorage

    return GDriveStorage.from_settings(settings, secrets)


_FACTORIES: dict[str, Callable[[dict[str, Any], dict[str, Any]], Storage]] = {
    "local": _local,
    "s3": _s3,
    "gdrive": _gdrive,
}

SUPPORTED_KINDS: tuple[str, ...] = tuple(_FACTORIES)


def get_storage(target: StorageTarget, secrets: dict[str, Any]) -> Storage:
    factory = _FACTORIES.get(target.kind)
    if factory is None:
        raise StorageError(
            "unsupported",
            f"this agent cannot use {target.kind!r} storages yet (supported: {', '.join(SUPPORTED_KINDS)})",
        )
    return factory(dict(target.settings), secrets)
