"""Per-kind storage settings schemas. Adding a kind (s3, gdrive): one schema and one `KINDS` line."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rahatback_api.settings_schemas import SettingsSpec, absolute_path


class LocalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Annotated[str, AfterValidator(absolute_path)] = Field(min_length=1, max_length=4096)


_AWS_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# with an endpoint_url (an S3-compatible: B2, MinIO, ...) capitals and underscores are accepted too
_COMPATIBLE_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")
_AWS_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_AWS_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def _s3_prefix(value: str) -> str:
    """Normalised to `a/b` (no leading, trailing or doubled slashes): the agent builds keys from it."""
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain backslashes or control characters")
    parts = [part for part in value.strip().split("/") if part]
    if any(part in (".", "..") for part in parts):
        raise ValueError("must not contain '.' or '..' segments")
    return "/".join(parts)


def _http_url(value: str) -> str:
    parsed = urlsplit(value.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL, such as https://s3.eu-central-1.wasabisys.com")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError("must not contain credentials: use access_key_id and secret_access_key")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise ValueError("must be only scheme, host and port (no path, query or fragment)")
    _ = parsed.port  # raises ValueError for a port that is not a number in range
    return f"{parsed.scheme}://{parsed.netloc}"


class S3Settings(BaseModel):
    """AWS S3 or an S3-compatible (MinIO, Cloudflare R2, Wasabi, Backblaze B2: set endpoint_url).
    The access key id is shown like any setting (it names the key, as the AWS console does); the
    secret access key and session token are secrets: write-only, encrypted, sealed to the agent."""

    model_config = ConfigDict(extra="forbid")

    endpoint_url: Annotated[str, AfterValidator(_http_url)] | None = Field(default=None, max_length=2048)
    bucket: str = Field(min_length=3, max_length=63)
    prefix: Annotated[str, AfterValidator(_s3_prefix)] = Field(default="", max_length=512)
    region: str = Field(default="us-east-1", pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=32)
    path_style: bool = False
    storage_class: (
        Literal[
            "STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR", "REDUCED_REDUNDANCY"
        ]
        | None
    ) = None  # no GLACIER/DEEP_ARCHIVE: their objects cannot be read back without a separate restore
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: str | None = Field(default=None, min_length=1, max_length=2048, pattern=r"^[!-~]+$")
    access_key_id: str = Field(min_length=3, max_length=128, pattern=r"^[!-~]+$")
    secret_access_key: str = Field(min_length=1, max_length=512, pattern=r"^[!-~]+$")
    session_token: str | None = Field(default=None, min_length=1, max_length=8192, pattern=r"^[!-~]+$")

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("endpoint_url"):
            if not _COMPATIBLE_BUCKET.fullmatch(value):
                raise ValueError("must be 3-63 letters, digits, '.', '-' or '_', starting and ending alnum")
            return value
        if not _AWS_BUCKET.fullmatch(value):
            raise ValueError(
                "must be 3-63 lowercase letters, digits, '.' or '-', starting and ending alphanumeric"
            )
        if (
            ".." in value
            or value.startswith(_AWS_RESERVED_PREFIXES)
            or value.endswith(_AWS_RESERVED_SUFFIXES)
        ):
            raise ValueError("is not a valid S3 bucket name ('..' or a prefix/suffix AWS reserves)")
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return value
        raise ValueError("must not look like an IP address")

    @field_validator("kms_key_id")
    @classmethod
    def _kms_needs_sse_kms(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("sse") != "aws:kms":
            raise ValueError("is only used with sse 'aws:kms'")
        return value


def _drive_url(value: str) -> str:
    parsed = urlsplit(value.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if parsed.username is not None or parsed.password is not None:
        raise ValueError("must not contain credentials")
    if parsed.query or parsed.fragment:
        raise ValueError("must not have a query or fragment")
    _ = parsed.port  # raises ValueError for a port that is not a number in range
    return value.strip()


_DRIVE_CHUNK = 256 * 1024


class GDriveSettings(BaseModel):
    """Google Drive: a folder (its id, from the folder's URL) as the root; a service account (its
    JSON key file) or an OAuth client (client id + secret and a refresh token). The key file,
    client secret and refresh token are secrets: write-only, encrypted, sealed to the agent.
    Switching auth_mode drops the other mode's stored credentials."""

    model_config = ConfigDict(extra="forbid")

    folder_id: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_-]+$")
    auth_mode: Literal["service_account", "oauth"] = "service_account"
    client_id: str | None = Field(default=None, min_length=1, max_length=256, pattern=r"^[!-~]+$")
    # OAuth mode only (a service account's key file names its own); default Google's
    token_uri: Annotated[str, AfterValidator(_drive_url)] | None = Field(default=None, max_length=2048)
    # the Drive API base URL as google-api-python-client takes it, e.g. https://www.googleapis.com/drive/v3/
    api_endpoint: Annotated[str, AfterValidator(_drive_url)] | None = Field(default=None, max_length=2048)
    chunk_size: int | None = Field(
        default=None, ge=_DRIVE_CHUNK, le=1024 * _DRIVE_CHUNK, multiple_of=_DRIVE_CHUNK
    )  # bytes per upload request; the agent's default is 8 MiB
    service_account_json: str | None = Field(default=None, min_length=2, max_length=16384)  # secret
    client_secret: str | None = Field(default=None, min_length=1, max_length=512)  # secret
    refresh_token: str | None = Field(default=None, min_length=1, max_length=2048)  # secret

    @field_validator("service_account_json")
    @classmethod
    def _key_file(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            info = json.loads(value)
        except ValueError:
            raise ValueError("must be the service account's JSON key file, as Google issued it") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise ValueError('must be a JSON key file with "type": "service_account"')
        missing = [
            f for f in ("client_email", "private_key", "token_uri") if not isinstance(info.get(f), str)
        ]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return value

    @model_validator(mode="after")
    def _credentials_of_the_mode(self) -> GDriveSettings:
        # on an update the stored secrets are merged in before this runs, so omitted ones count
        if self.auth_mode == "service_account":
            if self.service_account_json is None:
                raise ValueError("auth_mode 'service_account' needs service_account_json (the JSON key file)")
            self.client_id = self.client_secret = self.refresh_token = self.token_uri = None
        else:
            missing = [n for n in ("client_id", "client_secret", "refresh_token") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"auth_mode 'oauth' needs {', '.join(missing)}")
            self.service_account_json = None
        return self


KINDS: dict[str, SettingsSpec] = {
    "local": SettingsSpec(LocalSettings, frozenset()),
    "s3": SettingsSpec(S3Settings, frozenset({"secret_access_key", "session_token"})),
    "gdrive": SettingsSpec(
        GDriveSettings, frozenset({"service_account_json", "client_secret", "refresh_token"})
    ),
}

StorageKindName = Literal["local", "s3", "gdrive"]
