from __future__ import annotations

import os

import httpx
import pytest
from rahatback_api.databases.service import database_secrets
from rahatback_api.db import session_scope
from rahatback_api.models import Database
from rahatback_api.security.secretbox import SecretBox, SecretBoxError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs

from tests.api.conftest import Tenant, create_database

DB_PASSWORD = "Pg-pa55word-that-must-never-leak"


async def test_password_is_write_only_and_encrypted_at_rest(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    with capture_logs() as logs:
        created = await create_database(client, tenant, password=DB_PASSWORD, sslmode="require")
        db_id = created["id"]
        bodies = [
            str(created),
            (await client.get(f"/v1/databases/{db_id}", headers=tenant.headers)).text,
            (await client.get("/v1/databases", headers=tenant.headers)).text,
            (
                await client.patch(f"/v1/databases/{db_id}", json={"name": "renamed"}, headers=tenant.headers)
            ).text,
        ]
    assert created["has_password"] is True
    assert "password" not in created["settings"]  # type: ignore[operator]
    assert created["settings"] == {  # what the user sees: every non-secret field, nothing else
        "host": "db.internal",
        "port": 5432,
        "user": "app",
        "database": "shop",
        "sslmode": "require",
    }
    for body in bodies:
        assert DB_PASSWORD not in body
    assert DB_PASSWORD not in repr(logs)

    async with session_scope(sessionmaker) as session:
        row = await session.get(Database, db_id)
        assert row is not None
    assert row.secrets_encrypted is not None
    assert DB_PASSWORD not in row.secrets_encrypted
    assert DB_PASSWORD not in str(row.settings)
    assert (row.engine, row.settings["host"]) == ("postgresql", "db.internal")
    assert database_secrets(box, row) == {"password": DB_PASSWORD}


async def test_update_keeps_replaces_or_clears_the_password(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    db_id = str((await create_database(client, tenant, password=DB_PASSWORD))["id"])

    async def stored_secrets() -> dict[str, object]:
        async with session_scope(sessionmaker) as session:
            row = await session.get(Database, db_id)
            assert row is not None
            return database_secrets(box, row)

    r = await client.patch(
        f"/v1/databases/{db_id}", json={"settings": {"port": 6432}}, headers=tenant.headers
    )
    assert r.status_code == 200
    assert r.json()["settings"]["port"] == 6432
    assert r.json()["has_password"] is True
    assert await stored_secrets() == {"password": DB_PASSWORD}

    r = await client.patch(
        f"/v1/databases/{db_id}", json={"settings": {"password": "new-one"}}, headers=tenant.headers
    )
    assert "new-one" not in r.text
    assert await stored_secrets() == {"password": "new-one"}

    r = await client.patch(
        f"/v1/databases/{db_id}", json={"settings": {"password": None}}, headers=tenant.headers
    )
    assert r.json()["has_password"] is False
    assert await stored_secrets() == {}


async def test_ciphertext_swapped_between_rows_does_not_open(
    client: httpx.AsyncClient, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession], box: SecretBox
) -> None:
    a = await create_database(client, tenant, name="a", password="secret-of-a")
    b = await create_database(client, tenant, name="b", password="secret-of-b")
    async with session_scope(sessionmaker) as session:
        row_a = await session.get(Database, a["id"])
        row_b = await session.get(Database, b["id"])
        assert row_a is not None and row_b is not None
        row_b.secrets_encrypted = row_a.secrets_encrypted
    with pytest.raises(SecretBoxError):
        database_secrets(box, row_b)


def test_secretbox_roundtrip_and_binding() -> None:
    box = SecretBox(os.urandom(32), "k1")
    token = box.encrypt(b"hunter2", b"database:1")
    assert token.startswith("v1:k1:")
    assert "hunter2" not in token
    assert box.decrypt(token, b"database:1") == b"hunter2"
    assert box.encrypt(b"hunter2", b"database:1") != token  # fresh nonce every time
    with pytest.raises(SecretBoxError):
        box.decrypt(token, b"database:2")
    with pytest.raises(SecretBoxError):
        SecretBox(os.urandom(32), "k1").decrypt(token, b"database:1")  # another master key
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(SecretBoxError):
        box.decrypt(tampered, b"database:1")
    with pytest.raises(SecretBoxError):
        box.decrypt("garbage", b"database:1")


def test_secretbox_rotation_reads_old_key_ids() -> None:
    old_key = os.urandom(32)
    old = SecretBox(old_key, "k1")
    token = old.encrypt(b"s", b"aad")
    rotated = SecretBox(os.urandom(32), "k2", old_keys={"k1": old_key})
    assert rotated.decrypt(token, b"aad") == b"s"
    assert rotated.needs_rotation(token)
    assert rotated.encrypt(b"s", b"aad").startswith("v1:k2:")
    with pytest.raises(SecretBoxError, match="unknown key id"):
        SecretBox(os.urandom(32), "k2").decrypt(token, b"aad")
