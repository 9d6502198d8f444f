"""Per-kind storage settings schemas. Adding a kind (s3, gdrive): one schema and one `KINDS` line."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from rahatback_api.settings_schemas import SettingsSpec, absolute_path


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, AfterValidator(absolute_path)] = Field(min_length=1, max_length=4096)


KINDS: dict[str, SettingsSpec] = {
    "local": SettingsSpec(LocalSettings, frozenset()),
}

StorageKindName = Literal["local"]
