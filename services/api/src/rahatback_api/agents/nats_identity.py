"""Agents' NATS identities in operator/JWT mode (docs/nats-security.md).

The API holds the account's scoped signing key for agents and mints each agent a short-lived user
JWT for the public nkey the agent sent at enrollment (name = agent id, so the signing key's
permission template confines it to its own subjects). It also holds an operator signing key, with
which it re-issues the account JWT carrying the revocations of revoked agents and pushes it to the
servers through a system-account user. Without `RAHATBACK_NATS_SIGNING` the API runs NATS in plain
mode and none of this is active.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import BaseModel, Field
from rahatback_contracts import subjects
from rahatback_contracts.credentials import CredentialsRenewReply, renewal_proof
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlmodel import col, select

from rahatback_api.agents.models import Agent
from rahatback_api.columns import utcnow
from rahatback_api.db import SessionDep, session_scope
from rahatback_api.errors import AppError
from rahatback_api.security import nats_jwt, nats_setup
from rahatback_api.settings import ConfigurationError, Settings

log = structlog.get_logger(__name__)

CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"
RENEWALS_QUEUE = "api-credentials"
# a revoked agent's entry stays in the account JWT until every JWT it could hold has expired
REVOCATION_MARGIN = timedelta(hours=1)
# the start-up push of the revocations retries in the background, 1 s doubling up to this
PUSH_RETRY_CAP_SECONDS = 60.0


class NatsIdentityError(RuntimeError):
    """The NATS servers did not accept an account update; the message says what they answered."""


@dataclass(frozen=True)
class SigningMaterial:
    """`api-signing.json` as written by `rahatback-api nats-setup`."""

    account_name: str
    account_public_key: str
    account_claims: dict[str, Any]
    operator_signing: nats_jwt.NKey
    agent_signing: nats_jwt.NKey

    @classmethod
    def load(cls, path: Path) -> SigningMaterial:
        try:
            data = json.loads(path.read_text())
            return cls(
                account_name=data["account_name"],
                account_public_key=nats_jwt.check_public_key(data["account_public_key"], "account"),
                account_claims=data["account_claims"],
                operator_signing=nats_jwt.nkey_from_seed(data["operator_signing_seed"], "operator"),
                agent_signing=nats_jwt.nkey_from_seed(data["agent_signing_seed"], "account"),
            )
        except FileNotFoundError:
            raise ConfigurationError(
                f"RAHATBACK_NATS_SIGNING: {path} does not exist (run `rahatback-api nats-setup --out DIR`)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"RAHATBACK_NATS_SIGNING: {path} is not the api-signing.json written by "
                f"`rahatback-api nats-setup` ({type(exc).__name__}: {exc})"
            ) from None


@dataclass(frozen=True)
class IssuedCredentials:
    jwt: str
    expires_at: datetime


class NatsAuthority:
    def __init__(
        self, material: SigningMaterial, *, lifetime: timedelta, nats_url: str, system_creds: Path | None
    ) -> None:
        self.material = material
        self.lifetime = lifetime
        self.nats_url = nats_url
        self.system_creds = system_creds
        self._last_account_iat = 0
        # whether the servers hold the current revocations, for /readyz: "pending" until the first
        # push, "ok" after a push landed, "retrying: <why>" while the start-up push keeps failing
        self.revocations_state = "pending"

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsAuthority | None:
        if settings.nats_signing is None:
            return None
        if settings.nats_system_creds is None:
            raise ConfigurationError(
                "RAHATBACK_NATS_SIGNING is set but RAHATBACK_NATS_SYSTEM_CREDS is not: revoking an agent "
                "needs the system-account user (creds/api-system.creds from `rahatback-api nats-setup`)"
            )
        return cls(
            SigningMaterial.load(settings.nats_signing),
            lifetime=timedelta(hours=settings.agent_jwt_hours),
            nats_url=settings.nats_url,
            system_creds=settings.nats_system_creds,
        )

    # ------------------------------------------------------------------ agent JWTs

    def issue(self, agent: Agent) -> IssuedCredentials:
        """A fresh user JWT for the agent's registered nkey; records its expiry on the row."""
        if agent.revoked_at is not None:
            raise AppError("this agent was revoked; enroll the host again with a new token", 403)
        if agent.nats_public_key is None:
            raise AppError(
                "this agent was enrolled while NATS ran in plain mode; enroll it again to get NATS "
                "credentials",
                409,
            )
        expires_at = (utcnow() + self.lifetime).replace(microsecond=0)
        token = nats_jwt.agent_user_jwt(
            agent_id=agent.id,
            user_public_key=agent.nats_public_key,
            account_public_key=self.material.account_public_key,
            signing_key=self.material.agent_signing,
            expires_at=int(expires_at.timestamp()),
        )
        agent.nats_jwt_expires_at = expires_at
        return IssuedCredentials(jwt=token, expires_at=expires_at)

    async def enroll(
        self, session: AsyncSession, agent: Agent, nats_public_key: str | None
    ) -> IssuedCredentials:
        if nats_public_key is None:
            raise AppError(
                "this control plane runs NATS in operator/JWT mode: the agent must send its NATS "
                "public key (nats_public_key); upgrade the agent",
                422,
                field="nats_public_key",
            )
        try:
            public_key = nats_jwt.check_public_key(nats_public_key, "user")
        except nats_jwt.NatsJwtError as exc:
            raise AppError(f"nats_public_key: {exc}", 422, field="nats_public_key") from None
        # revocations are keyed by public key: a second agent on the same key (say, enrolled in
        # another org by someone who learnt it) would be cut off with it, or cut the first one off
        taken = await session.scalar(select(Agent.id).where(col(Agent.nats_public_key) == public_key))
        if taken is not None:
            raise AppError(
                "this NATS public key is already registered to an agent; the agent makes a new key at "
                "every enrollment, so run `rahatback-agent enroll` again",
                409,
                field="nats_public_key",
            )
        agent.nats_public_key = public_key
        return self.issue(agent)

    # ------------------------------------------------------------------ revocations

    async def revocations(self, session: AsyncSession) -> dict[str, int]:
        """Revoked agents whose JWTs may still be valid: public key → revocation time. Every JWT
        issued to that key at or before that time is refused by the servers."""
        horizon = utcnow() - REVOCATION_MARGIN
        rows = await session.execute(
            select(Agent).where(col(Agent.revoked_at).is_not(None), col(Agent.nats_public_key).is_not(None))
        )
        result: dict[str, int] = {}
        for agent in rows.scalars():
            assert agent.revoked_at is not None and agent.nats_public_key is not None
            if agent.nats_jwt_expires_at is not None and agent.nats_jwt_expires_at < horizon:
                continue  # its last JWT has expired and the API renews no more: nothing to revoke
            result[agent.nats_public_key] = int(agent.revoked_at.timestamp())
        return result

    def account_jwt(self, revocations: dict[str, int]) -> str:
        claims = dict(self.material.account_claims)
        if revocations:
            claims["revocations"] = dict(sorted(revocations.items()))
        # a later update must never carry an older issue time than the one it replaces
        issued_at = max(int(time.time()), self._last_account_iat + 1)
        self._last_account_iat = issued_at
        return nats_jwt.encode(
            subject=self.material.account_public_key,
            name=self.material.account_name,
            nats=claims,
            signer=self.material.operator_signing,
            issued_at=issued_at,
        )

    async def push_revocations(self, session: AsyncSession) -> int:
        """Re-issue the account JWT with every current revocation and push it to the servers, which
        close the revoked users' connections at once and refuse them afterwards."""
        revocations = await self.revocations(session)
        token = self.account_jwt(revocations)
        nc = Client()
        try:  # closed even when refused: nats-py leaves the socket of a refused connection open
            await nc.connect(
                servers=[self.nats_url],
                name="rahatback-api-system",
                user_credentials=str(self.system_creds),
                inbox_prefix=nats_setup.API_SYSTEM_INBOX,  # all the system user may subscribe to
                allow_reconnect=False,
                connect_timeout=5,
            )
            reply = await nc.request(CLAIMS_UPDATE, token.encode(), timeout=5)
        finally:
            await nc.close()
        answer = json.loads(reply.data)
        if "error" in answer:
            raise NatsIdentityError(f"NATS refused the account update: {answer['error']}")
        self.revocations_state = "ok"
        log.info("nats.account_updated", revocations=len(revocations))
        return len(revocations)

    async def try_push_revocations(self, sessions: async_sessionmaker[AsyncSession]) -> bool:
        """One push in its own transaction; a failure is logged and kept for /readyz, never raised."""
        try:
            async with session_scope(sessions) as session:
                await self.push_revocations(session)
        except Exception as exc:
            if self.revocations_state == "ok":  # a revoke's push landed meanwhile
                return True
            reason = f"{type(exc).__name__}: {exc}"[:300]
            self.revocations_state = f"retrying: {reason}"
            log.warning("nats.revocations_not_pushed", error=reason)
            return False
        return True

    async def retry_push_revocations(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        """Retry a failed start-up push with backoff until it, or any revoke's push, lands."""
        delay = 1.0
        while self.revocations_state != "ok":
            await asyncio.sleep(delay)
            delay = min(delay * 2, PUSH_RETRY_CAP_SECONDS)
            if self.revocations_state != "ok":
                await self.try_push_revocations(sessions)


class CredentialRenewals:
    """Answers `agent.<id>.credentials.renew` (queue group: one API replica answers each)."""

    def __init__(self, authority: NatsAuthority, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.authority = authority
        self.sessions = sessions
        self._sub: Subscription | None = None

    async def start(self, nc: Client) -> None:
        self._sub = await nc.subscribe(
            subjects.ALL_CREDENTIAL_RENEWALS, queue=RENEWALS_QUEUE, cb=self._on_request
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        try:
            agent_id = subjects.agent_id_of(msg.subject)  # bound by NATS permissions, unlike a body
        except ValueError:
            return
        reply = await self.renew(agent_id)
        if msg.reply:
            await msg.respond(reply.to_bytes())

    async def renew(self, agent_id: str) -> CredentialsRenewReply:
        try:
            async with session_scope(self.sessions) as session:
                agent = await session.get(Agent, agent_id, with_for_update=True)
                if agent is None:
                    return CredentialsRenewReply(error="unknown agent")
                issued = self.authority.issue(agent)
        except AppError as exc:
            log.warning("nats.renewal_refused", agent_id=agent_id, reason=exc.message)
            return CredentialsRenewReply(error=exc.message)
        log.info("nats.credentials_renewed", agent_id=agent_id, expires_at=issued.expires_at.isoformat())
        return CredentialsRenewReply(jwt=issued.jwt, expires_at=issued.expires_at.astimezone(UTC))


def _authority(request: Request) -> NatsAuthority | None:
    authority: NatsAuthority | None = getattr(request.app.state, "nats_authority", None)
    return authority


NatsAuthorityDep = Annotated[NatsAuthority | None, Depends(_authority)]


@asynccontextmanager
async def nats_identity_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """After the bus is up: load the signing material, re-push the revocations (a server may have
    missed the last push, or been restored from the setup's original account JWT; retried in the
    background until it lands, /readyz shows how it went) and answer renewals. Plain mode:
    nothing."""
    settings: Settings = app.state.settings
    authority = NatsAuthority.from_settings(settings)
    app.state.nats_authority = authority
    if authority is None:
        yield
        return
    sessions: async_sessionmaker[AsyncSession] = app.state.sessionmaker
    # a brief NATS problem must not stop the API from starting (and crash-loop it): a failed push
    # is retried in the background
    pushing: asyncio.Task[None] | None = None
    if not await authority.try_push_revocations(sessions):
        pushing = asyncio.create_task(authority.retry_push_revocations(sessions), name="nats-revocations")
    renewals = CredentialRenewals(authority, sessions)
    try:
        await renewals.start(app.state.bus.nc)
        yield
    finally:
        if pushing is not None:
            pushing.cancel()
            await asyncio.gather(pushing, return_exceptions=True)
        await renewals.stop()


# ------------------------------------------------------------------ renewal over HTTP

router = APIRouter(prefix="/v1/agents", tags=["agents"])
PROOF_WINDOW_SECONDS = 300


class NatsCredentialsProof(BaseModel):
    agent_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    # bounded so that comparing it with the clock cannot overflow a float (a 500 on a public route)
    issued_at: int = Field(ge=0, le=2**40, description="unix seconds; within 5 minutes of the API's clock")
    signature: str = Field(
        max_length=200,
        description="base64 ed25519 signature of renewal_proof(agent_id, issued_at) by its nkey",
    )


class NatsCredentialsIssued(BaseModel):
    jwt: str
    expires_at: datetime


@router.post("/nats-credentials", response_model=NatsCredentialsIssued)
async def renew_expired_credentials(
    body: NatsCredentialsProof, session: SessionDep, authority: NatsAuthorityDep
) -> NatsCredentialsIssued:
    """A new NATS user JWT for an agent whose JWT expired while it was offline (it cannot renew over
    NATS any more). It proves it holds its nkey seed by signing a fresh timestamp."""
    if authority is None:
        raise AppError("NATS runs in plain mode here: there are no NATS credentials to renew", 409)
    if abs(time.time() - body.issued_at) > PROOF_WINDOW_SECONDS:
        raise AppError(
            "issued_at is more than 5 minutes off the API's clock: check the agent host's clock", 401
        )
    agent = await session.get(Agent, body.agent_id, with_for_update=True)
    try:
        signature = base64.b64decode(body.signature, validate=True)
    except (binascii.Error, ValueError):
        signature = b""
    # one answer for an unknown agent, a plain-mode agent and a wrong key: nothing to enumerate
    if (
        agent is None
        or agent.nats_public_key is None
        or not nats_jwt.verify(agent.nats_public_key, renewal_proof(agent.id, body.issued_at), signature)
    ):
        raise AppError("the proof does not verify against any agent's NATS key", 401)
    issued = authority.issue(agent)  # 403 for a revoked agent
    log.info("nats.credentials_renewed_over_http", agent_id=agent.id)
    return NatsCredentialsIssued(jwt=issued.jwt, expires_at=issued.expires_at)
