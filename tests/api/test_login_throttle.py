"""Login throttling: repeated failures lock an email or a client address out for a while (429 with
Retry-After), counted in the database so every API replica sees them; passwords never reach the logs."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import httpx
import pytest
from fastapi import FastAPI
from rahatback_api.auth import service as auth_service
from rahatback_api.columns import utcnow
from rahatback_api.db import session_scope
from rahatback_api.main import create_app
from rahatback_api.models import LoginThrottle
from rahatback_api.security.passwords import verify_password
from rahatback_api.settings import Settings
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from structlog.testing import capture_logs

from tests.api.conftest import PASSWORD, Tenant, TenantFactory

MAX_FAILURES = 3
WRONG = "wrong-password-that-must-not-be-logged"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "login_max_failures": MAX_FAILURES,
            "login_max_failures_per_ip": 5,
            "trusted_proxies": ["10.0.0.0/8"],
        }
    )


def from_address(app: FastAPI, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://api.test")


async def login(client: httpx.AsyncClient, email: str, password: str, **headers: str) -> httpx.Response:
    return await client.post("/v1/auth/login", json={"email": email, "password": password}, headers=headers)


async def test_repeated_failures_lock_the_account_with_a_retry_after(
    app: FastAPI, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with from_address(app, "198.51.100.1") as client:
        for _ in range(MAX_FAILURES):
            r = await login(client, tenant.email, WRONG)
            assert (r.status_code, r.json()["detail"]) == (401, "invalid email or password")

    # even the right password, from another address, is refused while the lock lasts
    async with from_address(app, "198.51.100.2") as client:
        locked = await login(client, tenant.email.upper(), PASSWORD)
        assert locked.status_code == 429
        retry_after = int(locked.headers["retry-after"])
        assert 14 * 60 < retry_after <= 15 * 60
        assert locked.json()["detail"].startswith("too many failed logins: try again after ")
        assert locked.json()["detail"].endswith("UTC (in 15 min)")
        # other accounts are not affected
        other = await login(client, "someone-else@example.com", WRONG)
        assert other.status_code == 401

        # the lock ends on its own
        async with session_scope(sessionmaker) as session:
            await session.execute(
                update(LoginThrottle)
                .where(LoginThrottle.key == tenant.email)  # type: ignore[arg-type]
                .values(locked_until=utcnow() - timedelta(seconds=1))
            )
        assert (await login(client, tenant.email, PASSWORD)).status_code == 200

    actions = [
        (e["action"], e["status_code"], e["client_ip"])
        for e in (await client_get_audit(app, tenant))
        if e["action"].startswith("login")
    ]
    assert actions == [
        ("login", 200, "198.51.100.2"),
        ("login_locked", 429, "198.51.100.2"),
        *[("login_failed", 401, "198.51.100.1")] * MAX_FAILURES,
    ]


async def client_get_audit(app: FastAPI, tenant: Tenant) -> list[dict[str, object]]:
    async with from_address(app, "127.0.0.1") as client:
        r = await client.get("/v1/audit", headers=tenant.headers)
    assert r.status_code == 200, r.text
    items: list[dict[str, object]] = r.json()["items"]
    return items


async def test_a_success_resets_the_email_count_and_old_failures_expire(
    app: FastAPI, tenant: Tenant, sessionmaker: async_sessionmaker[AsyncSession]
) -> None:
    async with from_address(app, "198.51.100.3") as client:
        for _ in range(MAX_FAILURES - 1):
            assert (await login(client, tenant.email, WRONG)).status_code == 401
        assert (await login(client, tenant.email, PASSWORD)).status_code == 200
        for _ in range(MAX_FAILURES - 1):
            assert (await login(client, tenant.email, WRONG)).status_code == 401
        # failures older than the window no longer count
        async with session_scope(sessionmaker) as session:
            await session.execute(
                update(LoginThrottle).values(window_started_at=utcnow() - timedelta(minutes=16))
            )
        assert (await login(client, tenant.email, WRONG)).status_code == 401
        assert (await login(client, tenant.email, PASSWORD)).status_code == 200


async def test_one_address_guessing_many_accounts_is_locked_out(
    app: FastAPI, make_tenant: TenantFactory
) -> None:
    victim = await make_tenant()
    async with from_address(app, "203.0.113.50") as attacker:
        for i in range(5):
            assert (await login(attacker, f"user{i}@example.com", WRONG)).status_code == 401
        r = await login(attacker, victim.email, PASSWORD)
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    async with from_address(app, "203.0.113.51") as someone_else:
        assert (await login(someone_else, victim.email, PASSWORD)).status_code == 200


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(
    app: FastAPI, make_tenant: TenantFactory
) -> None:
    victim = await make_tenant()
    # the attacker rotates X-Forwarded-For, connecting directly: ignored, their own address is locked
    async with from_address(app, "203.0.113.60") as attacker:
        for i in range(5):
            r = await login(attacker, f"a{i}@example.com", WRONG, **{"X-Forwarded-For": f"192.0.2.{i}"})
            assert r.status_code == 401
        assert (
            await login(attacker, victim.email, PASSWORD, **{"X-Forwarded-For": "192.0.2.99"})
        ).status_code == 429
    # through our proxy (10.0.0.0/8), each client is told apart by what the proxy appended
    async with from_address(app, "10.1.2.3") as proxy:
        for i in range(5):
            spoofed = f"203.0.113.60, 192.0.2.{i + 10}"  # the client wrote the first one itself
            assert (
                await login(proxy, f"b{i}@example.com", WRONG, **{"X-Forwarded-For": spoofed})
            ).status_code == 401
        ok = await login(proxy, victim.email, PASSWORD, **{"X-Forwarded-For": "203.0.113.60, 192.0.2.77"})
        assert ok.status_code == 200
        locked = await login(proxy, victim.email, PASSWORD, **{"X-Forwarded-For": "203.0.113.60"})
        assert locked.status_code == 429
    events = await client_get_audit(app, victim)
    assert [e["client_ip"] for e in events if e["action"] == "login"] == ["192.0.2.77"]


async def test_the_lock_is_shared_by_api_replicas(app: FastAPI, settings: Settings, tenant: Tenant) -> None:
    other_replica = create_app(settings)
    async with other_replica.router.lifespan_context(other_replica):
        async with from_address(app, "198.51.100.8") as first:
            for _ in range(MAX_FAILURES):
                assert (await login(first, tenant.email, WRONG)).status_code == 401
        async with from_address(other_replica, "198.51.100.9") as second:
            assert (await login(second, tenant.email, PASSWORD)).status_code == 429


async def test_parallel_guesses_cannot_slip_past_the_limit(
    app: FastAPI, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of wrong passwords sent at once: each is counted before its password is checked, so
    only the limit's worth are ever checked and the rest are refused."""
    checked: list[str] = []

    def counting_verify(password_hash: str | None, password: str) -> bool:
        checked.append(password)
        return verify_password(password_hash, password)

    monkeypatch.setattr(auth_service, "verify_password", counting_verify)
    async with from_address(app, "198.51.100.20") as client:
        burst = await asyncio.gather(*(login(client, tenant.email, f"{WRONG}-{i}") for i in range(20)))
        statuses = sorted(r.status_code for r in burst)
        assert statuses == [401] * MAX_FAILURES + [429] * (20 - MAX_FAILURES)
        assert len(checked) == MAX_FAILURES
        # and the account stays locked for the right password too
        assert (await login(client, tenant.email, PASSWORD)).status_code == 429
    assert len(checked) == MAX_FAILURES


async def test_passwords_never_reach_the_logs(
    app: FastAPI, tenant: Tenant, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        async with from_address(app, "198.51.100.10") as client:
            assert (await login(client, tenant.email, PASSWORD)).status_code == 200
            for _ in range(MAX_FAILURES):
                assert (await login(client, tenant.email, WRONG)).status_code == 401
            assert (await login(client, tenant.email, PASSWORD)).status_code == 429
    assert any(entry["event"] == "request" for entry in logs)  # the log was captured
    captured = capsys.readouterr()
    for text in (str(logs), caplog.text, captured.out, captured.err):
        assert PASSWORD not in text
        assert WRONG not in text
