from __future__ import annotations

import base64
import os
import subprocess
import sys

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from rahatback_api.db import create_engine, run_migrations
from rahatback_api.models import metadata
from sqlalchemy import Connection, inspect


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_produce_exactly_the_models(database_url: str) -> None:
    await run_migrations(database_url)
    await run_migrations(database_url)  # a second run at head is a no-op
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()
    assert {"organizations", "users", "backup_runs", "outbox_messages", "processed_messages"} <= tables
    assert "alembic_version" in tables


def test_cli_migrate_and_create_admin(database_url: str, tmp_path: object) -> None:
    env = {
        **os.environ,
        "RAHATBACK_DATABASE_URL": database_url,
        "RAHATBACK_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(),
        "RAHATBACK_ADMIN_PASSWORD": "a-long-enough-password",
    }
    cli = [sys.executable, "-c", "from rahatback_api.main import main; main()"]
    migrated = subprocess.run([*cli, "migrate"], env=env, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    created = subprocess.run(
        [*cli, "create-admin", "--email", "boss@example.com", "--org", "Acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stderr
    assert "rbt_" in created.stdout
    assert "a-long-enough-password" not in created.stdout + created.stderr

    again = subprocess.run(
        [*cli, "create-admin", "--email", "boss@example.com", "--org", "Acme"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_cli_refuses_to_serve_without_master_key() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAHATBACK_")}
    cli = [sys.executable, "-c", "from rahatback_api.main import main; main()"]
    r = subprocess.run([*cli, "serve", "--port", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "RAHATBACK_MASTER_KEY is not set" in r.stderr
