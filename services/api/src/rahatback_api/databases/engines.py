"""Per-engine settings schemas. Adding an engine: one schema class and one `ENGINES` line."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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


_MONGO_FORBIDDEN = frozenset('/\\. "$*<>:|?\x00')


def _mongo_database_name(value: str | None) -> str | None:
    if value is not None and (set(value) & _MONGO_FORBIDDEN or len(value.encode()) > 63):
        raise ValueError('must be at most 63 bytes, without spaces or any of / \\ . " $ * < > : | ?')
    return value


def _mongo_uri(value: str | None) -> str | None:
    # settings are stored in clear: a password inside the URI would never be encrypted
    if value is None:
        return None
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        raise ValueError("must start with mongodb:// or mongodb+srv://")
    authority = rest.split("/", 1)[0].split("?", 1)[0]
    if "@" in authority:
        raise ValueError("must not contain credentials: use the user and password fields")
    if rest[len(authority) :].lstrip("/").split("?", 1)[0]:
        raise ValueError("must not name a database: use the database field")
    return value


class MongodbSettings(_Strict):
    uri: str | None = Field(default=None, min_length=1, max_length=4096)  # instead of host/port
    host: str | None = Field(default=None, min_length=1, max_length=255)
    port: int = Field(default=27017, ge=1, le=65535)
    user: str | None = Field(default=None, min_length=1, max_length=128)
    auth_database: str | None = Field(default=None, min_length=1, max_length=63)  # default admin
    database: str = Field(min_length=1, max_length=63)
    tls: bool = False
    tls_ca_file: Annotated[str, AfterValidator(absolute_path)] | None = Field(default=None, max_length=4096)
    drop: bool = True  # restore: mongorestore --drop
    spool_dir: Annotated[str, AfterValidator(absolute_path)] | None = Field(default=None, max_length=4096)
    password: str | None = Field(default=None, max_length=1024)  # secret

    _uri = field_validator("uri")(_mongo_uri)
    _names = field_validator("database", "auth_database")(_mongo_database_name)

    @model_validator(mode="after")
    def _consistent(self) -> MongodbSettings:
        if (self.uri is None) == (self.host is None):
            raise ValueError("give either uri or host, not both")
        if (self.user is None) != (self.password is None):
            raise ValueError("user and password go together")
        return self


_MSSQL_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _mssql_name(value: str) -> str:
    if _MSSQL_CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if value != value.strip():
        raise ValueError("must not start or end with spaces")
    return value


class MssqlSettings(_Strict):
    host: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9._:\[\]\\-]+$")
    port: int = Field(default=1433, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=128)
    database: str = Field(min_length=1, max_length=128)
    # as registered in the agent host's odbcinst.ini; "FreeTDS" works too
    driver: str = Field(default="ODBC Driver 18 for SQL Server", min_length=1, max_length=128)
    encrypt: bool = True
    trust_server_certificate: bool = False
    # a folder on the SQL Server host (where the agent runs) that both can read and write
    backup_dir: Annotated[str, AfterValidator(absolute_path)] = Field(min_length=1, max_length=1024)
    password: str | None = Field(default=None, max_length=1024)  # secret

    _names = field_validator("database", "user", "driver", "backup_dir")(_mssql_name)


MysqlSslMode = Literal["disabled", "preferred", "required", "verify_ca", "verify_identity"]


class MysqlSettings(_Strict):
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=3306, ge=1, le=65535)
    user: str = Field(min_length=1, max_length=128, pattern=r"^[^\x00]*$")
    database: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00]*$")
    ssl_mode: MysqlSslMode | None = None  # the agent treats None as "preferred"
    # a CA bundle on the agent's host, for verify_ca / verify_identity
    ssl_ca: Annotated[str, AfterValidator(absolute_path)] | None = Field(default=None, max_length=4096)
    password: str | None = Field(default=None, max_length=1024)  # secret


ENGINES: dict[str, SettingsSpec] = {
    "postgresql": SettingsSpec(PostgresqlSettings, frozenset({"password"})),
    "sqlite": SettingsSpec(SqliteSettings, frozenset()),
    "mongodb": SettingsSpec(MongodbSettings, frozenset({"password"})),
    "mssql": SettingsSpec(MssqlSettings, frozenset({"password"})),
    "mysql": SettingsSpec(MysqlSettings, frozenset({"password"})),
}

EngineName = Literal["postgresql", "sqlite", "mongodb", "mssql", "mysql"]
# engines whose connection reaches a server holding many databases (whole-server jobs)
SERVER_ENGINES = frozenset({"postgresql", "mongodb", "mssql", "mysql"})
