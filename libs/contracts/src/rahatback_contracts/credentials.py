"""An agent's NATS credential renewal (operator/JWT mode, docs/nats-security.md).

The agent asks on `agent.<id>.credentials.renew` (request/reply); only it may publish there, so the
subject names who asks. The API answers with a new user JWT for the agent's registered nkey, or
refuses (revoked, not enrolled in JWT mode).
"""

from __future__ import annotations

from pydantic import AwareDatetime

from .messages import Message


def renewal_proof(agent_id: str, issued_at: int) -> bytes:
    """What an agent whose JWT expired signs with its nkey seed to get a new one over HTTP
    (`POST /v1/agents/nats-credentials`): the API checks it against the agent's registered key."""
    return f"rahatback-nats-renew:{agent_id}:{issued_at}".encode()


class CredentialsRenewRequest(Message):
    agent_id: str


class CredentialsRenewReply(Message):
    jwt: str | None = None
    expires_at: AwareDatetime | None = None
    # set when the API refuses; says why ("this agent was revoked", …)
    error: str | None = None
