from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from rahatback_api.db import create_engine, run_migrations
from rahatback_api.models import metadata
from sqlalchemy import Connection, inspect, text


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


async def test_upgrading_a_core_flows_database_keeps_its_history_restorable(tmp_path: Path) -> None:
    """0001 → head on data written by the first release: each completed run gets its copy, each
    job its last success and its dead-man clock."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await run_migrations(url, "0001")
    engine = create_engine(url)
    now = "2026-11-20 03:00:00.000000"
    try:
        async with engine.begin() as conn:
            for statement in (
                "INSERT INTO organizations (id, name, created_at) VALUES ('o1', 'Acme', :now)",
                "INSERT INTO databases (id, org_id, name, engine, settings, created_at, updated_at)"
                " VALUES ('d1', 'o1', 'shop', 'sqlite', '{}', :now, :now)",
                "INSERT INTO storages (id, org_id, name, kind, settings, created_at, updated_at)"
                " VALUES ('s1', 'o1', 'nas', 'local', '{}', :now, :now)",
                "INSERT INTO backup_jobs (id, org_id, name, database_id, storage_id, compression,"
                " encryption_enabled, key_id, cron, timezone, enabled, created_at, updated_at)"
                " VALUES ('j1', 'o1', 'nightly', 'd1', 's1', 'zstd', 1, 'j1:1', '0 3 * * *', 'UTC', 1,"
                " :now, :now)",
                "INSERT INTO backup_runs (id, org_id, job_id, database_id, storage_id, trigger, status,"
                " queued_at, finished_at, storage_key, manifest_key, encrypted)"
                " VALUES ('r1', 'o1', 'j1', 'd1', 's1', 'schedule', 'completed', :now, :now,"
                " 'shop/r1.rbk', 'shop/r1.rbk.manifest.json', 1)",
                "INSERT INTO backup_runs (id, org_id, job_id, database_id, storage_id, trigger, status,"
                " queued_at, encrypted) VALUES ('r2', 'o1', 'j1', 'd1', 's1', 'manual', 'failed', :now,"
                " 1)",
            ):
                await conn.execute(text(statement), {"now": now})
        await run_migrations(url)
        async with engine.connect() as conn:
            copies = (
                await conn.execute(text("SELECT run_id, storage_id, status, storage_key FROM backup_copies"))
            ).all()
            job = (
                await conn.execute(
                    text("SELECT last_success_at, schedule_set_at, extra_storage_ids FROM backup_jobs")
                )
            ).one()
    finally:
        await engine.dispose()
    assert [tuple(c) for c in copies] == [("r1", "s1", "completed", "shop/r1.rbk")]
    assert job[0] is not None and str(job[0]).startswith("2026-11-20 03:00")
    assert job[1] is not None and job[2] == "[]"
