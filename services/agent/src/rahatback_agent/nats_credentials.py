"""The agent's NATS identity in operator/JWT mode (docs/nats-security.md).

At enrollment the agent generates an nkey user seed, sends only its public key, and stores the seed
with the user JWT the API minted in agent.json (0600). It connects by signing the server's nonce with
the seed, and renews the JWT at half-life by asking the API on its own subject
(`agent.<id>.credentials.renew`), then reconnects with the new one. A control plane in plain mode
mints no JWT; such an agent has neither and connects as before.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nkeys  # type: ignore[import-untyped]
import structlog
from nats.aio.client import Client as NATS
from rahatback_contracts import subjects
from rahatback_contracts.credentials import CredentialsRenewReply, CredentialsRenewRequest, renewal_proof

from .identity import AgentIdentity, save_identity

log = structlog.get_logger("rahatback_agent.nats_credentials")

# renew once this fraction of the JWT's lifetime is left; retry failures this often
RENEW_AT_REMAINING = 0.5
RETRY_SECONDS = 30.0


class CredentialsRefused(RuntimeError):
    """The API would not issue new NATS credentials; the message carries its reason and
    `status_code` its HTTP status (401/403: this agent is unknown or revoked, for good)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class UserNKey:
    seed: str
    public: str

    def __repr__(self) -> str:
        return f"UserNKey(public={self.public!r})"


def new_user_nkey() -> UserNKey:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return UserNKey(seed=seed.decode(), public=nkeys.from_seed(seed).public_key.decode())


def jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def jwt_window(token: str) -> tuple[datetime, datetime]:
    """(issued at, expires at) of a user JWT."""
    claims = jwt_claims(token)
    issued = datetime.fromtimestamp(int(claims["iat"]), UTC)
    expires = datetime.fromtimestamp(int(claims.get("exp") or 0), UTC) if claims.get("exp") else datetime.max
    return issued, expires.replace(tzinfo=UTC)


class NatsCredentials:
    """The seed and the current JWT; the JWT changes on renewal (and is saved to agent.json)."""

    def __init__(self, identity: AgentIdentity, config_path: Path) -> None:
        assert identity.nats_seed is not None and identity.nats_jwt is not None
        self._identity = identity
        self._config_path = config_path
        self._keypair = nkeys.from_seed(identity.nats_seed.encode())
        self.jwt = identity.nats_jwt
        self.agent_id = identity.agent_id

    @classmethod
    def for_identity(cls, identity: AgentIdentity, config_path: Path) -> NatsCredentials | None:
        if identity.nats_seed is None or identity.nats_jwt is None:
            return None  # enrolled with a control plane that runs NATS in plain mode
        return cls(identity, config_path)

    def __repr__(self) -> str:
        return f"NatsCredentials(agent_id={self.agent_id!r})"

    def _store(self, jwt: str) -> None:
        self.jwt = jwt
        self._identity = self._identity.model_copy(update={"nats_jwt": jwt})
        save_identity(self._identity, self._config_path, force=True)

    @property
    def expires_at(self) -> datetime:
        return jwt_window(self.jwt)[1]

    def expired(self, now: datetime | None = None) -> bool:
        return (now or datetime.now(UTC)) >= self.expires_at

    def connect_options(self, on_closed: Callable[[], None]) -> dict[str, Any]:
        """`nats.connect` keywords: the JWT is read at every (re)connect, so a renewed one is used
        from the next connection on; `on_closed` runs when the server closes us for good
        (revoked or expired credentials: nats-py does not reconnect after those)."""

        def user_jwt() -> bytes:
            return self.jwt.encode()

        def sign(nonce: str) -> bytes:
            signature: bytes = self._keypair.sign(nonce.encode())
            return base64.b64encode(signature)

        async def closed() -> None:
            on_closed()

        return {"user_jwt_cb": user_jwt, "signature_cb": sign, "closed_cb": closed}

    def next_renewal(self, now: datetime | None = None) -> float:
        """Seconds until the JWT should be renewed (0 = now)."""
        issued, expires = jwt_window(self.jwt)
        renew_at = expires - (expires - issued) * RENEW_AT_REMAINING
        return max(0.0, (renew_at - (now or datetime.now(UTC))).total_seconds())

    async def renew(self, nc: NATS, timeout: float = 10.0) -> bool:  # noqa: ASYNC109 - passed to NATS
        """Ask the API for a new JWT; on success store it and reconnect with it. False on refusal."""
        request = CredentialsRenewRequest(agent_id=self.agent_id)
        msg = await nc.request(
            subjects.agent_credentials_renew(self.agent_id), request.to_bytes(), timeout=timeout
        )
        reply = CredentialsRenewReply.from_bytes(msg.data)
        if reply.jwt is None:
            log.error("nats credentials renewal refused", agent_id=self.agent_id, reason=reply.error)
            return False
        self._store(reply.jwt)
        log.info("nats credentials renewed", agent_id=self.agent_id, expires_at=self.expires_at.isoformat())
        await nc.force_reconnect()  # the server holds the old JWT's expiry until we reconnect
        return True

    async def renew_over_http(self, api_url: str, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """After the JWT expired (the agent was offline too long to renew over NATS): prove to the
        API that we hold the seed by signing a fresh timestamp, and store the JWT it returns."""
        issued_at = int(time.time())
        signature = base64.b64encode(self._keypair.sign(renewal_proof(self.agent_id, issued_at))).decode()
        body = {"agent_id": self.agent_id, "issued_at": issued_at, "signature": signature}
        async with httpx.AsyncClient(base_url=api_url, timeout=30.0, transport=transport) as client:
            response = await client.post("/v1/agents/nats-credentials", json=body)
        if response.status_code != 200:
            raise CredentialsRefused(
                f"the API refused new NATS credentials ({response.status_code}): {response.text[:300]}",
                response.status_code,
            )
        self._store(response.json()["jwt"])
        log.info(
            "nats credentials renewed over http",
            agent_id=self.agent_id,
            expires_at=self.expires_at.isoformat(),
        )

    async def renew_loop(self, nc: NATS, closing: asyncio.Event) -> None:
        while not closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), self.next_renewal())
                return
            try:
                if not await self.renew(nc):
                    return  # refused (revoked): the server closes us when the revocation lands
            except Exception as exc:
                log.warning(
                    "nats credentials not renewed yet; retrying",
                    error=str(exc) or type(exc).__name__,
                    expires_at=self.expires_at.isoformat(),
                    retry_in=RETRY_SECONDS,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), RETRY_SECONDS)
