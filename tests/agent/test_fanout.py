"""One dump, several storages: local folder + S3 (moto_server) + Google Drive (the local fake).

Driven through `jobs.run_backup`/`run_restore` exactly as the supervisor runs them, with secrets
sealed to the agent the way the API seals them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_agent import jobs
from rahatback_agent.identity import public_key_b64
from rahatback_agent.storages.registry import get_storage
from rahatback_contracts import messages as m
from rahatback_contracts.sealing import seal

from tests.agent.fake_drive import FakeDrive
from tests.servers import MotoServer

AGENT = uuid.uuid4().hex
KEY = X25519PrivateKey.generate()
JOB_KEY = bytes(range(32))


@pytest.fixture
def drive() -> Iterator[FakeDrive]:
    fake = FakeDrive().start()
    yield fake
    fake.stop()


def envelope() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "command_id": uuid.uuid4().hex,
        "org_id": "o",
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
    }


def target(
    name: str, kind: str, settings: dict[str, Any], secrets: dict[str, Any], info: str
) -> m.StorageTarget:
    sealed = seal(public_key_b64(KEY), secrets, info) if secrets else None
    return m.StorageTarget(storage_id=name, name=name, kind=kind, settings=settings, secrets=sealed)  # type: ignore[arg-type]


class Targets:
    def __init__(self, tmp_path: Path, s3: MotoServer, drive: FakeDrive) -> None:
        self.folder = tmp_path / "backups"
        self.folder.mkdir()
        self.s3, self.bucket = s3, s3.create_bucket()
        self.drive, self.root = drive, drive.add_folder("RahatBack")
        self.sa = json.dumps(drive.add_service_account("agent@tests.iam.gserviceaccount.com"))

    def all(self, info: str, *, s3_secret: str | None = None) -> list[m.StorageTarget]:
        return [
            target("local", "local", {"path": str(self.folder)}, {}, info),
            target(
                "s3",
                "s3",
                {
                    "bucket": self.bucket,
                    "endpoint_url": self.s3.url,
                    "region": self.s3.region,
                    "access_key_id": self.s3.access_key_id,
                    "path_style": True,
                },
                {"secret_access_key": s3_secret or self.s3.secret_access_key},
                info,
            ),
            target(
                "drive",
                "gdrive",
                {"folder_id": self.root, "api_endpoint": self.drive.api_endpoint, "chunk_size": 256 * 1024},
                {"service_account_json": self.sa},
                info,
            ),
        ]


def make_source(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("create table t (id integer primary key, body blob)")
        conn.executemany("insert into t (body) values (?)", [(bytes([i % 256]) * 3000,) for i in range(700)])


def rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("select id, body from t order by id").fetchall()


async def backup(
    source: Path, targets: list[m.StorageTarget], run_id: str
) -> m.BackupCompleted | m.BackupFailed:
    info = m.seal_info("run", run_id)
    command = m.BackupCommand(
        **envelope(),
        run_id=run_id,
        job_id="j",
        database=m.DatabaseTarget(name="shop", engine="sqlite", settings={"path": str(source)}),
        storage=targets[0],
        extra_storages=targets[1:],
        encryption=sealed_key(info),
    )
    progress = jobs.ProgressState(kind="backup", run_id=run_id)
    return await jobs.run_backup(command, agent_id=AGENT, private_key=KEY, progress=progress)


def sealed_key(info: str) -> m.EncryptionSpec:
    job_key = seal(public_key_b64(KEY), {"key_b64": base64.b64encode(JOB_KEY).decode()}, info)
    return m.EncryptionSpec(enabled=True, key_id="j:1", job_key=job_key)


async def stored_sha256(t: m.StorageTarget, secrets: dict[str, Any], key: str) -> str:
    digest = hashlib.sha256()
    async for block in get_storage(t, secrets).read(key):
        digest.update(block)
    return digest.hexdigest()


async def test_one_dump_three_identical_copies_each_restorable(
    tmp_path: Path, s3_server: MotoServer, drive: FakeDrive
) -> None:
    source = tmp_path / "shop.db"
    make_source(source)
    where = Targets(tmp_path, s3_server, drive)
    run_id = uuid.uuid4().hex
    report = await backup(source, where.all(m.seal_info("run", run_id)), run_id)
    assert isinstance(report, m.BackupCompleted), report
    assert [(c.storage_id, c.ok) for c in report.copies] == [("local", True), ("s3", True), ("drive", True)]

    plain = where.all("plain")  # unsealed settings to read back as a user would
    secrets = [{}, {"secret_access_key": s3_server.secret_access_key}, {"service_account_json": where.sa}]
    for t, s, copy in zip(plain, secrets, report.copies, strict=True):
        assert copy.storage_key is not None and copy.manifest_key is not None
        assert await stored_sha256(t, s, copy.storage_key) == report.artifact_sha256
        manifest = json.loads(await get_storage(t, s).get_bytes(copy.manifest_key))
        assert manifest["artifact_sha256"] == report.artifact_sha256

    # every copy restores to the same rows
    for index, copy in enumerate(report.copies):
        restored = tmp_path / f"restored-{index}.db"
        restore_id = uuid.uuid4().hex
        info = m.seal_info("restore", restore_id)
        command = m.RestoreCommand(
            **envelope(),
            restore_id=restore_id,
            backup_run_id=run_id,
            database=m.DatabaseTarget(name="copy", engine="sqlite", settings={"path": str(restored)}),
            storage=where.all(info)[index],
            storage_key=copy.storage_key or "",
            compression="zstd",
            encrypted=True,
            artifact_sha256=report.artifact_sha256,
            dump_sha256=report.dump_sha256,
            encryption=sealed_key(info),
        )
        progress = jobs.ProgressState(kind="restore", run_id=restore_id)
        result = await jobs.run_restore(command, agent_id=AGENT, private_key=KEY, progress=progress)
        assert isinstance(result, m.RestoreCompleted), result
        assert rows(restored) == rows(source)


async def test_a_failing_target_fails_only_its_copy_and_leaves_nothing_behind(
    tmp_path: Path, s3_server: MotoServer, drive: FakeDrive
) -> None:
    source = tmp_path / "shop.db"
    make_source(source)
    where = Targets(tmp_path, s3_server, drive)
    run_id = uuid.uuid4().hex
    wrong = "not-the-secret-key-0123456789abcdefghij"
    report = await backup(source, where.all(m.seal_info("run", run_id), s3_secret=wrong), run_id)
    assert isinstance(report, m.BackupCompleted), report
    by_storage = {c.storage_id: c for c in report.copies}
    assert by_storage["local"].ok and by_storage["drive"].ok
    assert not by_storage["s3"].ok and by_storage["s3"].storage_key is None
    assert by_storage["s3"].error and wrong not in by_storage["s3"].error
    assert report.storage_key == by_storage["local"].storage_key
    client = s3_server.client()
    assert client.list_objects_v2(Bucket=where.bucket).get("KeyCount", 0) == 0
    assert client.list_multipart_uploads(Bucket=where.bucket).get("Uploads", []) == []


async def test_when_every_target_fails_the_backup_fails_naming_each(tmp_path: Path) -> None:
    source = tmp_path / "shop.db"
    make_source(source)
    run_id = uuid.uuid4().hex
    info = m.seal_info("run", run_id)
    targets = [
        target("gone", "local", {"path": str(tmp_path / "missing")}, {}, info),
        target("also-gone", "local", {"path": str(tmp_path / "missing-too")}, {}, info),
    ]
    report = await backup(source, targets, run_id)
    assert isinstance(report, m.BackupFailed)
    assert "gone" in report.error and "also-gone" in report.error
