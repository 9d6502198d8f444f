"""Roles and members: who may do what in an organization, and the rules for changing that."""

from __future__ import annotations

import httpx
import pytest

from tests.api.conftest import PASSWORD, Tenant, TenantFactory, create_job, pg_settings
from tests.api.test_operations import add_agent

NEW_PASSWORD = "a fresh initial password"


async def login(
    client: httpx.AsyncClient, email: str, password: str, org_id: str | None = None
) -> httpx.Response:
    return await client.post("/v1/auth/login", json={"email": email, "password": password, "org_id": org_id})


def bearer(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


async def test_an_admin_adds_a_member_who_logs_in_with_that_role_then_changes_and_removes_them(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    r = await client.post(
        "/v1/members",
        json={"email": "New.Person@Example.com", "role": "operator", "password": NEW_PASSWORD},
        headers=tenant.headers,
    )
    assert r.status_code == 201, r.text
    added = r.json()
    assert (added["email"], added["role"]) == ("new.person@example.com", "operator")
    assert NEW_PASSWORD not in r.text

    member = bearer(await login(client, "new.person@example.com", NEW_PASSWORD))
    me = (await client.get("/v1/me", headers=member)).json()
    assert (me["role"], me["org"]["id"]) == ("operator", tenant.org_id)

    listed = (await client.get("/v1/members", headers=tenant.headers)).json()
    assert {(m["email"], m["role"]) for m in listed} == {
        (tenant.email, "owner"),
        ("new.person@example.com", "operator"),
    }

    r = await client.patch(f"/v1/members/{added['user_id']}", json={"role": "viewer"}, headers=tenant.headers)
    assert (r.status_code, r.json()["role"]) == (200, "viewer")
    assert (await client.get("/v1/me", headers=member)).json()["role"] == "viewer"  # the same token
    denied = await client.post("/v1/databases", json={"name": "x", "engine": "postgresql"}, headers=member)
    assert denied.status_code == 403

    assert (await client.delete(f"/v1/members/{added['user_id']}", headers=tenant.headers)).status_code == 204
    assert (await client.get("/v1/me", headers=member)).status_code == 401
    refused = await login(client, "new.person@example.com", NEW_PASSWORD)
    assert (refused.status_code, refused.json()["detail"]) == (403, "you belong to no organization")
    gone = await client.patch(
        f"/v1/members/{added['user_id']}", json={"role": "admin"}, headers=tenant.headers
    )
    assert (gone.status_code, gone.json()["detail"]) == (404, "member not found")


async def test_adding_an_existing_user_keeps_their_password(
    client: httpx.AsyncClient, make_tenant: TenantFactory
) -> None:
    a, b = await make_tenant(), await make_tenant()
    r = await client.post(
        "/v1/members", json={"email": b.email, "role": "viewer", "password": NEW_PASSWORD}, headers=a.headers
    )
    assert (r.status_code, r.json()["email"], r.json()["role"]) == (201, b.email, "viewer")
    # an admin of A cannot take over B's owner by "adding" them with a password of A's choosing
    assert (await login(client, b.email, NEW_PASSWORD, a.org_id)).status_code == 401
    in_a = bearer(await login(client, b.email, PASSWORD, a.org_id))
    assert (await client.get("/v1/me", headers=in_a)).json()["role"] == "viewer"
    in_b = bearer(await login(client, b.email, PASSWORD, b.org_id))
    assert (await client.get("/v1/me", headers=in_b)).json()["role"] == "owner"

    again = await client.post(
        "/v1/members", json={"email": b.email, "role": "admin", "password": NEW_PASSWORD}, headers=a.headers
    )
    assert (again.status_code, again.json()["field"]) == (409, "email")


async def test_a_new_email_needs_an_initial_password(client: httpx.AsyncClient, tenant: Tenant) -> None:
    r = await client.post("/v1/members", json={"email": "nobody@example.com"}, headers=tenant.headers)
    assert (r.status_code, r.json()["field"]) == (422, "password")
    assert "initial password of at least 12 characters" in r.json()["detail"]
    short = await client.post(
        "/v1/members", json={"email": "nobody@example.com", "password": "short"}, headers=tenant.headers
    )
    assert (short.status_code, short.json()["field"]) == (422, "password")
    assert (await client.get("/v1/members", headers=tenant.headers)).json()[1:] == []


async def test_the_answer_does_not_say_whether_the_email_has_an_account(
    client: httpx.AsyncClient, make_tenant: TenantFactory
) -> None:
    a, b = await make_tenant(), await make_tenant()
    unknown = "never-registered@example.com"

    def shape(r: httpx.Response) -> tuple[int, object]:
        body = r.json()
        if isinstance(body, dict) and r.status_code == 201:
            return r.status_code, sorted(body)  # ids and times differ, the fields must not
        return r.status_code, body

    for body in ({}, {"password": "short"}):
        answers = [
            await client.post("/v1/members", json={"email": email, **body}, headers=a.headers)
            for email in (b.email, unknown)
        ]
        assert answers[0].status_code == 422
        assert shape(answers[0]) == shape(answers[1]), body
    added = [
        await client.post("/v1/members", json={"email": email, "password": NEW_PASSWORD}, headers=a.headers)
        for email in (b.email, unknown)
    ]
    assert [r.status_code for r in added] == [201, 201]
    assert shape(added[0]) == shape(added[1]) == (201, ["created_at", "email", "role", "user_id"])
    assert [r.json()["email"] for r in added] == [b.email, unknown]


async def test_nobody_grants_a_role_above_their_own(client: httpx.AsyncClient, tenant: Tenant) -> None:
    admin = await tenant.member("admin")
    me = (await client.get("/v1/me", headers=admin)).json()
    owner_id = (await client.get("/v1/me", headers=tenant.headers)).json()["user_id"]

    as_owner = {"email": "boss2@example.com", "role": "owner", "password": NEW_PASSWORD}
    r = await client.post("/v1/members", json=as_owner, headers=admin)
    assert (r.status_code, r.json()["detail"]) == (
        403,
        "you cannot grant the owner role: it is above your own (admin)",
    )
    r = await client.patch(f"/v1/members/{me['user_id']}", json={"role": "owner"}, headers=admin)
    assert r.status_code == 403
    # nor touch someone above them
    r = await client.patch(f"/v1/members/{owner_id}", json={"role": "viewer"}, headers=admin)
    assert (r.status_code, r.json()["detail"]) == (
        403,
        "you cannot change a member whose role (owner) is above yours (admin)",
    )
    assert (await client.delete(f"/v1/members/{owner_id}", headers=admin)).status_code == 403

    # what an admin may do: add and manage up to admin
    r = await client.post(
        "/v1/members",
        json={"email": "ops@example.com", "role": "admin", "password": NEW_PASSWORD},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert (
        await client.patch(f"/v1/members/{r.json()['user_id']}", json={"role": "operator"}, headers=admin)
    ).status_code == 200
    # and an owner makes owners
    r = await client.post("/v1/members", json=as_owner, headers=tenant.headers)
    assert (r.status_code, r.json()["role"]) == (201, "owner")


async def test_the_last_owner_can_be_neither_demoted_nor_removed(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    owner_id = (await client.get("/v1/me", headers=tenant.headers)).json()["user_id"]
    for response in (
        await client.patch(f"/v1/members/{owner_id}", json={"role": "admin"}, headers=tenant.headers),
        await client.delete(f"/v1/members/{owner_id}", headers=tenant.headers),
    ):
        assert response.status_code == 409
        assert response.json()["detail"] == (
            "this is the organization's last owner: make another member owner first"
        )
    assert (await client.get("/v1/me", headers=tenant.headers)).json()["role"] == "owner"

    second = await client.post(
        "/v1/members",
        json={"email": "co-owner@example.com", "role": "owner", "password": NEW_PASSWORD},
        headers=tenant.headers,
    )
    assert second.status_code == 201
    r = await client.patch(f"/v1/members/{owner_id}", json={"role": "admin"}, headers=tenant.headers)
    assert (r.status_code, r.json()["role"]) == (200, "admin")
    # the co-owner is now the last one
    co_owner = bearer(await login(client, "co-owner@example.com", NEW_PASSWORD))
    r = await client.delete(f"/v1/members/{second.json()['user_id']}", headers=co_owner)
    assert r.status_code == 409


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/databases", {"name": "d", "engine": "postgresql", "settings": pg_settings()}),
        ("POST", "/v1/storages", {"name": "s", "kind": "local", "settings": {"path": "/srv/b"}}),
        (
            "POST",
            "/v1/notifications/channels",
            {"name": "c", "kind": "email", "recipients": ["a@example.com"]},
        ),
        ("POST", "/v1/agents/enrollment-tokens", {}),
        ("GET", "/v1/members", None),
        ("POST", "/v1/members", {"email": "x@example.com", "role": "viewer", "password": NEW_PASSWORD}),
        ("GET", "/v1/audit", None),
    ],
)
async def test_operators_run_and_restore_but_do_not_configure(
    client: httpx.AsyncClient, tenant: Tenant, method: str, path: str, body: object
) -> None:
    operator = await tenant.member("operator")
    r = await client.request(method, path, json=body, headers=operator)
    assert (r.status_code, r.json()["detail"]) == (
        403,
        "this needs the admin role or higher; you are operator",
    )
    admin = await tenant.member("admin")
    assert (await client.request(method, path, json=body, headers=admin)).status_code in (200, 201)


async def test_operators_run_backups_and_restore_them(client: httpx.AsyncClient, tenant: Tenant) -> None:
    await add_agent(tenant)
    operator = await tenant.member("operator")
    job = await create_job(client, tenant)
    run = await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=operator)
    assert run.status_code == 202, run.text
    # not yet completed: refused by the restore's own rules, not by the role
    restore = await client.post(f"/v1/backups/history/{run.json()['id']}/restore", headers=operator)
    assert restore.status_code == 409, restore.text
    viewer = await tenant.member("viewer")
    assert (await client.post(f"/v1/backups/jobs/{job['id']}/run", headers=viewer)).status_code == 403
    denied = await client.delete(f"/v1/backups/jobs/{job['id']}", headers=operator)
    assert denied.status_code == 403
