"""S3 storages through the HTTP API: settings validated, the secret key and session token write-only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from rahatback_api.db import session_scope
from rahatback_api.models import Storage
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.storages.service import storage_secrets
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs

from tests.api.conftest import Tenant, error_locs

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEXAMPLEsessionTOKENvalue0123"
BASE: dict[str, Any] = {
    "bucket": "acme-backups",
    "access_key_id": "AKIAEXAMPLE0001",
    "secret_access_key": SECRET,
}


async def create(
    client: httpx.AsyncClient, tenant: Tenant, settings: dict[str, Any], name: str = "s3"
) -> httpx.Response:
    return await client.post(
        "/v1/storages", json={"name": name, "kind": "s3", "settings": settings}, headers=tenant.headers
    )


async def test_s3_secrets_are_write_only_and_encrypted_at_rest(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    settings = {
        **BASE,
        "session_token": TOKEN,
        "prefix": "/prod//db/",
        "region": "eu-central-1",
        "storage_class": "STANDARD_IA",
        "sse": "aws:kms",
        "kms_key_id": "alias/backups",
    }
    with capture_logs() as logs:
        r = await create(client, tenant, settings)
        assert r.status_code == 201, r.text
        created = r.json()
        storage_id = created["id"]
        bodies = [
            r.text,
            (await client.get(f"/v1/storages/{storage_id}", headers=tenant.headers)).text,
            (await client.get("/v1/storages", headers=tenant.headers)).text,
        ]
        patched = await client.patch(
            f"/v1/storages/{storage_id}", json={"settings": {"prefix": "other"}}, headers=tenant.headers
        )
        assert patched.status_code == 200, patched.text
        bodies.append(patched.text)
    assert created["has_secrets"] is True
    assert created["settings"] == {  # everything but the two secrets, the prefix normalised
        "bucket": "acme-backups",
        "prefix": "prod/db",
        "region": "eu-central-1",
        "path_style": False,
        "storage_class": "STANDARD_IA",
        "sse": "aws:kms",
        "kms_key_id": "alias/backups",
        "access_key_id": "AKIAEXAMPLE0001",
    }
    for body in bodies:
        assert SECRET not in body and TOKEN not in body
    assert SECRET not in repr(logs) and TOKEN not in repr(logs)
    assert patched.json()["settings"]["prefix"] == "other"

    async with session_scope(sessionmaker) as session:
        row = await session.get(Storage, storage_id)
        assert row is not None
    assert row.secrets_encrypted is not None
    assert SECRET not in row.secrets_encrypted and SECRET not in str(row.settings)
    # an update that does not mention them keeps both secrets
    assert storage_secrets(box, row) == {"secret_access_key": SECRET, "session_token": TOKEN}

    cleared = await client.patch(
        f"/v1/storages/{storage_id}", json={"settings": {"session_token": None}}, headers=tenant.headers
    )
    assert cleared.status_code == 200, cleared.text
    async with session_scope(sessionmaker) as session:
        row = await session.get(Storage, storage_id)
        assert row is not None
    assert storage_secrets(box, row) == {"secret_access_key": SECRET}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_s3_compatible_endpoint_is_normalised(client: httpx.AsyncClient, tenant: Tenant) -> None:
    # Cloudflare R2 style: account endpoint, region "auto", a bucket name AWS itself would refuse
    r = await create(
        client,
        tenant,
        {
            **BASE,
            "bucket": "Team_Backups",
            "endpoint_url": "https://acc123.r2.cloudflarestorage.com/",
            "region": "auto",
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["settings"]["endpoint_url"] == "https://acc123.r2.cloudflarestorage.com"
    minio = await create(
        client, tenant, {**BASE, "endpoint_url": "http://10.0.0.5:9000", "path_style": True}, name="minio"
    )
    assert minio.status_code == 201, minio.text
    assert minio.json()["settings"]["path_style"] is True


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"bucket": "Acme_Backups"}, "bucket"),  # AWS: lowercase only
        ({"bucket": "ab"}, "bucket"),
        ({"bucket": "192.168.10.1"}, "bucket"),
        ({"bucket": "acme..backups"}, "bucket"),
        ({"bucket": "xn--acme"}, "bucket"),
        ({"endpoint_url": "ftp://minio.internal"}, "endpoint_url"),
        ({"endpoint_url": "https://minio.internal/bucket-path"}, "endpoint_url"),
        ({"endpoint_url": "https://user:hunter2-pw@minio.internal"}, "endpoint_url"),
        ({"endpoint_url": "https://minio.internal:99999"}, "endpoint_url"),
        ({"prefix": "a/../b"}, "prefix"),
        ({"prefix": "a\\b"}, "prefix"),
        ({"region": "EU West"}, "region"),
        ({"sse": "rot13"}, "sse"),
        ({"kms_key_id": "alias/k"}, "kms_key_id"),  # without sse aws:kms
        ({"storage_class": "GLACIER"}, "storage_class"),  # cannot be read back without a restore request
        ({"secret_access_key": None}, "secret_access_key"),
        ({"access_key_id": "has space"}, "access_key_id"),
        ({"secret": "typo"}, "secret"),
    ],
)
async def test_s3_settings_are_validated(
    client: httpx.AsyncClient, tenant: Tenant, change: dict[str, Any], field: str
) -> None:
    settings = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    r = await create(client, tenant, settings)
    assert ["body", "settings", field] in error_locs(r), r.text
    assert SECRET not in r.text and "hunter2-pw" not in r.text
