"""Every endpoint, found by walking `app.routes` (a new endpoint is covered without editing this file,
and fails here until it checks tenancy and roles):

- for each route with a path parameter and each of its methods, the owner of organization X asking for
  organization Y's real resource gets 404;
- a viewer gets 403 from the role check on every mutating route, with a body that would otherwise be
  valid;
- each of those requests is in the audit log, under the user who made it;
- an operator walks every route of its own organization, reads included, and gets the admin role
  check's 403 from exactly the routes listed in ADMIN_ONLY (a new admin-only route must be listed
  there) and no 403 from any other.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from rahatback_api.db import session_scope
from rahatback_api.models import AuditEvent, BackupKey, RestoreRun, VerifyRun
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import select

from tests.api.conftest import PASSWORD, Tenant, TenantFactory, create_job, pg_settings
from tests.api.test_notification_channels import create_channel
from tests.api.test_operations import add_agent

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
PARAM = re.compile(r"{(\w+)}")

# Routes anyone may call, each with the reason.
PUBLIC = {
    ("POST", "/v1/auth/login"): "logging in is how a token is obtained (throttled: test_login_throttle)",
    (
        "POST",
        "/v1/agents/enroll",
    ): "an agent has no user: the one-time enrollment token names the organization",
    ("POST", "/v1/agents/nats-credentials"): (
        "an agent whose NATS JWT expired proves it holds its nkey seed (docs/nats-security.md)"
    ),
    ("GET", "/healthz"): "liveness probe, says nothing about any tenant",
    ("GET", "/readyz"): "readiness probe, says nothing about any tenant",
    ("GET", "/metrics"): "Prometheus scrape endpoint for whoever runs the service; not routed by the Ingress",
}
# Mutating routes a viewer may call, each with the reason.
SELF_SERVICE = {
    ("POST", "/v1/tokens"): "a personal token for oneself; it acts with the caller's own role, never more",
    ("DELETE", "/v1/tokens/{token_id}"): "revoking one's own token",
}

# Routes that need the admin role (or owner): an operator is refused these and only these.
ADMIN_ONLY = {
    ("POST", "/v1/agents/enrollment-tokens"),
    ("POST", "/v1/agents/{agent_id}/revoke"),
    ("GET", "/v1/audit"),
    ("DELETE", "/v1/backups/jobs/{job_id}"),
    ("POST", "/v1/backups/keys/{key_id}/export"),
    ("POST", "/v1/databases"),
    ("PATCH", "/v1/databases/{database_id}"),
    ("DELETE", "/v1/databases/{database_id}"),
    ("GET", "/v1/members"),
    ("POST", "/v1/members"),
    ("PATCH", "/v1/members/{user_id}"),
    ("DELETE", "/v1/members/{user_id}"),
    ("POST", "/v1/notifications/channels"),
    ("PATCH", "/v1/notifications/channels/{channel_id}"),
    ("DELETE", "/v1/notifications/channels/{channel_id}"),
    ("POST", "/v1/storages"),
    ("PATCH", "/v1/storages/{storage_id}"),
    ("DELETE", "/v1/storages/{storage_id}"),
}
ADMIN_REFUSAL = "this needs the admin role or higher; you are operator"
# Responses that never end by themselves, left out of the operator's walk (ASGITransport waits for
# the whole body), each with who may read it.
STREAMS = {("GET", "/v1/events"): "any member: server-sent events of the caller's organization"}


@dataclass
class Resources:
    """One real resource of every kind in one organization, by path parameter name."""

    ids: dict[str, str]

    def body(self, method: str, path: str) -> Any:
        make = BODIES.get((method, path))
        return make(self) if make is not None else None


BODIES: dict[tuple[str, str], Callable[[Resources], Any]] = {
    ("POST", "/v1/tokens"): lambda r: {"name": "matrix", "scopes": ["read"]},
    ("POST", "/v1/agents/enrollment-tokens"): lambda r: {"ttl_minutes": 30},
    ("POST", "/v1/databases"): lambda r: {
        "name": "matrix",
        "engine": "postgresql",
        "settings": pg_settings(),
    },
    ("PATCH", "/v1/databases/{database_id}"): lambda r: {"name": "matrix-renamed"},
    ("POST", "/v1/databases/test-connection"): lambda r: {"engine": "postgresql", "settings": pg_settings()},
    ("POST", "/v1/storages"): lambda r: {"name": "matrix", "kind": "local", "settings": {"path": "/srv/m"}},
    ("PATCH", "/v1/storages/{storage_id}"): lambda r: {"name": "matrix-renamed"},
    ("POST", "/v1/storages/test-connection"): lambda r: {"kind": "local", "settings": {"path": "/srv/m"}},
    ("POST", "/v1/backups/jobs"): lambda r: {
        "name": "matrix",
        "database_id": r.ids["database_id"],
        "storage_id": r.ids["storage_id"],
    },
    ("PATCH", "/v1/backups/jobs/{job_id}"): lambda r: {"name": "matrix-renamed"},
    ("POST", "/v1/notifications/channels"): lambda r: {
        "name": "matrix",
        "kind": "email",
        "recipients": ["ops@example.com"],
    },
    ("PATCH", "/v1/notifications/channels/{channel_id}"): lambda r: {"name": "matrix-renamed"},
    ("POST", "/v1/members"): lambda r: {
        "email": f"m-{uuid.uuid4().hex[:6]}@example.com",
        "password": PASSWORD,
    },
    ("PATCH", "/v1/members/{user_id}"): lambda r: {"role": "viewer"},
}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    params: tuple[str, ...]
    body_required: bool


def endpoints(app: FastAPI) -> list[Endpoint]:
    found = []
    for context in iter_route_contexts(app.routes):
        route = context.original_route
        if not isinstance(route, APIRoute):
            continue
        path = context.path or route.path
        required = route.body_field is not None and route.body_field.field_info.is_required()
        for method in sorted(route.methods):
            found.append(Endpoint(method, path, tuple(PARAM.findall(path)), required))
    # deletions last: if one of them wrongly succeeded, it would not hide the other findings
    return sorted(found, key=lambda e: (e.method == "DELETE", e.path, e.method))


async def resources_of(
    client: httpx.AsyncClient, tenant: Tenant, sessions: async_sessionmaker[AsyncSession]
) -> Resources:
    agent = await add_agent(tenant)
    job = await create_job(client, tenant, name=f"job-{uuid.uuid4().hex[:6]}")
    run = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=tenant.headers)
    assert run.status_code == 202, run.text
    channel = await create_channel(client, tenant, name="team", kind="email", recipients=["a@example.com"])
    token = (await client.post("/v1/tokens", json={"name": "t"}, headers=tenant.headers)).json()
    member = await tenant.member("operator")
    user_id = (await client.get("/v1/me", headers=member)).json()["user_id"]
    async with session_scope(sessions) as session:
        key = (
            (await session.execute(select(BackupKey).where(BackupKey.job_id == job["id"]))).scalars().first()
        )
        restore = RestoreRun(
            org_id=tenant.org_id, backup_run_id=run.json()["id"], database_id=str(job["database_id"])
        )
        verify = VerifyRun(
            org_id=tenant.org_id,
            backup_run_id=run.json()["id"],
            job_id=str(job["id"]),
            database_id=str(job["database_id"]),
            storage_id=str(job["storage_id"]),
            level="integrity",
            status="completed",
        )
        session.add_all([restore, verify])
    assert key is not None, "creating a job makes its backup key"
    return Resources(
        {
            "agent_id": agent.id,
            "database_id": str(job["database_id"]),
            "storage_id": str(job["storage_id"]),
            "job_id": str(job["id"]),
            "run_id": run.json()["id"],
            "restore_id": restore.id,
            "verify_id": verify.id,
            "channel_id": str(channel["id"]),
            "token_id": token["id"],
            "user_id": user_id,
            "key_id": key.id,
        }
    )


def url(endpoint: Endpoint, resources: Resources) -> str:
    missing = [p for p in endpoint.params if p not in resources.ids]
    assert not missing, f"{endpoint.method} {endpoint.path}: make a real {missing} in resources_of()"
    return endpoint.path.format(**resources.ids)


def body_for(endpoint: Endpoint, resources: Resources) -> Any:
    body = resources.body(endpoint.method, endpoint.path)
    assert body is not None or not endpoint.body_required, (
        f"{endpoint.method} {endpoint.path} needs a body: add a valid one to BODIES"
    )
    return body


async def test_every_endpoint_hides_other_tenants_and_refuses_viewers(
    app: FastAPI,
    client: httpx.AsyncClient,
    make_tenant: TenantFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    x, y = await make_tenant(), await make_tenant()
    theirs = await resources_of(client, y, sessionmaker)
    all_endpoints = endpoints(app)
    assert len(all_endpoints) > 40  # the walk found the app's routes

    # the resources are real: Y sees each of them
    for kind, path in [
        ("agent_id", "/v1/agents/{agent_id}"),
        ("database_id", "/v1/databases/{database_id}"),
        ("storage_id", "/v1/storages/{storage_id}"),
        ("job_id", "/v1/backups/jobs/{job_id}"),
        ("run_id", "/v1/backups/history/{run_id}"),
        ("restore_id", "/v1/backups/restores/{restore_id}"),
        ("verify_id", "/v1/backups/verifications/{verify_id}"),
        ("channel_id", "/v1/notifications/channels/{channel_id}"),
    ]:
        assert (await client.get(path.format(**theirs.ids), headers=y.headers)).status_code == 200, kind
    assert theirs.ids["token_id"] in (await client.get("/v1/tokens", headers=y.headers)).text
    assert theirs.ids["user_id"] in (await client.get("/v1/members", headers=y.headers)).text

    not_hidden = []
    checked = []
    for endpoint in all_endpoints:
        if not endpoint.params or (endpoint.method, endpoint.path) in PUBLIC:
            continue
        target = url(endpoint, theirs)
        r = await client.request(endpoint.method, target, json=body_for(endpoint, theirs), headers=x.headers)
        checked.append((endpoint.method, endpoint.path))
        if r.status_code != 404 or not r.json()["detail"].endswith("not found"):
            not_hidden.append((endpoint.method, endpoint.path, r.status_code, r.text[:200]))
    assert not_hidden == [], "another organization's resource must be a 404"
    assert len(checked) > 20

    viewer = await y.member("viewer")
    not_refused = []
    refused = []
    for endpoint in all_endpoints:
        key = (endpoint.method, endpoint.path)
        if endpoint.method not in MUTATING or key in PUBLIC or key in SELF_SERVICE:
            continue
        target = url(endpoint, theirs)
        r = await client.request(endpoint.method, target, json=body_for(endpoint, theirs), headers=viewer)
        refused.append(key)
        if r.status_code != 403 or not r.json()["detail"].startswith("this needs the "):
            not_refused.append((endpoint.method, endpoint.path, r.status_code, r.text[:200]))
    assert not_refused == [], "a viewer must be refused by the role check on every mutating route"
    assert {"POST", "PATCH", "DELETE"} <= {method for method, _ in refused}

    # every one of those requests was audited, under the user who made it
    x_id = (await client.get("/v1/me", headers=x.headers)).json()["user_id"]
    viewer_id = (await client.get("/v1/me", headers=viewer)).json()["user_id"]
    async with session_scope(sessionmaker) as session:
        rows = (await session.execute(select(AuditEvent))).scalars().all()
    audited = {(e.actor_user_id, e.method, e.path, e.status_code) for e in rows}
    for method, path in checked:
        if method in MUTATING:
            assert (x_id, method, path, 404) in audited, (method, path)
    for method, path in refused:
        assert (viewer_id, method, path, 403) in audited, (method, path)


async def test_operators_are_refused_exactly_the_admin_routes(
    app: FastAPI,
    client: httpx.AsyncClient,
    make_tenant: TenantFactory,
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    y = await make_tenant()
    ours = await resources_of(client, y, sessionmaker)
    operator = await y.member("operator")
    wrongly_refused = []
    not_refused = []
    walked = set()
    for endpoint in endpoints(app):
        key = (endpoint.method, endpoint.path)
        if key in PUBLIC or key in STREAMS:
            continue
        walked.add(key)
        target = url(endpoint, ours)
        r = await client.request(endpoint.method, target, json=body_for(endpoint, ours), headers=operator)
        if key in ADMIN_ONLY:
            if (r.status_code, r.text) != (403, f'{{"detail":"{ADMIN_REFUSAL}"}}'):
                not_refused.append((*key, str(r.status_code), r.text[:200]))
        elif r.status_code == 403:
            wrongly_refused.append((*key, r.text[:200]))
    assert not_refused == [], "an operator must be refused every admin-only route"
    assert wrongly_refused == [], (
        "an operator was refused a route not in ADMIN_ONLY: list it there if it is admin-only"
    )
    assert walked >= ADMIN_ONLY
    assert {"GET", "POST", "PATCH", "DELETE"} <= {method for method, _ in walked - ADMIN_ONLY}


def test_the_allow_lists_name_real_routes(app: FastAPI) -> None:
    known = {(e.method, e.path) for e in endpoints(app)}
    assert set(PUBLIC) <= known
    assert set(SELF_SERVICE) <= known
    assert known >= ADMIN_ONLY
    assert set(STREAMS) <= known
    assert set(BODIES) <= known


async def test_public_routes_are_the_only_ones_without_a_token(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    resources = Resources(
        {
            name: "0" * 32
            for name in (
                "agent_id",
                "database_id",
                "storage_id",
                "job_id",
                "run_id",
                "restore_id",
                "verify_id",
                "channel_id",
                "token_id",
                "user_id",
                "key_id",
            )
        }
    )
    open_routes = []
    for endpoint in endpoints(app):
        if (endpoint.method, endpoint.path) in PUBLIC:
            continue
        r = await client.request(
            endpoint.method, url(endpoint, resources), json=body_for(endpoint, resources)
        )
        if r.status_code != 401:
            open_routes.append((endpoint.method, endpoint.path, r.status_code))
    assert open_routes == []
