"""The HTTP API application and the `rahatback-api` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI
from rahatback_contracts.signing import decode_private_key
from rahatback_logging import configure_logging

from rahatback_api.agents.nats_identity import nats_identity_lifespan
from rahatback_api.agents.nats_identity import router as agent_credentials_router
from rahatback_api.agents.revocation import router as agent_revocation_router
from rahatback_api.agents.router import router as agents_router
from rahatback_api.audit.client import parse_trusted_proxies
from rahatback_api.audit.middleware import AuditMiddleware
from rahatback_api.audit.router import router as audit_router
from rahatback_api.auth.router import router as auth_router
from rahatback_api.auth.service import bootstrap_admin
from rahatback_api.backups.router import router as backups_router
from rahatback_api.context import APP_CONTEXT, AppContext
from rahatback_api.databases.router import router as databases_router
from rahatback_api.db import create_engine, create_sessionmaker, run_migrations, session_scope
from rahatback_api.errors import AppError, install_error_handlers
from rahatback_api.keys.router import router as keys_router
from rahatback_api.members.router import router as members_router
from rahatback_api.metrics import install_metrics
from rahatback_api.notifications.router import router as notifications_router
from rahatback_api.operations.lifespan import nats_lifespan
from rahatback_api.operations.router import router as operations_router
from rahatback_api.request_id import RequestIdMiddleware
from rahatback_api.security.secretbox import SecretBox
from rahatback_api.security.signing import CommandSigner, new_signing_key
from rahatback_api.settings import ConfigurationError, Settings
from rahatback_api.storages.router import router as storages_router
from rahatback_api.verification.router import router as verification_router

log = structlog.get_logger("rahatback_api")

health_router = APIRouter(tags=["health"])


@health_router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


# Every router of the API, in one place.
ROUTERS: list[APIRouter] = [
    health_router,
    auth_router,
    agents_router,
    agent_revocation_router,
    agent_credentials_router,
    databases_router,
    storages_router,
    backups_router,
    keys_router,
    operations_router,
    notifications_router,
    verification_router,
    members_router,
    audit_router,
]

# Extra lifespan steps (NATS connection, outbox relay, consumers), entered in order after the
# database is ready and exited in reverse before it closes. Each gets the app and may use app.state.
LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[None]]
LIFESPAN_HOOKS: list[LifespanHook] = [nats_lifespan, nats_identity_lifespan]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Raises ConfigurationError (e.g. no master key outside dev mode) before serving."""
    settings = settings or Settings()
    configure_logging(settings.log_format, settings.log_level)
    # Fails here, loudly, rather than on the first request that needs a secret.
    secretbox = SecretBox(
        settings.master_key_bytes(), settings.master_key_id, settings.old_master_key_bytes()
    )
    settings.check_notifier_public_key()
    command_signer = settings.command_signer()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.dev_mode:
            await run_migrations(settings.database_url)
        engine = create_engine(settings.database_url)
        app.state.engine = engine
        context = AppContext(
            secretbox, settings.notifier_public_key, settings.public_url, command_signer=command_signer
        )
        app.state.sessionmaker = create_sessionmaker(engine, {APP_CONTEXT: context})
        try:
            async with AsyncExitStack() as stack:
                for hook in LIFESPAN_HOOKS:
                    await stack.enter_async_context(hook(app))
                log.info("api started", dev_mode=settings.dev_mode)
                yield
        finally:
            await engine.dispose()
            log.info("api stopped")

    app = FastAPI(title="RahatBack API", version="0.1.0", lifespan=lifespan, docs_url="/docs")
    app.state.settings = settings
    app.state.secretbox = secretbox
    app.state.command_signer = command_signer
    app.state.outbox_wakeup = None  # an asyncio.Event the outbox relay may install
    install_error_handlers(app)
    app.state.trusted_proxies = parse_trusted_proxies(settings.trusted_proxies)
    app.add_middleware(AuditMiddleware, trusted_proxies=app.state.trusted_proxies)  # inside the request id
    app.add_middleware(RequestIdMiddleware)
    install_metrics(app)  # GET /metrics and the HTTP latency middleware
    for router in ROUTERS:
        app.include_router(router)
    return app


# --- command line -------------------------------------------------------------------------------


def _load_settings() -> Settings:
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    return settings


async def _create_admin(settings: Settings, email: str, password: str, org: str) -> None:
    if settings.dev_mode:
        await run_migrations(settings.database_url)
    engine = create_engine(settings.database_url)
    try:
        async with session_scope(create_sessionmaker(engine)) as session:
            user, organization, token = await bootstrap_admin(session, email, password, org)
    finally:
        await engine.dispose()
    print(f"created {user.email} as owner of {organization.name!r} (org id {organization.id})")
    print(f"API token (shown once, valid 30 days): {token}")


def _print_signing_key() -> None:
    key = new_signing_key()
    public = CommandSigner("c1", decode_private_key(key)).public_key_b64
    print(f"# public key (agents pin it at enrollment): {public}", file=sys.stderr)
    print(key)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="rahatback-api", description="RahatBack control-plane API")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    commands.add_parser("migrate", help="upgrade the database schema to the latest version")
    admin = commands.add_parser("create-admin", help="create an organization and its owner; prints a token")
    admin.add_argument("--email", required=True)
    admin.add_argument("--password", help="default: $RAHATBACK_ADMIN_PASSWORD, else asked for")
    admin.add_argument("--org", required=True, help="organization name")
    commands.add_parser(
        "command-signing-keygen",
        help="print a new RAHATBACK_COMMAND_SIGNING_KEY (agents enrolled under the old key must re-enroll)",
    )
    nats_setup = commands.add_parser(
        "nats-setup",
        help="create the NATS operator, accounts, service users and server config for JWT mode (once)",
    )
    nats_setup.add_argument("--out", type=Path, required=True, help="folder for keys, creds and config")
    nats_setup.add_argument(
        "--resolver-dir", default="/data/jwt", help="where nats-server keeps account JWTs (its own volume)"
    )
    args = parser.parse_args(argv)
    if args.command == "nats-setup":
        from rahatback_api.security.nats_setup import print_setup

        print_setup(args.out, args.resolver_dir)
        return
    if args.command == "command-signing-keygen":
        _print_signing_key()
        return

    try:
        settings = _load_settings()
        if args.command == "serve":
            app = create_app(settings)
            uvicorn.run(app, host=args.host, port=args.port, log_config=None, proxy_headers=True)
        elif args.command == "migrate":
            asyncio.run(run_migrations(settings.database_url))
            print("database schema is up to date")
        elif args.command == "create-admin":
            password = args.password or os.environ.get("RAHATBACK_ADMIN_PASSWORD") or getpass.getpass()
            asyncio.run(_create_admin(settings, args.email, password, args.org))
    except ConfigurationError as exc:
        print(f"rahatback-api: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except AppError as exc:
        print(f"rahatback-api: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
