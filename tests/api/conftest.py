"""The API under test: the real app over ASGI, on SQLite and on the real PostgreSQL fixture.

Each test gets a fresh, migrated database. Tenants are created through the same service functions
the CLI uses, then everything else goes through HTTP as a user would.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fastapi import FastAPI
from rahatback_api.auth.models import Role
from rahatback_api.auth.service import add_member, bootstrap_admin, create_user, issue_token
from rahatback_api.db import run_migrations, session_scope
from rahatback_api.main import create_app
from rahatback_api.models import Organization
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.security.signing import new_signing_key
from rahatback_api.settings import Settings
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from tests.servers import NatsServer, PostgresServer

PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = f"api_{uuid.uuid4().hex[:16]}"
    postgres.psql("postgres", f"CREATE DATABASE {name}")
    return postgres.dsn(name).replace("postgresql://", "postgresql+asyncpg://", 1)


# the notifier's key pair: the API seals webhook URLs and secrets to its public half
NOTIFIER_KEY = X25519PrivateKey.generate()
# the API's command-signing key (docs/security.md "Signed commands"), the same for every app
COMMAND_SIGNING_KEY = new_signing_key()


@pytest.fixture
def settings(database_url: str, tmp_path: Path, nats_server: NatsServer) -> Settings:
    public = NOTIFIER_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return Settings(
        database_url=database_url,
        nats_url=nats_server.url,
        master_key=base64.b64encode(os.urandom(32)).decode(),
        dev_mode=False,
        var_dir=tmp_path / "var",
        notifier_public_key=base64.b64encode(public).decode(),
        command_signing_key=COMMAND_SIGNING_KEY,
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    await run_migrations(settings.database_url)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as c:
        yield c


@pytest.fixture
def sessionmaker(app: FastAPI) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    return maker


@pytest.fixture
def box(app: FastAPI) -> SecretBox:
    secretbox: SecretBox = app.state.secretbox
    return secretbox


@dataclass
class Tenant:
    org_id: str
    email: str
    token: str
    sessionmaker: async_sessionmaker[AsyncSession]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def member(self, role: Role, scopes: list[str] | None = None) -> dict[str, str]:
        """Another user of this organization with `role`; returns their auth headers."""
        async with session_scope(self.sessionmaker) as session:
            org = await session.get(Organization, self.org_id)
            assert org is not None
            user = await create_user(session, f"{role}-{uuid.uuid4().hex[:8]}@example.com", PASSWORD)
            await add_member(session, org, user, role)
            _, token = await issue_token(
                session, org_id=org.id, user_id=user.id, name="test", scopes=scopes or ["*"], ttl=None
            )
        return {"Authorization": f"Bearer {token}"}


TenantFactory = Callable[[], Awaitable[Tenant]]


@pytest.fixture
def make_tenant(sessionmaker: async_sessionmaker[AsyncSession]) -> TenantFactory:
    async def make() -> Tenant:
        email = f"owner-{uuid.uuid4().hex[:8]}@example.com"
        async with session_scope(sessionmaker) as session:
            _, org, token = await bootstrap_admin(session, email, PASSWORD, f"Org {email}")
        return Tenant(org_id=org.id, email=email, token=token, sessionmaker=sessionmaker)

    return make


@pytest.fixture
async def tenant(make_tenant: TenantFactory) -> Tenant:
    return await make_tenant()


def pg_settings(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"host": "db.internal", "port": 5432, "user": "app", "database": "shop"}
    base.update(overrides)
    return base


async def create_database(
    client: httpx.AsyncClient, tenant: Tenant, name: str = "shop", **settings: object
) -> dict[str, object]:
    r = await client.post(
        "/v1/databases",
        json={"name": name, "engine": "postgresql", "settings": pg_settings(**settings)},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


async def create_storage(client: httpx.AsyncClient, tenant: Tenant, name: str = "nas") -> dict[str, object]:
    r = await client.post(
        "/v1/storages",
        json={"name": name, "kind": "local", "settings": {"path": "/srv/backups"}},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


async def create_job(
    client: httpx.AsyncClient, tenant: Tenant, name: str = "nightly", **fields: object
) -> dict[str, object]:
    if "database_id" not in fields:
        fields["database_id"] = (await create_database(client, tenant, name=f"db-{name}"))["id"]
    if "storage_id" not in fields:
        fields["storage_id"] = (await create_storage(client, tenant, name=f"st-{name}"))["id"]
    r = await client.post("/v1/backups/jobs", json={"name": name, **fields}, headers=tenant.headers)
    assert r.status_code == 201, r.text
    body: dict[str, object] = r.json()
    return body


def error_locs(response: httpx.Response) -> list[list[object]]:
    """The `loc` of every error in a 422 response (FastAPI's format)."""
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["detail"]]
