"""NATS JWTs (v2 claims) signed with nkeys: operator, accounts, users, and the permission template
that confines every agent to its own subjects.

The layout follows nats-io/jwt v2: a JWT is `base64url(header).base64url(claims).base64url(sig)`,
header `{"typ": "JWT", "alg": "ed25519-nkey"}`, the ed25519 signature over the first two parts, the
claims' `jti` a base32 SHA-512/256 of the claims with an empty `jti`, and everything NATS-specific
under `nats` with `type` and `version: 2`. See docs/nats-security.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import nkeys  # type: ignore[import-untyped]
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rahatback_contracts import streams

KeyKind = Literal["operator", "account", "user"]

_PREFIX: dict[KeyKind, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_PUBLIC_FIRST_LETTER: dict[KeyKind, str] = {"operator": "O", "account": "A", "user": "U"}

# Replaced by the server with the user JWT's `name`, which the API sets to the agent id.
AGENT = "{{name()}}"
AGENT_SCOPE_ROLE = "agent"
# an agent answers each RPC request once, within the server's default response window (2 min)
AGENT_RESPONSES: dict[str, int] = {"max": 1, "ttl": 0}


class NatsJwtError(ValueError):
    """A key or token is malformed; the message says which."""


@dataclass(frozen=True)
class NKey:
    """An nkey seed (`S…`) and its public key (`O…`, `A…` or `U…`). Only `public` may be shared."""

    seed: str
    public: str

    def __repr__(self) -> str:  # seeds stay out of tracebacks and logs
        return f"NKey(public={self.public!r})"

    __str__ = __repr__

    def sign(self, data: bytes) -> bytes:
        signature: bytes = nkeys.from_seed(self.seed.encode()).sign(data)
        return signature


def new_nkey(kind: KeyKind) -> NKey:
    seed = nkeys.encode_seed(os.urandom(32), _PREFIX[kind]).decode()
    return nkey_from_seed(seed, kind)


def nkey_from_seed(seed: str, kind: KeyKind) -> NKey:
    try:
        public = nkeys.from_seed(seed.strip().encode()).public_key.decode()
    except Exception as exc:  # nkeys raises several error types (and binascii ones) for bad seeds
        raise NatsJwtError(f"not a valid {kind} nkey seed") from exc
    if not public.startswith(_PUBLIC_FIRST_LETTER[kind]):
        raise NatsJwtError(f"the seed is not a {kind} nkey (its public key starts with {public[0]!r})")
    return NKey(seed=seed.strip(), public=public)


def check_public_key(public: str, kind: KeyKind) -> str:
    """A public nkey of `kind` (checksum verified), as sent by an agent at enrollment."""
    public = public.strip()
    if not public.startswith(_PUBLIC_FIRST_LETTER[kind]) or len(public) != 56:
        raise NatsJwtError(f"not a NATS {kind} public key")
    try:
        raw = base64.b32decode(public)
    except ValueError as exc:
        raise NatsJwtError(f"not a NATS {kind} public key") from exc
    body, checksum = raw[:-2], raw[-2:]
    if nkeys.crc16(bytearray(body)).to_bytes(2, "little") != checksum or body[0] != _PREFIX[kind]:
        raise NatsJwtError(f"not a NATS {kind} public key (bad checksum)")
    return public


def verify(public: str, data: bytes, signature: bytes, kind: KeyKind = "user") -> bool:
    """Whether `signature` is the ed25519 signature of `data` by the nkey `public`."""
    raw = base64.b32decode(check_public_key(public, kind))[1:-2]
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_HEADER = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}, separators=(",", ":")).encode())


def encode(
    *,
    subject: str,
    name: str,
    nats: dict[str, Any],
    signer: NKey,
    expires_at: int | None = None,
    issued_at: int | None = None,
) -> str:
    """Sign claims; `nats` must already carry its `type`."""
    claims: dict[str, Any] = {}
    if expires_at is not None:
        claims["exp"] = expires_at
    claims["iat"] = issued_at if issued_at is not None else int(time.time())
    claims["iss"] = signer.public
    claims["name"] = name
    claims["sub"] = subject
    # jti as nats-io/jwt computes it: over the standard claims without the jti itself
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    claims["nats"] = {**nats, "version": 2}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    to_sign = f"{_HEADER}.{payload}"
    return f"{to_sign}.{_b64(signer.sign(to_sign.encode()))}"


def decode_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (the server verifies; this only reads what we issued)."""
    try:
        _, payload, _ = token.split(".")
        claims: dict[str, Any] = json.loads(_unb64(payload))
    except ValueError as exc:
        raise NatsJwtError("not a NATS JWT") from exc
    return claims


def creds(jwt: str, seed: str) -> str:
    """The `.creds` file format nats clients read (`user_credentials=`)."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


# ------------------------------------------------------------------------------------- claims


def operator_claims(system_account: str, signing_keys: list[str]) -> dict[str, Any]:
    return {"type": "operator", "system_account": system_account, "signing_keys": signing_keys}


UNLIMITED_NATS = {"subs": -1, "data": -1, "payload": -1}
UNLIMITED_ACCOUNT = {"imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1}
# JetStream is enabled for an account whose limits give it storage (nats-io/jwt IsJSEnabled)
UNLIMITED_JETSTREAM = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def account_claims(
    *,
    jetstream: bool,
    signing_keys: list[str | dict[str, Any]],
    revocations: dict[str, int] | None = None,
) -> dict[str, Any]:
    limits: dict[str, Any] = {**UNLIMITED_NATS, **UNLIMITED_ACCOUNT}
    if jetstream:
        limits.update(UNLIMITED_JETSTREAM)
    claims: dict[str, Any] = {"type": "account", "limits": limits, "signing_keys": signing_keys}
    if revocations:
        claims["revocations"] = dict(sorted(revocations.items()))
    return claims


def user_claims(
    *,
    issuer_account: str | None = None,
    pub_allow: list[str] | None = None,
    pub_deny: list[str] | None = None,
    sub_allow: list[str] | None = None,
    sub_deny: list[str] | None = None,
    responses: dict[str, int] | None = None,
) -> dict[str, Any]:
    """A user's `nats` claims. A user issued by a scoped signing key carries no permissions or
    limits of its own (the server refuses it otherwise): call this with only `issuer_account`."""
    claims: dict[str, Any] = {"type": "user"}
    if issuer_account is not None:
        claims["issuer_account"] = issuer_account
    permissions = _permissions(pub_allow, pub_deny, sub_allow, sub_deny, responses)
    if permissions:
        claims.update(permissions)
        claims.update(UNLIMITED_NATS)
    return claims


def _permissions(
    pub_allow: list[str] | None,
    pub_deny: list[str] | None,
    sub_allow: list[str] | None,
    sub_deny: list[str] | None,
    responses: dict[str, int] | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, allow, deny in (("pub", pub_allow, pub_deny), ("sub", sub_allow, sub_deny)):
        entry: dict[str, list[str]] = {}
        if allow:
            entry["allow"] = list(allow)
        if deny:
            entry["deny"] = list(deny)
        if entry:
            result[key] = entry
    if responses is not None:
        result["resp"] = responses
    return result


def agent_permissions(agent: str = AGENT) -> dict[str, Any]:
    """What an agent may do, for the agent `agent` (by default the server-side template).

    Publish: its own reports, progress, heartbeat and credential renewals, and the two JetStream
    subjects of its own command consumer: next-message requests and acks (`$JS.ACK.<stream>.<durable>.>`
    also carries nak, in-progress and term). Subscribe: its own RPC subjects and its own inbox,
    where the replies to its requests and JetStream publishes and the fetched commands arrive.
    Respond once to each request it received (the RPCs). Nothing else: no `$JS.API.>` beyond the
    next-message subject, no other agent's subjects, no `_INBOX.>`.
    """
    spec = streams.agent_commands_consumer("0" * 32)
    durable = spec.durable.replace("0" * 32, agent)
    stream = spec.stream
    return _permissions(
        pub_allow=[
            f"agent.{agent}.report.>",
            f"agent.{agent}.progress",
            f"agent.{agent}.heartbeat",
            f"agent.{agent}.credentials.renew",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
        ],
        pub_deny=None,
        sub_allow=[f"agent.{agent}.rpc.>", f"_INBOX.{agent}.>"],
        sub_deny=None,
        responses=AGENT_RESPONSES,
    )


def agent_scope(signing_key: str) -> dict[str, Any]:
    """The account's scoped signing key for agents: every user it signs gets `agent_permissions`."""
    return {
        "kind": "user_scope",
        "key": signing_key,
        "role": AGENT_SCOPE_ROLE,
        "template": {**agent_permissions(), **UNLIMITED_NATS},
    }


def agent_user_jwt(
    *,
    agent_id: str,
    user_public_key: str,
    account_public_key: str,
    signing_key: NKey,
    expires_at: int,
    issued_at: int | None = None,
) -> str:
    """The user JWT of one agent: name = agent id (the template's `{{name()}}`), no permissions of
    its own (they come from the scoped signing key), a short expiry."""
    return encode(
        subject=check_public_key(user_public_key, "user"),
        name=agent_id,
        nats=user_claims(issuer_account=account_public_key),
        signer=signing_key,
        expires_at=expires_at,
        issued_at=issued_at,
    )
