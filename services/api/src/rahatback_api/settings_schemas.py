"""Validating per-engine / per-storage-kind settings, shared by the databases and storages registries."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError


def absolute_path(value: str) -> str:
    """A path on the agent's host; the agent may run on Linux or Windows."""
    if not (PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()):
        raise ValueError("must be an absolute path")
    return value


def invalid_field(
    loc: tuple[str | int, ...], message: str, kind: str = "value_error"
) -> RequestValidationError:
    """A 422 in FastAPI's own format, for checks that need more than one request field."""
    return RequestValidationError([{"type": kind, "loc": ("body", *loc), "msg": message, "input": None}])


@dataclass(frozen=True)
class SettingsSpec:
    """One engine or storage kind: its settings schema and which of its fields are secret."""

    schema: type[BaseModel]
    secret_fields: frozenset[str]

    def split(
        self, values: Mapping[str, Any], *, loc: tuple[str, ...] = ("settings",)
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validate and return (settings in clear, secrets); a 422 names the offending field."""
        try:
            model = self.schema.model_validate(dict(values))
        except ValidationError as exc:
            raise RequestValidationError(
                [
                    {"type": e["type"], "loc": ("body", *loc, *e["loc"]), "msg": e["msg"], "input": None}
                    for e in exc.errors()
                ]
            ) from None
        data = model.model_dump(mode="json", exclude_none=True)
        settings = {k: v for k, v in data.items() if k not in self.secret_fields}
        secrets = {k: v for k, v in data.items() if k in self.secret_fields}
        return settings, secrets

    def merge(
        self,
        stored_settings: Mapping[str, Any],
        stored_secrets: Mapping[str, Any],
        patch: Mapping[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply a partial update: omitted fields keep their value, a secret set to null is removed."""
        combined: dict[str, Any] = {**stored_settings, **stored_secrets}
        for key, value in patch.items():
            if value is None:
                combined.pop(key, None)
            else:
                combined[key] = value
        return self.split(combined)
