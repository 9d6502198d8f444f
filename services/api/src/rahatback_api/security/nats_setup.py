"""`rahatback-api nats-setup --out DIR`: the operator, accounts, signing keys, service users and the
nats-server configuration for operator/JWT mode, created once.

Running it again creates only what is missing: existing keys are never rotated or overwritten (a
new account key would orphan every agent's JWT; a re-issued account JWT would drop revocations the
API pushed since). Layout of DIR (docs/nats-security.md says who holds what):

    keys/operator.nk            operator identity seed          offline, never on a server
    keys/account.nk             RAHATBACK account identity seed offline (signs the service users)
    keys/system-account.nk      system account identity seed    offline
    keys/operator-signing.nk    operator signing key            in api-signing.json (re-signs the account JWT)
    keys/agent-signing.nk       account's scoped agent key      in api-signing.json (mints agent JWTs)
    jwt/*.jwt                   operator, system account, account JWTs (public)
    creds/{api,scheduler,notifier,api-system}.creds   service users (0600)
    api-signing.json            what the API needs to mint agent JWTs and push revocations (0600)
    nats-auth.conf              include it from nats-server.conf (operator, resolver, preload)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rahatback_contracts import streams, subjects

from rahatback_api.security import nats_jwt
from rahatback_api.security.nats_jwt import NKey

ACCOUNT_NAME = "RAHATBACK"
SYSTEM_ACCOUNT_NAME = "SYS"
OPERATOR_NAME = "rahatback"
DEFAULT_RESOLVER_DIR = "/data/jwt"
SERVICE_INBOX = {"api": "_INBOX.api", "scheduler": "_INBOX.scheduler", "notifier": "_INBOX.notifier"}


def _kv_stream(spec: streams.KeyValueSpec) -> str:
    return f"KV_{spec.bucket}"


def _stream_admin(stream: str) -> list[str]:
    """Look up a stream and create it if missing (what `create_stream_if_missing` does)."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}"]


def _kv_reader_writer(spec: streams.KeyValueSpec) -> list[str]:
    stream = _kv_stream(spec)
    return [
        *_stream_admin(stream),
        f"$KV.{spec.bucket}.>",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
    ]


def service_permissions() -> dict[str, dict[str, Any]]:
    """Least privilege for the backend services (a `user_claims` keyword set per service)."""
    commands = list(streams.AGENT_COMMANDS.subjects)
    events = list(streams.EVENT_TYPES)
    agent_owned = [subjects.ALL_REPORTS, subjects.ALL_HEARTBEATS, subjects.ALL_PROGRESS]
    # the scheduler watches SCHEDULES with an ordered (ephemeral) consumer
    schedules = _kv_stream(streams.SCHEDULES)
    notifier = streams.NOTIFIER_EVENTS_CONSUMER
    return {
        # The API administers JetStream (streams, every agent's consumer, buckets), sends commands,
        # RPCs and events, answers credential renewals; it can never speak as an agent.
        "api": {
            "pub_allow": [
                "$JS.API.>",
                f"$JS.ACK.{streams.AGENT_REPORTS.name}.>",
                f"$JS.ACK.{streams.CONTROL.name}.>",
                f"$KV.{streams.SCHEDULES.bucket}.>",
                *commands,
                "agent.*.rpc.>",
                *events,
            ],
            "pub_deny": agent_owned,
            "sub_allow": [
                subjects.ALL_HEARTBEATS,
                subjects.ALL_PROGRESS,
                subjects.ALL_CREDENTIAL_RENEWALS,
                f"{SERVICE_INBOX['api']}.>",
                *events,
            ],
            "responses": {"max": 1, "ttl": 0},
        },
        # The scheduler reads schedules, keeps its own state and asks for runs; nothing else.
        "scheduler": {
            "pub_allow": [
                subjects.BACKUP_REQUESTED,
                subjects.VERIFY_REQUESTED,
                "$JS.API.INFO",
                *_stream_admin(streams.CONTROL.name),
                *_kv_reader_writer(streams.SCHEDULES),
                *_kv_reader_writer(streams.SCHEDULER_STATE),
                f"$JS.API.CONSUMER.CREATE.{schedules}",
                f"$JS.API.CONSUMER.CREATE.{schedules}.>",
                f"$JS.API.CONSUMER.DELETE.{schedules}.>",
                f"$JS.API.CONSUMER.INFO.{schedules}.>",
                f"$JS.FC.{schedules}.>",
            ],
            "pub_deny": [f"$KV.{streams.SCHEDULES.bucket}.>"],  # reads schedules, never writes them
            "sub_allow": [f"{SERVICE_INBOX['scheduler']}.>"],
        },
        # The notifier consumes committed events and dead-letters what it cannot deliver.
        "notifier": {
            "pub_allow": [
                subjects.NOTIFICATION_DEAD_LETTER,
                "$JS.API.INFO",
                *_stream_admin(streams.EVENTS.name),
                *_stream_admin(streams.DEAD_LETTERS.name),
                *_kv_reader_writer(streams.NOTIFICATIONS_SENT),
                f"$JS.API.CONSUMER.INFO.{notifier.stream}.{notifier.durable}",
                f"$JS.API.CONSUMER.CREATE.{notifier.stream}.{notifier.durable}",
                f"$JS.API.CONSUMER.CREATE.{notifier.stream}.{notifier.durable}.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{notifier.stream}.{notifier.durable}",
                f"$JS.API.CONSUMER.MSG.NEXT.{notifier.stream}.{notifier.durable}",
                f"$JS.ACK.{notifier.stream}.{notifier.durable}.>",
            ],
            "sub_allow": [f"{SERVICE_INBOX['notifier']}.>"],
        },
    }


# the system-account user the API uses to push account JWT updates (revocations), nothing more: its
# replies come on its own inbox prefix, never on every inbox of the SYS account
API_SYSTEM_INBOX = "_INBOX.api-system"
API_SYSTEM_PERMISSIONS: dict[str, Any] = {
    "pub_allow": ["$SYS.REQ.CLAIMS.UPDATE", "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE"],
    "sub_allow": [f"{API_SYSTEM_INBOX}.>"],
}


def _write_private(path: Path, text: str) -> None:
    """0600 from the first byte; never replaces an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


class SetupError(RuntimeError):
    """What is missing to complete the setup; the message says what to put back."""


class _OfflineKey:
    """A seed moved offline after the first setup: never replaced by a new one (that would be a
    rotation), only needed if something it signs has to be re-created."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        raise SetupError(
            f"{self.path} is missing (moved offline?): put it back to re-create what it signs; "
            "this command never replaces a key"
        )


def _key(out: Path, name: str, kind: nats_jwt.KeyKind, created: list[str]) -> NKey:
    path = out / "keys" / f"{name}.nk"
    if path.exists():
        return nats_jwt.nkey_from_seed(path.read_text(), kind)
    if (out / "jwt" / "operator.jwt").exists():  # set up before: a missing seed is offline, not new
        offline: Any = _OfflineKey(path)
        return offline  # type: ignore[no-any-return]
    key = nats_jwt.new_nkey(kind)
    _write_private(path, key.seed + "\n")
    created.append(str(path.relative_to(out)))
    return key


def _once(out: Path, relative: str, make: Any, created: list[str], private: bool = False) -> str:
    path = out / relative
    if path.exists():
        return path.read_text().strip()
    text: str = make()
    if private:
        _write_private(path, text + "\n")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    created.append(relative)
    return text


def account_base_claims(agent_signing_public: str) -> dict[str, Any]:
    return nats_jwt.account_claims(jetstream=True, signing_keys=[nats_jwt.agent_scope(agent_signing_public)])


def setup(out: Path, resolver_dir: str = DEFAULT_RESOLVER_DIR) -> list[str]:
    """Create what is missing under `out`; return the paths created (empty on a re-run)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    created: list[str] = []
    operator = _key(out, "operator", "operator", created)
    operator_signing = _key(out, "operator-signing", "operator", created)
    system_account = _key(out, "system-account", "account", created)
    account = _key(out, "account", "account", created)
    agent_signing = _key(out, "agent-signing", "account", created)

    operator_jwt = _once(
        out,
        "jwt/operator.jwt",
        lambda: nats_jwt.encode(
            subject=operator.public,
            name=OPERATOR_NAME,
            nats=nats_jwt.operator_claims(system_account.public, [operator_signing.public]),
            signer=operator,
        ),
        created,
    )
    system_jwt = _once(
        out,
        "jwt/system-account.jwt",
        lambda: nats_jwt.encode(
            subject=system_account.public,
            name=SYSTEM_ACCOUNT_NAME,
            nats=nats_jwt.account_claims(jetstream=False, signing_keys=[]),
            signer=operator_signing,
        ),
        created,
    )
    base_claims = account_base_claims(agent_signing.public)
    account_jwt = _once(
        out,
        "jwt/account.jwt",
        lambda: nats_jwt.encode(
            subject=account.public, name=ACCOUNT_NAME, nats=base_claims, signer=operator_signing
        ),
        created,
    )

    for service, permissions in service_permissions().items():
        _once(
            out,
            f"creds/{service}.creds",
            lambda service=service, permissions=permissions: _user_creds(
                f"rahatback-{service}", account, nats_jwt.user_claims(**permissions)
            ),
            created,
            private=True,
        )
    _once(
        out,
        "creds/api-system.creds",
        lambda: _user_creds(
            "rahatback-api-system", system_account, nats_jwt.user_claims(**API_SYSTEM_PERMISSIONS)
        ),
        created,
        private=True,
    )
    _once(
        out,
        "api-signing.json",
        lambda: json.dumps(
            {
                "account_name": ACCOUNT_NAME,
                "account_public_key": account.public,
                "account_claims": base_claims,
                "operator_signing_seed": operator_signing.seed,
                "agent_signing_seed": agent_signing.seed,
            },
            indent=2,
        ),
        created,
        private=True,
    )
    _once(
        out,
        "nats-auth.conf",
        lambda: _server_auth_config(
            operator_jwt,
            system_account.public,
            {system_account.public: system_jwt, account.public: account_jwt},
            resolver_dir,
        ),
        created,
    )
    return created


def _user_creds(name: str, account: NKey, claims: dict[str, Any]) -> str:
    user = nats_jwt.new_nkey("user")
    token = nats_jwt.encode(subject=user.public, name=name, nats=claims, signer=account)
    return nats_jwt.creds(token, user.seed).rstrip("\n")


def _server_auth_config(
    operator_jwt: str, system_account: str, preload: dict[str, str], resolver_dir: str
) -> str:
    lines = [
        "# written by `rahatback-api nats-setup`; include it from nats-server.conf",
        f"operator: {operator_jwt}",
        f"system_account: {system_account}",
        "resolver: {",
        "  type: full",
        f"  dir: {json.dumps(resolver_dir)}",
        "  allow_delete: false",
        '  interval: "2m"',
        "}",
        "resolver_preload: {",
        *(f"  {account}: {jwt}" for account, jwt in preload.items()),
        "}",
    ]
    return "\n".join(lines)


def print_setup(out: Path, resolver_dir: str) -> None:
    try:
        created = setup(out, resolver_dir)
    except SetupError as exc:
        raise SystemExit(f"rahatback-api nats-setup: {exc}") from None
    if not created:
        print(f"{out}: already set up; nothing changed (keys are never rotated by this command)")
        return
    print(f"created in {out}:")
    for path in created:
        print(f"  {path}")
    print(
        "next: include nats-auth.conf from nats-server.conf; give the API creds/api.creds, "
        "creds/api-system.creds and api-signing.json, the scheduler and notifier their creds; "
        "move keys/operator.nk, keys/account.nk and keys/system-account.nk offline "
        "(docs/nats-security.md)"
    )
