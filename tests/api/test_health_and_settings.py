from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import httpx
import pytest
from rahatback_api.main import create_app
from rahatback_api.settings import ConfigurationError, Settings

from tests.servers import NatsServer


async def test_healthz_and_request_id(client: httpx.AsyncClient) -> None:
    r = await client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert len(r.headers["x-request-id"]) == 32

    r = await client.get("/healthz", headers={"X-Request-ID": "trace-abc.1"})
    assert r.headers["x-request-id"] == "trace-abc.1"


async def test_openapi_docs_are_served(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/v1/databases" in paths
    assert "/v1/backups/history" in paths


def test_refuses_to_start_without_master_key_outside_dev(tmp_path: Path) -> None:
    settings = Settings(
        database_url="sqlite+aiosqlite:///x.db", master_key=None, dev_mode=False, var_dir=tmp_path
    )
    with pytest.raises(ConfigurationError, match="RAHATBACK_MASTER_KEY is not set"):
        create_app(settings)
    assert not (tmp_path / "master.key").exists()


@pytest.mark.parametrize("bad", ["not base64!!", base64.b64encode(b"short").decode()])
def test_refuses_malformed_master_key(tmp_path: Path, bad: str) -> None:
    settings = Settings(master_key=bad, dev_mode=True, var_dir=tmp_path)
    with pytest.raises(ConfigurationError, match="RAHATBACK_MASTER_KEY"):
        settings.master_key_bytes()


def test_dev_mode_generates_and_keeps_a_private_master_key(tmp_path: Path) -> None:
    settings = Settings(master_key=None, dev_mode=True, var_dir=tmp_path / "var")
    key = settings.master_key_bytes()
    path = tmp_path / "var" / "master.key"
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert settings.master_key_bytes() == key  # reused on the next start


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("RAHATBACK_MASTER_KEY", key)
    monkeypatch.setenv("RAHATBACK_AGENT_OFFLINE_SECONDS", "45")
    monkeypatch.setenv("RAHATBACK_LOG_FORMAT", "json")
    settings = Settings()
    assert settings.master_key_bytes() == base64.b64decode(key)
    assert settings.agent_offline_seconds == 45
    assert settings.log_format == "json"
    assert key not in repr(settings)


async def test_dev_mode_migrates_at_startup(tmp_path: Path, nats_server: NatsServer) -> None:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}",
        dev_mode=True,
        var_dir=tmp_path / "var",
        nats_url=nats_server.url,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            r = await client.post("/v1/auth/login", json={"email": "a@example.com", "password": "x"})
    assert r.status_code == 401  # the users table exists: the schema was migrated on start
    assert (tmp_path / "var" / "master.key").exists()
