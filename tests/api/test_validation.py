from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import Tenant, create_database, create_storage, error_locs, pg_settings


@pytest.mark.parametrize(
    ("db_settings", "loc"),
    [
        (pg_settings(port=70000), ["body", "settings", "port"]),
        (pg_settings(port=0), ["body", "settings", "port"]),
        (pg_settings(sslmode="sometimes"), ["body", "settings", "sslmode"]),
        (pg_settings(hots="typo"), ["body", "settings", "hots"]),
        ({"port": 5432, "user": "u", "database": "d"}, ["body", "settings", "host"]),
    ],
)
async def test_postgresql_settings_are_checked(
    client: httpx.AsyncClient, tenant: Tenant, db_settings: dict[str, object], loc: list[object]
) -> None:
    r = await client.post(
        "/v1/databases",
        json={"name": "x", "engine": "postgresql", "settings": db_settings},
        headers=tenant.headers,
    )
    assert loc in error_locs(r)


async def test_sqlite_path_must_be_absolute(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = {"name": "lite", "engine": "sqlite", "settings": {"path": "data/app.db"}}
    r = await client.post("/v1/databases", json=body, headers=tenant.headers)
    assert error_locs(r) == [["body", "settings", "path"]]
    assert "absolute" in r.text
    body["settings"] = {"path": "/var/lib/app/app.db"}
    ok = await client.post("/v1/databases", json=body, headers=tenant.headers)
    assert ok.status_code == 201
    assert ok.json()["settings"] == {"path": "/var/lib/app/app.db"}
    assert ok.json()["has_password"] is False


async def test_unknown_engine_and_kind(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post(
        "/v1/databases", json={"name": "x", "engine": "oracle", "settings": {}}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "engine"]]
    r = await client.post(
        "/v1/storages", json={"name": "x", "kind": "ftp", "settings": {}}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "kind"]]
    r = await client.post(
        "/v1/storages",
        json={"name": "x", "kind": "local", "settings": {"path": "relative"}},
        headers=tenant.headers,
    )
    assert error_locs(r) == [["body", "settings", "path"]]


async def test_patch_settings_are_validated_too(client: httpx.AsyncClient, tenant: Tenant) -> None:
    db = await create_database(client, tenant)
    r = await client.patch(
        f"/v1/databases/{db['id']}", json={"settings": {"port": -1}}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "settings", "port"]]
    st = await create_storage(client, tenant)
    r = await client.patch(
        f"/v1/storages/{st['id']}", json={"settings": {"path": "x"}}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "settings", "path"]]


async def test_duplicate_names_are_409(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await create_database(client, tenant, name="same")
    r = await client.post(
        "/v1/databases",
        json={"name": "same", "engine": "postgresql", "settings": pg_settings()},
        headers=tenant.headers,
    )
    assert r.status_code == 409
    assert r.json()["field"] == "name"
    await create_storage(client, tenant, name="same")
    r = await client.post(
        "/v1/storages",
        json={"name": "same", "kind": "local", "settings": {"path": "/x"}},
        headers=tenant.headers,
    )
    assert r.status_code == 409


async def test_unknown_agent_is_422_naming_agent_id(client: httpx.AsyncClient, tenant: Tenant) -> None:
    body = {"name": "x", "engine": "postgresql", "settings": pg_settings(), "agent_id": "0" * 32}
    r = await client.post("/v1/databases", json=body, headers=tenant.headers)
    assert r.status_code == 422
    assert r.json()["field"] == "agent_id"


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"cron": "every day"}, ["body", "cron"]),
        ({"cron": "61 * * * *"}, ["body", "cron"]),
        ({"timezone": "Mars/Olympus"}, ["body", "timezone"]),
        ({"timezone": "../../etc/passwd"}, ["body", "timezone"]),
        ({"compression": "zstd", "compression_level": 25}, ["body", "compression_level"]),
        ({"compression": "gzip", "compression_level": 10}, ["body", "compression_level"]),
        ({"compression": "none", "compression_level": 3}, ["body", "compression_level"]),
        ({"compression": "brotli"}, ["body", "compression"]),
    ],
)
async def test_job_fields_are_checked(
    client: httpx.AsyncClient, tenant: Tenant, fields: dict[str, object], loc: list[object]
) -> None:
    db = await create_database(client, tenant)
    st = await create_storage(client, tenant)
    body = {"name": "j", "database_id": db["id"], "storage_id": st["id"], **fields}
    r = await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)
    assert error_locs(r) == [loc]


async def test_job_patch_level_out_of_range(client: httpx.AsyncClient, tenant: Tenant) -> None:
    db = await create_database(client, tenant)
    st = await create_storage(client, tenant)
    body = {"name": "j", "database_id": db["id"], "storage_id": st["id"], "compression": "gzip"}
    job = (await client.post("/v1/backups/jobs", json=body, headers=tenant.headers)).json()
    r = await client.patch(
        f"/v1/backups/jobs/{job['id']}", json={"compression_level": 12}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "compression_level"]]
    r = await client.patch(f"/v1/backups/jobs/{job['id']}", json={"name": None}, headers=tenant.headers)
    assert error_locs(r) == [["body", "name"]]


async def test_query_parameters_are_checked(client: httpx.AsyncClient, tenant: Tenant) -> None:
    h = tenant.headers
    assert error_locs(await client.get("/v1/backups/history?limit=500", headers=h)) == [["query", "limit"]]
    assert error_locs(await client.get("/v1/backups/history?offset=-1", headers=h)) == [["query", "offset"]]
    assert error_locs(await client.get("/v1/backups/history?status=done", headers=h)) == [["query", "status"]]
    assert error_locs(await client.get("/v1/backups/history?since=yesterday", headers=h)) == [
        ["query", "since"]
    ]


async def test_enrollment_ttl_is_bounded(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post(
        "/v1/agents/enrollment-tokens", json={"ttl_minutes": 7 * 24 * 60 + 1}, headers=tenant.headers
    )
    assert error_locs(r) == [["body", "ttl_minutes"]]


async def test_malformed_json_is_422_not_500(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post(
        "/v1/databases", content=b"{not json", headers={**tenant.headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 422


async def test_unknown_or_read_only_fields_are_rejected(client: httpx.AsyncClient, tenant: Tenant) -> None:
    db = await create_database(client, tenant)
    r = await client.patch(f"/v1/databases/{db['id']}", json={"engine": "sqlite"}, headers=tenant.headers)
    assert error_locs(r) == [["body", "engine"]]
    r = await client.post(
        "/v1/backups/jobs",
        json={"name": "j", "database_id": db["id"], "storage_id": "x", "key_id": "mine"},
        headers=tenant.headers,
    )
    assert ["body", "key_id"] in error_locs(r)
