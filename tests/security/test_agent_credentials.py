"""Agents' NATS credentials through the API in JWT mode: minted at enrollment for the agent's own
nkey, renewed over the agent's own subject, and revoked by an admin (issue 7)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from rahatback_agent.identity import (
    AgentIdentity,
    generate_private_key,
    load_identity,
    private_key_b64,
    save_identity,
)
from rahatback_agent.nats_credentials import CredentialsRefused, NatsCredentials
from rahatback_api.agents.models import Agent
from rahatback_api.security import nats_jwt
from rahatback_contracts import streams, subjects
from rahatback_contracts.messages import Heartbeat

from tests.security.conftest import ConnectAs, JwtApi, JwtNats, assert_refused

pytestmark = pytest.mark.integration


async def api_bus_consumer(api: JwtApi, agent_id: str) -> Any:
    spec = streams.agent_commands_consumer(agent_id)
    return await api.app.state.bus.js.consumer_info(spec.stream, spec.durable)


async def test_enrollment_mints_a_short_lived_jwt_for_the_agents_own_key(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, connect_as: ConnectAs
) -> None:
    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent_id = enrolled["agent_id"]
    claims = nats_jwt.decode_claims(enrolled["nats_jwt"])
    signing = nats_jwt_server.signing
    agent_signing_key = nats_jwt.nkey_from_seed(signing["agent_signing_seed"], "account").public
    assert claims["sub"] == user.public  # the agent's key: the API never saw its seed
    assert claims["name"] == agent_id  # what the permission template confines it to
    assert claims["iss"] == agent_signing_key
    assert claims["nats"] == {"type": "user", "version": 2, "issuer_account": signing["account_public_key"]}
    lifetime = claims["exp"] - time.time()
    assert 23.9 * 3600 < lifetime <= 24 * 3600
    assert datetime.fromisoformat(enrolled["nats_jwt_expires_at"]) == datetime.fromtimestamp(
        claims["exp"], UTC
    )
    # the consumer exists before the agent asks: it can only bind to it
    assert (await api_bus_consumer(jwt_api, agent_id)).name == f"agent-{agent_id}"

    agent = await connect_as(agent_id=agent_id, user=user, jwt=enrolled["nats_jwt"])
    await agent.nc.publish(subjects.agent_heartbeat(agent_id), b"{}")
    await agent.nc.flush()
    assert agent.errors == []


async def test_jwt_mode_refuses_an_agent_that_sends_no_nats_key(jwt_api: JwtApi) -> None:
    token = (await jwt_api.ok("POST", "/v1/agents/enrollment-tokens", {}))["token"]
    body = {"token": token, "name": "old", "x25519_public_key": "A" * 43 + "="}
    response = await jwt_api.client.post("/v1/agents/enroll", json=body)
    assert response.status_code == 422
    assert "nats_public_key" in response.json()["detail"]
    assert "upgrade the agent" in response.json()["detail"]
    # a bad key is refused just as clearly, and the one-time token is still unused
    response = await jwt_api.client.post(
        "/v1/agents/enroll", json={**body, "nats_public_key": "U" + "A" * 55}
    )
    assert response.status_code == 422 and "not a NATS user public key" in response.json()["detail"]


def agent_identity(enrolled: dict[str, Any], user: nats_jwt.NKey, nats_url: str) -> AgentIdentity:
    """What `rahatback-agent enroll` saves from the same answer."""
    return AgentIdentity(
        agent_id=enrolled["agent_id"],
        org_id=enrolled["org_id"],
        nats_url=nats_url,
        api_url="http://api.test",
        name="host",
        x25519_private_key_b64=private_key_b64(generate_private_key()),
        nats_seed=user.seed,
        nats_jwt=enrolled["nats_jwt"],
    )


async def connect_agent(
    credentials: NatsCredentials, nats_url: str, on_closed: asyncio.Event, reconnected: asyncio.Event
) -> NATS:
    async def on_reconnect() -> None:
        reconnected.set()

    return await nats.connect(
        nats_url,
        inbox_prefix=subjects.agent_inbox_prefix(credentials.agent_id),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        reconnected_cb=on_reconnect,
        **credentials.connect_options(on_closed.set),
    )


async def test_renewal_over_the_agents_own_subject_yields_a_working_new_jwt(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, tmp_path: Path
) -> None:
    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    config = tmp_path / "agent.json"
    identity = agent_identity(enrolled, user, nats_jwt_server.url)
    save_identity(identity, config)
    credentials = NatsCredentials.for_identity(identity, config)
    assert credentials is not None
    closed, reconnected = asyncio.Event(), asyncio.Event()
    nc = await connect_agent(credentials, nats_jwt_server.url, closed, reconnected)
    await asyncio.sleep(1.1)  # a JWT minted in the same second would be the same JWT

    assert await credentials.renew(nc) is True
    renewed = load_identity(config).nats_jwt
    assert renewed is not None and renewed != enrolled["nats_jwt"] and credentials.jwt == renewed
    new_claims, old_claims = nats_jwt.decode_claims(renewed), nats_jwt.decode_claims(enrolled["nats_jwt"])
    assert new_claims["sub"] == user.public and new_claims["name"] == enrolled["agent_id"]
    assert new_claims["exp"] > old_claims["exp"]
    # the agent reconnected with the new JWT, and it works
    await asyncio.wait_for(reconnected.wait(), 10)
    beat = Heartbeat(agent_id=enrolled["agent_id"], version="t", at=datetime.now(UTC))
    heard = await jwt_api.app.state.bus.nc.subscribe(subjects.agent_heartbeat(enrolled["agent_id"]))
    await jwt_api.app.state.bus.nc.flush()
    await nc.publish(subjects.agent_heartbeat(enrolled["agent_id"]), beat.to_bytes())
    await nc.flush(timeout=5)
    assert (await heard.next_msg(timeout=5)).data == beat.to_bytes()
    async with jwt_api.app.state.sessionmaker() as session:
        row = await session.get(Agent, enrolled["agent_id"])
        assert row is not None and row.nats_jwt_expires_at is not None
        assert int(row.nats_jwt_expires_at.timestamp()) == new_claims["exp"]
    assert not closed.is_set()
    await nc.close()


async def test_revoking_an_agent_disconnects_it_refuses_reconnects_and_removes_its_commands(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, tmp_path: Path
) -> None:
    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent_id = enrolled["agent_id"]
    identity = agent_identity(enrolled, user, nats_jwt_server.url)
    config = tmp_path / "agent.json"
    credentials = NatsCredentials(identity, config)
    closed, reconnected = asyncio.Event(), asyncio.Event()
    nc = await connect_agent(credentials, nats_jwt_server.url, closed, reconnected)
    # online (a heartbeat) with a queued backup whose command waits in its consumer
    beat = Heartbeat(agent_id=agent_id, version="t", at=datetime.now(UTC))
    await nc.publish(subjects.agent_heartbeat(agent_id), beat.to_bytes())
    source = tmp_path / "app.db"
    source.write_bytes(b"")
    for _ in range(50):
        if (await jwt_api.ok("GET", f"/v1/agents/{agent_id}"))["online"]:
            break
        await asyncio.sleep(0.1)
    database = await jwt_api.ok(
        "POST",
        "/v1/databases",
        {"name": "app", "engine": "sqlite", "agent_id": agent_id, "settings": {"path": str(source)}},
    )
    storage = await jwt_api.ok(
        "POST",
        "/v1/storages",
        {"name": "disk", "kind": "local", "agent_id": agent_id, "settings": {"path": str(tmp_path)}},
    )
    job = await jwt_api.ok(
        "POST",
        "/v1/backups/jobs",
        {"name": "nightly", "database_id": database["id"], "storage_id": storage["id"]},
    )
    run = await jwt_api.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    for _ in range(100):
        if (await api_bus_consumer(jwt_api, agent_id)).num_pending == 1:
            break
        await asyncio.sleep(0.1)

    started = time.monotonic()
    revoked = await jwt_api.ok("POST", f"/v1/agents/{agent_id}/revoke")
    await asyncio.wait_for(closed.wait(), 5)  # the server closed its live connection
    disconnected_after = time.monotonic() - started

    assert revoked["agent_id"] == agent_id and revoked["nats_user_revoked"] is True
    assert (revoked["runs_failed"], revoked["consumer_deleted"], revoked["commands_purged"]) == (1, True, 1)
    assert "connection was closed" in revoked["detail"]
    assert disconnected_after < 5
    await assert_refused(nats_jwt_server.url, **credentials.connect_options(lambda: None))
    with pytest.raises(nats.js.errors.NotFoundError):
        await api_bus_consumer(jwt_api, agent_id)
    spec = streams.agent_commands_consumer(agent_id)
    with pytest.raises(nats.js.errors.NotFoundError):  # nothing addressed to it is left
        await jwt_api.app.state.bus.js.get_last_msg(
            spec.stream, subjects.agent_command(agent_id, "job.execute")
        )
    failed = await jwt_api.ok("GET", f"/v1/backups/history/{run['id']}")
    assert failed["status"] == "failed" and failed["error"] == "agent 'host' was revoked"
    agent = await jwt_api.ok("GET", f"/v1/agents/{agent_id}")
    assert agent["revoked"] is True and agent["online"] is False

    # no more credentials for it, even with the key it holds
    renewals = jwt_api.app.state.nats_authority
    async with jwt_api.app.state.sessionmaker() as session:
        row = await session.get(Agent, agent_id)
        assert row is not None
        with pytest.raises(Exception, match="revoked"):
            renewals.issue(row)
    # revoking again is safe and says the same
    again = await jwt_api.ok("POST", f"/v1/agents/{agent_id}/revoke")
    assert again["nats_user_revoked"] is True and again["runs_failed"] == 0
    assert again["revoked_at"] == revoked["revoked_at"]
    await nc.close()


async def test_another_agent_keeps_working_when_one_is_revoked(
    jwt_api: JwtApi, connect_as: ConnectAs
) -> None:
    keep_user, gone_user = nats_jwt.new_nkey("user"), nats_jwt.new_nkey("user")
    keep, gone = await jwt_api.enroll(keep_user), await jwt_api.enroll(gone_user)
    kept = await connect_as(agent_id=keep["agent_id"], user=keep_user, jwt=keep["nats_jwt"])
    lost = await connect_as(agent_id=gone["agent_id"], user=gone_user, jwt=gone["nats_jwt"])
    await jwt_api.ok("POST", f"/v1/agents/{gone['agent_id']}/revoke")
    await asyncio.wait_for(lost.closed.wait(), 5)
    await kept.nc.publish(subjects.agent_heartbeat(keep["agent_id"]), b"{}")
    await kept.nc.flush(timeout=5)
    assert kept.nc.is_connected and not kept.closed.is_set()


async def test_revocation_needs_an_admin(jwt_api: JwtApi) -> None:
    enrolled = await jwt_api.enroll(nats_jwt.new_nkey("user"))
    response = await jwt_api.client.post(f"/v1/agents/{enrolled['agent_id']}/revoke")
    assert response.status_code == 401
    response = await jwt_api.client.post("/v1/agents/" + "0" * 32 + "/revoke", headers=jwt_api.headers)
    assert response.status_code == 404


async def test_an_agent_whose_jwt_expired_renews_over_http_by_proving_it_holds_its_key(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, tmp_path: Path
) -> None:
    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent_id = enrolled["agent_id"]
    expired = nats_jwt_server.mint_agent_jwt(agent_id, user, ttl_seconds=-60)  # offline for too long
    identity = agent_identity(enrolled, user, nats_jwt_server.url).model_copy(update={"nats_jwt": expired})
    config = tmp_path / "agent.json"
    save_identity(identity, config)
    credentials = NatsCredentials(identity, config)
    assert credentials.expired()
    await assert_refused(nats_jwt_server.url, **credentials.connect_options(lambda: None))

    api = httpx.ASGITransport(app=jwt_api.app)
    await credentials.renew_over_http("http://api.test", transport=api)
    assert not credentials.expired() and load_identity(config).nats_jwt == credentials.jwt
    nc = await nats.connect(
        nats_jwt_server.url,
        inbox_prefix=subjects.agent_inbox_prefix(agent_id),
        allow_reconnect=False,
        **credentials.connect_options(lambda: None),
    )
    await nc.publish(subjects.agent_heartbeat(agent_id), b"{}")
    await nc.flush(timeout=5)
    await nc.close()

    # without the agent's seed the proof does not verify; a revoked agent gets nothing either
    impostor = identity.model_copy(update={"nats_seed": nats_jwt.new_nkey("user").seed})
    with pytest.raises(CredentialsRefused, match=r"\(401\).*does not verify"):
        await NatsCredentials(impostor, tmp_path / "impostor.json").renew_over_http(
            "http://api.test", transport=api
        )
    await jwt_api.ok("POST", f"/v1/agents/{agent_id}/revoke")
    with pytest.raises(CredentialsRefused, match=r"\(403\).*revoked"):
        await credentials.renew_over_http("http://api.test", transport=api)


async def test_an_agent_whose_jwt_expires_while_connected_renews_over_http_and_stops_only_when_refused(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The renewal responder is out of reach for the whole (short) JWT lifetime, so the server closes
    the agent's connection at expiry; the agent renews over HTTP (retrying while the API is down
    too), comes back online, and exits non-zero only once the API refuses it (revoked)."""
    from rahatback_agent.main import run_agent
    from rahatback_agent.settings import AgentSettings

    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent_id = enrolled["agent_id"]
    short = nats_jwt_server.mint_agent_jwt(agent_id, user, ttl_seconds=3)
    identity = agent_identity(enrolled, user, nats_jwt_server.url).model_copy(
        update={
            "nats_jwt": short,
            "command_key_id": enrolled["command_signing_key_id"],
            "command_public_key_b64": enrolled["command_signing_public_key"],
        }
    )
    settings = AgentSettings(config=tmp_path / "agent.json", heartbeat_seconds=0.3, fetch_timeout_seconds=0.5)
    save_identity(identity, settings.config)

    async def no_responder(self: NatsCredentials, nc: NATS, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        raise nats.errors.NoRespondersError

    http_attempts: list[float] = []
    renew_over_http = NatsCredentials.renew_over_http

    async def api_down_once(self: NatsCredentials, api_url: str, transport: Any = None) -> None:
        http_attempts.append(time.time())
        if len(http_attempts) == 1:
            raise httpx.ConnectError("connection refused")
        await renew_over_http(self, api_url, transport=httpx.ASGITransport(app=jwt_api.app))

    monkeypatch.setattr(NatsCredentials, "renew", no_responder)
    monkeypatch.setattr(NatsCredentials, "renew_over_http", api_down_once)
    beats: list[float] = []

    async def on_beat(msg: Any) -> None:
        beats.append(time.time())

    heard = await jwt_api.app.state.bus.nc.subscribe(subjects.agent_heartbeat(agent_id), cb=on_beat)
    agent = asyncio.create_task(run_agent(settings, identity))
    try:
        expires_at = nats_jwt.decode_claims(short)["exp"]
        for _ in range(200):
            if len(http_attempts) == 2 and any(at > http_attempts[1] for at in beats):
                break
            await asyncio.sleep(0.1)
        assert len(http_attempts) == 2 and http_attempts[0] >= expires_at - 1  # renewed after expiry
        assert any(at > http_attempts[1] for at in beats), "no heartbeat after the renewal"
        assert not agent.done()
        renewed = load_identity(settings.config).nats_jwt
        assert renewed is not None and renewed != short
        assert (await jwt_api.ok("GET", f"/v1/agents/{agent_id}"))["online"] is True

        await jwt_api.ok("POST", f"/v1/agents/{agent_id}/revoke")
        assert await asyncio.wait_for(agent, 30) == 1  # refused with 403: a failure, not a clean stop
        assert len(http_attempts) == 3
    finally:
        if not agent.done():
            agent.cancel()
            await asyncio.gather(agent, return_exceptions=True)
        await heard.unsubscribe()


@pytest.mark.parametrize("issued_at", [10**400, -(10**400), -1])
async def test_renewal_over_http_answers_422_for_an_issued_at_out_of_range(
    jwt_api: JwtApi, issued_at: int
) -> None:
    enrolled = await jwt_api.enroll(nats_jwt.new_nkey("user"))
    body = {"agent_id": enrolled["agent_id"], "issued_at": issued_at, "signature": "AAAA"}
    response = await jwt_api.client.post("/v1/agents/nats-credentials", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "issued_at"]


async def test_a_nats_key_already_registered_cannot_be_enrolled_again_even_from_another_org(
    jwt_api: JwtApi,
) -> None:
    """Revocations are keyed by public key: a second agent on a victim's key would be revoked with it
    (or revoke it). The key is refused with a 409; the token stays usable with a key of its own."""
    from rahatback_agent.identity import generate_private_key, public_key_b64
    from rahatback_api.auth.service import bootstrap_admin
    from rahatback_api.db import session_scope

    victim_key = nats_jwt.new_nkey("user")
    victim = await jwt_api.enroll(victim_key)
    async with session_scope(jwt_api.app.state.sessionmaker) as session:
        _, _, other_admin = await bootstrap_admin(
            session, "mallory@example.com", "another long password", "Evil"
        )
    headers = {"Authorization": f"Bearer {other_admin}"}
    created = await jwt_api.client.post("/v1/agents/enrollment-tokens", json={}, headers=headers)
    token = created.json()["token"]
    body = {"token": token, "name": "copycat", "x25519_public_key": public_key_b64(generate_private_key())}

    response = await jwt_api.client.post(
        "/v1/agents/enroll", json={**body, "nats_public_key": victim_key.public}
    )
    assert response.status_code == 409, response.text
    assert "already registered" in response.json()["detail"]
    own = await jwt_api.client.post(
        "/v1/agents/enroll", json={**body, "nats_public_key": nats_jwt.new_nkey("user").public}
    )
    assert own.status_code == 201, own.text
    async with jwt_api.app.state.sessionmaker() as session:
        row = await session.get(Agent, victim["agent_id"])
        assert row is not None and row.nats_public_key == victim_key.public and row.revoked_at is None


async def test_the_api_starts_while_the_revocation_push_fails_and_pushes_once_nats_takes_it(
    jwt_api: JwtApi, nats_jwt_server: JwtNats, tmp_path: Path
) -> None:
    """Every API start re-pushes the revocations (a server may have lost them). A push that fails
    must not stop the API from starting: it is retried in the background and /readyz says how it
    went; once it lands, the revoked agent is refused again."""
    import shutil

    from rahatback_api.agents.nats_identity import CLAIMS_UPDATE
    from rahatback_api.db import run_migrations
    from rahatback_api.main import create_app
    from rahatback_api.security.nats_setup import API_SYSTEM_INBOX

    from tests.security.conftest import jwt_settings

    user = nats_jwt.new_nkey("user")
    enrolled = await jwt_api.enroll(user)
    agent = NatsCredentials(agent_identity(enrolled, user, nats_jwt_server.url), tmp_path / "agent.json")
    await jwt_api.ok("POST", f"/v1/agents/{enrolled['agent_id']}/revoke")
    await assert_refused(nats_jwt_server.url, **agent.connect_options(lambda: None))

    async def agent_connects() -> bool:
        nc = NATS()  # closed even when refused: nats-py leaves a refused socket open
        try:
            await nc.connect(
                nats_jwt_server.url, allow_reconnect=False, **agent.connect_options(lambda: None)
            )
        except nats.errors.Error:
            return False
        finally:
            await nc.close()
        return True

    # the server loses the revocation (say, re-seeded with the setup's original account JWT)
    system = await nats.connect(
        nats_jwt_server.url,
        user_credentials=str(nats_jwt_server.creds("api-system")),
        inbox_prefix=API_SYSTEM_INBOX,
    )
    await system.request(CLAIMS_UPDATE, jwt_api.app.state.nats_authority.account_jwt({}).encode(), timeout=5)
    await system.close()
    assert await agent_connects()

    # an API replica starts while its system user cannot connect (the creds are not there yet)
    later = tmp_path / "api-system-later.creds"
    settings = jwt_settings(nats_jwt_server, tmp_path, nats_system_creds=later)
    await run_migrations(settings.database_url)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api.test") as client,
    ):
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["nats_revocations"].startswith("retrying: "), ready.text
        assert await agent_connects()

        shutil.copy(nats_jwt_server.creds("api-system"), later)
        for _ in range(150):
            if (await client.get("/readyz")).json()["nats_revocations"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).json()["nats_revocations"] == "ok"
        await assert_refused(nats_jwt_server.url, **agent.connect_options(lambda: None))


async def test_revoking_an_agent_enrolled_in_plain_mode_says_jwt_mode_already_refuses_it(
    jwt_api: JwtApi,
) -> None:
    enrolled = await jwt_api.enroll(nats_jwt.new_nkey("user"))
    async with jwt_api.app.state.sessionmaker() as session:  # as if enrolled before the switch
        row = await session.get(Agent, enrolled["agent_id"])
        assert row is not None
        row.nats_public_key, row.nats_jwt_expires_at = None, None
        await session.commit()

    revoked = await jwt_api.ok("POST", f"/v1/agents/{enrolled['agent_id']}/revoke")
    assert revoked["nats_user_revoked"] is False
    assert "already refuse it" in revoked["detail"] and "enroll it anew" in revoked["detail"]
