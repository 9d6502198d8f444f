"""A whole-server job through the real processes: a PostgreSQL server with three matching databases
is backed up as three runs (one artifact and manifest each); a fourth database created afterwards is
in the next run; one of them restores into itself; the server's other databases are left alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Client, stack_logs, table_fingerprint
from tests.servers import PostgresServer

pytestmark = pytest.mark.e2e

DATABASES = ["ws_alpha", "ws_beta", "ws_gamma"]
LATER = "ws_delta"
EXCLUDED = "ws_alpha_tmp"  # matches the include pattern, and the exclude one


def make_database(pg: PostgresServer, name: str, rows: int) -> None:
    pg.psql("postgres", f"drop database if exists {name}")
    pg.psql("postgres", f"create database {name}")
    pg.psql(
        name,
        # names and counts are this test's constants
        "create table items (id serial primary key, label text not null, weight numeric(8,2));"  # noqa: S608
        f" insert into items (label, weight) select '{name} item ' || i, i * 1.5"
        f" from generate_series(1, {rows}) i;",
    )


def finished_batch(stack: Client, batch_id: str, size: int, timeout: float = 180) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs: list[dict[str, Any]] = stack.ok("GET", f"/v1/backups/history?batch_id={batch_id}")["items"]
        if len(runs) == size and all(r["status"] not in ("queued", "running") for r in runs):
            return sorted(runs, key=lambda r: r["database_name"])
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not finish\n{stack_logs(stack.stack.var)[-5000:]}")


def wait_for_restore(stack: Client, restore_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        restore: dict[str, Any] = stack.ok("GET", f"/v1/backups/restores/{restore_id}")
        if restore["status"] in ("completed", "failed"):
            return restore
        time.sleep(0.5)
    raise AssertionError(f"restore {restore_id} did not finish\n{stack_logs(stack.stack.var)[-5000:]}")


def test_whole_server_job_backs_up_each_database_and_picks_up_new_ones(
    stack: Client, postgres: PostgresServer, tmp_path: Path
) -> None:
    pg = postgres
    pg.psql("postgres", f"drop database if exists {LATER}")
    for i, name in enumerate(DATABASES):
        make_database(pg, name, rows=100 * (i + 1))
    make_database(pg, EXCLUDED, rows=5)
    make_database(pg, "unrelated_app", rows=5)  # another application's database on the same server

    agent = stack.ok("GET", "/v1/agents")[0]
    folder = tmp_path / "server-backups"
    folder.mkdir()
    server = stack.ok(
        "POST",
        "/v1/databases",
        {
            "name": "main-pg",
            "engine": "postgresql",
            "agent_id": agent["id"],
            "settings": {
                "host": pg.host,
                "port": pg.port,
                "user": pg.user,
                "database": "postgres",
                "password": pg.password,
            },
        },
    )
    storage = stack.ok(
        "POST",
        "/v1/storages",
        {"name": "server-disk", "kind": "local", "agent_id": agent["id"], "settings": {"path": str(folder)}},
    )
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {
            "name": "every-ws-database",
            "database_id": server["id"],
            "storage_id": storage["id"],
            "all_databases": True,
            "include_databases": ["ws_*"],
            "exclude_databases": ["*_tmp"],
            "retention": {"keep_last": 1},
        },
    )

    first = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    runs = finished_batch(stack, first["batch_id"], len(DATABASES))
    assert [r["database_name"] for r in runs] == DATABASES
    assert {r["status"] for r in runs} == {"completed"}, [r["error"] for r in runs]
    for run in runs:
        artifact = folder / run["storage_key"]
        manifest = json.loads((folder / run["manifest_key"]).read_text())
        assert artifact.is_file() and artifact.stat().st_size == run["artifact_size"]
        # each database has its own folder, artifact and manifest, with its own row count
        assert run["storage_key"].startswith(f"main-pg.{run['database_name']}/")
        assert manifest["run_id"] == run["id"] and manifest["artifact_sha256"] == run["artifact_sha256"]
        expected_rows = 100 * (DATABASES.index(run["database_name"]) + 1)
        assert manifest["tables"] == {"public.items": expected_rows}
    assert not any(EXCLUDED in str(p) or "unrelated_app" in str(p) for p in folder.rglob("*"))

    # a database created after the job was defined is part of the next run
    make_database(pg, LATER, rows=42)
    second = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    assert second["batch_id"] != first["batch_id"]
    rerun = finished_batch(stack, second["batch_id"], len(DATABASES) + 1)
    assert [r["database_name"] for r in rerun] == sorted([*DATABASES, LATER])
    assert {r["status"] for r in rerun} == {"completed"}, [r["error"] for r in rerun]

    # retention (keep_last=1) applies per database: each keeps its newest backup, loses the older one
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pruned = [stack.ok("GET", f"/v1/backups/history/{r['id']}")["pruned_at"] for r in runs]
        if all(pruned):
            break
        time.sleep(0.5)
    assert all(pruned), pruned
    assert all((folder / r["storage_key"]).is_file() for r in rerun)
    assert not any((folder / r["storage_key"]).exists() for r in runs)

    # one database of the server restores into itself; the others are untouched
    beta = next(r for r in rerun if r["database_name"] == "ws_beta")
    before = {name: table_fingerprint(pg, name) for name in ["ws_alpha", "ws_beta", "ws_gamma", LATER]}
    pg.psql("ws_beta", "delete from items where id % 2 = 0; update items set label = 'damaged'")
    restore = stack.ok("POST", f"/v1/backups/history/{beta['id']}/restore")
    done = wait_for_restore(stack, restore["id"])
    assert done["status"] == "completed", done["error"]
    after = {name: table_fingerprint(pg, name) for name in before}
    assert after == before
