"""3-2-1 through the real stack: one job writes a local folder, an S3 bucket (moto_server) and a
Google Drive folder (the local fake) from one dump; a failing target makes the run partial only."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent.fake_drive import FakeDrive
from tests.e2e.conftest import Client, stack_logs
from tests.servers import MotoServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def drive() -> Iterator[FakeDrive]:
    fake = FakeDrive().start()
    yield fake
    fake.stop()


def wait_for(stack: Client, path: str, done: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item: dict[str, Any] = stack.ok("GET", path)
        if item["status"] in done:
            return item
        time.sleep(0.5)
    raise AssertionError(f"{path} never reached {done}\n{stack_logs(stack.stack.var)[-5000:]}")


def rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("select id, body from t order by id").fetchall()


def test_one_dump_three_copies_and_a_failing_target_makes_the_run_partial(
    stack: Client, s3_server: MotoServer, drive: FakeDrive, tmp_path: Path
) -> None:
    source = tmp_path / "shop.db"
    with sqlite3.connect(source) as conn:
        conn.execute("create table t (id integer primary key, body text)")
        conn.executemany("insert into t (body) values (?)", [(f"row {i} " * 20,) for i in range(2000)])
    (tmp_path / "folder").mkdir()
    agent = stack.ok("GET", "/v1/agents")[0]
    bucket = s3_server.create_bucket()
    s3_settings = {
        "bucket": bucket,
        "endpoint_url": s3_server.url,
        "region": s3_server.region,
        "path_style": True,
        "access_key_id": s3_server.access_key_id,
        "secret_access_key": s3_server.secret_access_key,
    }
    drive_settings = {
        "folder_id": drive.add_folder("Backups"),
        "api_endpoint": drive.api_endpoint,
        "service_account_json": json.dumps(drive.add_service_account("agent@tests.iam.gserviceaccount.com")),
    }
    ids = {}
    for name, kind, settings in (
        ("folder", "local", {"path": str(tmp_path / "folder")}),
        ("bucket", "s3", s3_settings),
        ("drive", "gdrive", drive_settings),
    ):
        body = {"name": f"{name}-{bucket}", "kind": kind, "agent_id": agent["id"], "settings": settings}
        ids[name] = stack.ok("POST", "/v1/storages", body)["id"]
    db = stack.ok(
        "POST",
        "/v1/databases",
        {
            "name": f"shop-{bucket}",
            "engine": "sqlite",
            "agent_id": agent["id"],
            "settings": {"path": str(source)},
        },
    )
    job = stack.ok(
        "POST",
        "/v1/backups/jobs",
        {
            "name": f"321-{bucket}",
            "database_id": db["id"],
            "storage_id": ids["folder"],
            "extra_storage_ids": [ids["bucket"], ids["drive"]],
        },
    )

    first = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    run = wait_for(stack, f"/v1/backups/history/{first['id']}", {"completed", "partial", "failed"})
    assert run["status"] == "completed", run
    copies = {c["storage_id"]: c for c in run["copies"]}
    assert {k: copies[v]["status"] for k, v in ids.items()} == dict.fromkeys(ids, "completed")
    # three identical artifacts: same bytes in the folder and the bucket (and Drive, restored below)
    local = (tmp_path / "folder" / copies[ids["folder"]]["storage_key"]).read_bytes()
    in_bucket = (
        s3_server.client().get_object(Bucket=bucket, Key=copies[ids["bucket"]]["storage_key"])["Body"].read()
    )
    assert local == in_bucket and len(local) == run["artifact_size"]

    for name in ("drive", "bucket"):
        target = stack.ok(
            "POST",
            "/v1/databases",
            {
                "name": f"copy-{name}-{bucket}",
                "engine": "sqlite",
                "agent_id": agent["id"],
                "settings": {"path": str(tmp_path / f"from-{name}.db")},
            },
        )
        restore = stack.ok(
            "POST",
            f"/v1/backups/history/{run['id']}/restore",
            {"database_id": target["id"], "storage_id": ids[name]},
        )
        assert restore["storage_id"] == ids[name]
        done = wait_for(stack, f"/v1/backups/restores/{restore['id']}", {"completed", "failed"})
        assert done["status"] == "completed", done
        assert rows(tmp_path / f"from-{name}.db") == rows(source)

    # the bucket's key is revoked: only that copy fails, nothing is left in the bucket for this run
    stack.ok(
        "PATCH", f"/v1/storages/{ids['bucket']}", {"settings": {**s3_settings, "secret_access_key": "x" * 40}}
    )
    second = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    second = wait_for(stack, f"/v1/backups/history/{second['id']}", {"completed", "partial", "failed"})
    assert second["status"] == "partial", second
    copies = {c["storage_id"]: c for c in second["copies"]}
    assert copies[ids["bucket"]]["status"] == "failed" and copies[ids["folder"]]["status"] == "completed"
    assert copies[ids["drive"]]["status"] == "completed"
    listed = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert not [o for o in listed if second["id"] in o["Key"]]
    assert s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
