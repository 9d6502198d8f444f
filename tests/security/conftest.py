"""A real nats-server in operator/JWT mode, set up by `rahatback-api nats-setup`, and the API on it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from fastapi import FastAPI
from nats.aio.client import Client as NATS
from rahatback_api.auth.service import bootstrap_admin
from rahatback_api.db import create_sessionmaker, run_migrations, session_scope
from rahatback_api.main import create_app
from rahatback_api.security import nats_jwt
from rahatback_api.security.nats_setup import setup
from rahatback_api.settings import Settings
from rahatback_contracts import subjects

from tests.servers import free_port, nats_server_binary


@dataclass
class JwtNats:
    url: str
    port: int
    out: Path  # what `rahatback-api nats-setup --out` wrote
    process: subprocess.Popen[bytes]
    log: Path

    def creds(self, name: str) -> Path:
        return self.out / "creds" / f"{name}.creds"

    @property
    def signing(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out / "api-signing.json").read_text())
        return data

    def mint_agent_jwt(self, agent_id: str, user: nats_jwt.NKey, ttl_seconds: int = 3600) -> str:
        """What the API mints at enrollment, for tests that play the API's part."""
        signing = self.signing
        return nats_jwt.agent_user_jwt(
            agent_id=agent_id,
            user_public_key=user.public,
            account_public_key=signing["account_public_key"],
            signing_key=nats_jwt.nkey_from_seed(signing["agent_signing_seed"], "account"),
            expires_at=int(time.time()) + ttl_seconds,
        )


def start_nats_jwt(workdir: Path) -> JwtNats:
    out = workdir / "nats-auth"
    setup(out, resolver_dir=str(workdir / "resolver"))
    port = free_port()
    config = workdir / "nats-server.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f'jetstream: {{ store_dir: "{workdir / "jetstream"}" }}\n'
        'include "nats-auth/nats-auth.conf"\n'  # relative to this file
    )
    log = workdir / "nats.log"
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=handle
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return JwtNats(f"nats://127.0.0.1:{port}", port, out, proc, log)
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("nats-server did not start within 10 s")


@pytest.fixture(scope="session")
def nats_jwt_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtNats]:
    server = start_nats_jwt(tmp_path_factory.mktemp("nats-jwt"))
    yield server
    server.process.terminate()
    try:
        server.process.wait(10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@dataclass
class Watched:
    """A NATS connection and every asynchronous error the server sent it (permission violations
    are reported only there, DESIGN.md "NATS notes")."""

    nc: NATS
    errors: list[str] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def violation(self, fragment: str, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        """The permission error naming `fragment` (lowercased by nats-py), waiting for it to arrive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for error in self.errors:
                if "permissions violation" in error and fragment.lower() in error:
                    return error
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permissions violation for {fragment!r}; errors: {self.errors}")


ConnectAs = Callable[..., Awaitable[Watched]]


@pytest.fixture
async def connect_as(nats_jwt_server: JwtNats) -> AsyncIterator[ConnectAs]:
    """connect_as(service="notifier") or connect_as(agent_id=…, user=NKey, jwt=…)."""
    opened: list[Watched] = []

    async def connect(
        *,
        service: str | None = None,
        agent_id: str | None = None,
        user: nats_jwt.NKey | None = None,
        jwt: str | None = None,
        **options: Any,
    ) -> Watched:
        watched: Watched | None = None

        async def on_error(exc: Exception) -> None:
            assert watched is not None
            watched.errors.append(str(exc))

        async def on_closed() -> None:
            assert watched is not None
            watched.closed.set()

        kwargs: dict[str, Any] = {"error_cb": on_error, "closed_cb": on_closed, **options}
        if service is not None:
            kwargs["user_credentials"] = str(nats_jwt_server.creds(service))
            kwargs.setdefault("inbox_prefix", f"_INBOX.{service}")
        else:
            assert agent_id is not None and user is not None
            token = jwt or nats_jwt_server.mint_agent_jwt(agent_id, user)
            kwargs["user_jwt_cb"] = lambda: token.encode()
            kwargs["signature_cb"] = lambda nonce: base64.b64encode(user.sign(nonce.encode()))
            kwargs.setdefault("inbox_prefix", subjects.agent_inbox_prefix(agent_id))
        nc = await nats.connect(nats_jwt_server.url, **kwargs)
        watched = Watched(nc)
        opened.append(watched)
        return watched

    yield connect
    for watched in opened:
        if not watched.nc.is_closed:
            with contextlib.suppress(Exception):
                await watched.nc.close()


# ---------------------------------------------------------------------------------- API in JWT mode


def jwt_settings(server: JwtNats, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'api.db'}",
        "dev_mode": True,  # generated master and signing keys in var_dir; nothing else is relaxed here
        "var_dir": tmp_path / "var",
        "nats_url": server.url,
        "nats_creds": server.creds("api"),
        "nats_system_creds": server.creds("api-system"),
        "nats_signing": server.out / "api-signing.json",
        **overrides,
    }
    return Settings(**values)


@dataclass
class JwtApi:
    app: FastAPI
    client: httpx.AsyncClient
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def ok(self, method: str, path: str, json: Any = None) -> Any:
        response = await self.client.request(method, path, json=json, headers=self.headers)
        assert response.status_code < 300, f"{method} {path} → {response.status_code} {response.text}"
        return response.json()

    async def enroll(self, user: nats_jwt.NKey | None) -> dict[str, Any]:
        """Enroll like `rahatback-agent enroll` does: only public keys leave the agent."""
        from rahatback_agent.identity import generate_private_key, public_key_b64

        token = (await self.ok("POST", "/v1/agents/enrollment-tokens", {}))["token"]
        body: dict[str, Any] = {
            "token": token,
            "name": "host",
            "x25519_public_key": public_key_b64(generate_private_key()),
        }
        if user is not None:
            body["nats_public_key"] = user.public
        response = await self.client.post("/v1/agents/enroll", json=body)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data


@pytest.fixture
async def jwt_api(nats_jwt_server: JwtNats, tmp_path: Path) -> AsyncIterator[JwtApi]:
    settings = jwt_settings(nats_jwt_server, tmp_path)
    await run_migrations(settings.database_url)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with session_scope(create_sessionmaker(app.state.engine)) as session:
            _, _, token = await bootstrap_admin(session, "admin@example.com", "correct horse battery", "Org")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            yield JwtApi(app, client, token)


async def assert_refused(url: str, **options: Any) -> None:
    """Connecting is refused with an authorization error (nats-py leaves the socket of a refused
    connection open: close the client ourselves)."""
    nc = NATS()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(url, allow_reconnect=False, **options)
    finally:
        await nc.close()
