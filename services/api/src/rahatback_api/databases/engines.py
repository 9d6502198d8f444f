"""Per-engine settings schemas. Adding an engine: one schema class and one `ENGINES` line."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from rahatback_api.settings_schemas import SettingsSpec, absolute_path

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 422, not silently dropped


class PostgresqlSettings(_Strict):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=5432, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=128)
    database: str = Field(min_length=1, max_length=128)
    sslmode: SslMode | None = None
    password: str | None = Field(default=None, max_length=1024)  # secret


class SqliteSettings(_Strict):
    path: Annotated[str, AfterValidator(absolute_path)] = Field(min_length=1, max_length=4096)


ENGINES: dict[str, SettingsSpec] = {
    "postgresql": SettingsSpec(PostgresqlSettings, frozenset({"password"})),
    "sqlite": SettingsSpec(SqliteSettings, frozenset()),
}

EngineName = Literal["postgresql", "sqlite"]
