"""S3 storage against a real moto_server on loopback that checks signatures and IAM policies.

Every check of what landed in the bucket goes through a plain boto3 client, as a user would look.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from rahatback_agent.pipeline import Manifest, restore_stream, run_backup_pipeline
from rahatback_agent.storages.base import Storage, StorageError
from rahatback_agent.storages.local import LocalStorage
from rahatback_agent.storages.registry import get_storage
from rahatback_agent.storages.s3 import (
    MAX_PARTS,
    S3Storage,
    max_object_size,
    part_size_for,
)
from rahatback_contracts.messages import (
    BackupCommand,
    DatabaseTarget,
    EncryptionSpec,
    RestoreCommand,
    StorageTarget,
    StorageTestRequest,
    seal_info,
)
from rahatback_contracts.sealing import seal

from tests.agent.conftest import running_agent
from tests.servers import MotoServer, NatsServer, PostgresServer, free_port

pytestmark = pytest.mark.integration

MiB = 1 << 20
PART = 5 * MiB  # S3's (and moto's) smallest allowed part: the tests use the real minimum


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    return s3_server.create_bucket()


def make_storage(s3_server: MotoServer, bucket: str, **overrides: Any) -> S3Storage:
    options: dict[str, Any] = {
        "bucket": bucket,
        "access_key_id": s3_server.access_key_id,
        "secret_access_key": s3_server.secret_access_key,
        "endpoint_url": s3_server.url,
        "region": s3_server.region,
        "path_style": True,
        "part_size": PART,
        "max_in_flight": 3,
        "max_attempts": 2,
    }
    options.update(overrides)
    return S3Storage(**options)


@pytest.fixture
def storage(s3_server: MotoServer, bucket: str) -> S3Storage:
    return make_storage(s3_server, bucket)


def bucket_keys(s3: MotoServer, bucket: str) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


def open_uploads(s3: MotoServer, bucket: str) -> list[dict[str, Any]]:
    uploads: list[dict[str, Any]] = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return uploads


def object_bytes(s3: MotoServer, bucket: str, key: str) -> bytes:
    data: bytes = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return data


def assert_nothing_left_running() -> None:
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("rahatback-")] == []


async def blocks(data: bytes, size: int = 700_001) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await asyncio.sleep(0)


def policy(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def allow(actions: list[str], resource: str) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resource}


# ---------------------------------------------------------------- part size rule


def test_part_size_rule_stays_under_the_part_limit_far_beyond_50_gb() -> None:
    assert [part_size_for(n) // MiB for n in (1, 1000, 1001, 2000, 2001, 9001, MAX_PARTS)] == [
        6,
        6,
        12,
        12,
        24,
        3072,
        3072,
    ]
    # 10,000 parts hold more than S3's own 5 TiB object limit: every object S3 accepts fits
    assert max_object_size() == 1000 * 6 * MiB * (2**10 - 1)
    assert max_object_size() > 5 * (1 << 40)
    # ... and 6 MiB is the smallest whole-MiB start for which that holds
    assert max_object_size(base=5 * MiB) < 5 * (1 << 40)
    # a 50 GB artifact is done within the first 4,000 parts
    assert sum(part_size_for(n) for n in range(1, 4001)) > 50 * 10**9
    # the cap is S3's largest part
    assert part_size_for(10_000, base=1 << 30) == 5 << 30


def test_settings_from_the_command_and_registry(s3_server: MotoServer) -> None:
    target = StorageTarget(
        name="s3",
        kind="s3",
        settings={
            "bucket": "b-1",
            "prefix": "/backups//prod/",
            "region": "eu-central-1",
            "endpoint_url": "https://s3.eu-central-1.wasabisys.com",
            "path_style": True,
            "storage_class": "STANDARD_IA",
            "sse": "aws:kms",
            "kms_key_id": "alias/backups",
            "access_key_id": "AKIAEXAMPLE",
        },
    )
    storage = get_storage(target, {"secret_access_key": "top-secret-value-123"})
    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.region) == ("b-1", "backups/prod", "eu-central-1")
    assert storage.object_options() == {
        "StorageClass": "STANDARD_IA",
        "ServerSideEncryption": "aws:kms",
        "SSEKMSKeyId": "alias/backups",
    }
    assert "top-secret-value-123" not in repr(storage)
    for settings, secrets_ in [
        ({"bucket": "b-1", "access_key_id": "AKIA"}, {}),
        ({"bucket": "", "access_key_id": "AKIA"}, {"secret_access_key": "x"}),
        ({"bucket": "b-1", "access_key_id": "AKIA", "sse": "rot13"}, {"secret_access_key": "x"}),
        ({"bucket": "b-1", "access_key_id": "AKIA", "kms_key_id": "k"}, {"secret_access_key": "x"}),
    ]:
        with pytest.raises(StorageError) as err:
            get_storage(StorageTarget(name="s3", kind="s3", settings=settings), secrets_)
        assert err.value.code == "bad_settings", settings


# ---------------------------------------------------------------- writing


async def test_multipart_upload_round_trip_with_growing_parts_and_bounded_concurrency(
    s3_server: MotoServer, bucket: str
) -> None:
    # parts_per_step=2: parts are 5, 5, 10, 10, then the rest, so the growth rule really runs
    storage = make_storage(
        s3_server, bucket, parts_per_step=2, storage_class="STANDARD_IA", sse="AES256", max_in_flight=3
    )
    data = os.urandom(30 * MiB + 5 * MiB + 12_345)
    key = "shop/2026/11/26/shop_x.sql.zst.rbk"
    writer = await storage.open_writer(key)
    async for block in blocks(data):
        await writer.write(block)
    # not visible before commit, but the multipart upload is there
    assert bucket_keys(s3_server, bucket) == []
    assert [u["Key"] for u in open_uploads(s3_server, bucket)] == [key]
    await writer.commit()

    assert bucket_keys(s3_server, bucket) == [key]
    assert object_bytes(s3_server, bucket, key) == data
    head = s3_server.client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].endswith('-5"'), head["ETag"]  # 5 parts; fixed 5 MiB parts would be 8
    assert head["ContentLength"] == len(data)
    assert head["ServerSideEncryption"] == "AES256"
    assert head["StorageClass"] == "STANDARD_IA"
    assert writer.parts_started == 5
    assert 2 <= writer.peak_in_flight <= 3
    assert open_uploads(s3_server, bucket) == []
    with pytest.raises(StorageError) as err:
        await writer.write(b"more")
    assert err.value.code == "closed"
    assert_nothing_left_running()


async def test_in_flight_bytes_limit_the_parts_uploading_at_once(s3_server: MotoServer, bucket: str) -> None:
    storage = make_storage(s3_server, bucket, max_in_flight=4, in_flight_bytes=2 * PART)
    data = os.urandom(6 * PART)
    writer = await storage.open_writer("a")
    await writer.write(data)
    await writer.commit()
    assert writer.peak_in_flight == 2
    assert object_bytes(s3_server, bucket, "a") == data


async def test_small_object_is_one_put(storage: S3Storage, s3_server: MotoServer, bucket: str) -> None:
    writer = await storage.open_writer("db/small.rbk")
    await writer.write(b"x" * 1000)
    await writer.write(b"y")
    assert open_uploads(s3_server, bucket) == []  # no multipart upload for less than a part
    await writer.commit()
    assert writer.upload_id is None
    assert object_bytes(s3_server, bucket, "db/small.rbk") == b"x" * 1000 + b"y"
    head = s3_server.client().head_object(Bucket=bucket, Key="db/small.rbk")
    assert "-" not in head["ETag"]

    empty = await storage.open_writer("db/empty")
    await empty.commit()
    assert object_bytes(s3_server, bucket, "db/empty") == b""
    assert await storage.get_bytes("db/empty") == b""


async def test_put_and_get_bytes(storage: S3Storage, s3_server: MotoServer, bucket: str) -> None:
    await storage.put_bytes("m.json", b'{"a": 1}')
    assert object_bytes(s3_server, bucket, "m.json") == b'{"a": 1}'
    assert await storage.get_bytes("m.json") == b'{"a": 1}'
    big = os.urandom(PART + 3)  # at least a part: goes up as a multipart upload
    await storage.put_bytes("big", big)
    assert s3_server.client().head_object(Bucket=bucket, Key="big")["ETag"].endswith('-2"')
    assert await storage.get_bytes("big") == big


async def test_abort_leaves_no_object_and_no_upload(
    storage: S3Storage, s3_server: MotoServer, bucket: str
) -> None:
    writer = await storage.open_writer("db/a.rbk")
    await writer.write(os.urandom(2 * PART + 100))
    assert len(open_uploads(s3_server, bucket)) == 1
    await writer.abort()
    await writer.abort()  # idempotent
    assert bucket_keys(s3_server, bucket) == []
    assert open_uploads(s3_server, bucket) == []
    with pytest.raises(StorageError) as err:
        await writer.commit()
    assert err.value.code == "closed"
    assert_nothing_left_running()


async def test_dump_failure_mid_upload_leaves_nothing(
    storage: S3Storage, s3_server: MotoServer, bucket: str
) -> None:
    """What jobs.run_backup does when the dump tool dies after several parts went up."""
    seen_upload: list[int] = []

    async def dying_dump() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield os.urandom(MiB)
            await asyncio.sleep(0)
        for _ in range(200):  # the pipeline drains its queues meanwhile: parts go up
            if writer.parts_started >= 2:
                break
            await asyncio.sleep(0.05)
        seen_upload.append(len(open_uploads(s3_server, bucket)))
        raise RuntimeError("pg_dump exited with status 1")

    writer = await storage.open_writer("db/x.sql.rbk")
    with pytest.raises(RuntimeError, match="pg_dump exited"):
        try:
            await run_backup_pipeline(
                dying_dump(), writer, compression="none", level=0, job_key=os.urandom(32), key_id="k"
            )
            await writer.commit()
        except BaseException:
            await asyncio.shield(writer.abort())
            raise
    assert seen_upload == [1]  # the failure really came mid-upload
    assert bucket_keys(s3_server, bucket) == []
    assert open_uploads(s3_server, bucket) == []
    assert_nothing_left_running()


async def test_storage_failure_mid_upload_aborts_the_upload(s3_server: MotoServer, bucket: str) -> None:
    """The bucket starts refusing parts half way (here: the key's write permission is revoked):
    the writer reports it precisely and leaves neither an object nor parts behind."""
    user = f"revoked-{uuid.uuid4().hex[:8]}"
    key_id, secret = s3_server.create_user(
        policy(allow(["s3:*"], f"arn:aws:s3:::{bucket}"), allow(["s3:*"], f"arn:aws:s3:::{bucket}/*")), user
    )
    storage = make_storage(s3_server, bucket, access_key_id=key_id, secret_access_key=secret)
    writer = await storage.open_writer("db/x.rbk")
    await writer.write(os.urandom(2 * PART))
    await writer.write(b"1")  # the first two parts are away
    deny_put = {"Effect": "Deny", "Action": ["s3:PutObject"], "Resource": f"arn:aws:s3:::{bucket}/*"}
    s3_server.client("iam").put_user_policy(
        UserName=user,
        PolicyName="inline",
        PolicyDocument=json.dumps(
            policy(
                allow(["s3:*"], f"arn:aws:s3:::{bucket}"),
                allow(["s3:*"], f"arn:aws:s3:::{bucket}/*"),
                deny_put,
            )
        ),
    )
    with pytest.raises(StorageError) as err:
        for _ in range(4):
            await writer.write(os.urandom(PART))
        await writer.commit()
    assert err.value.code == "permission_denied"
    assert "write s3://" in err.value.message and "s3:PutObject" in err.value.message
    await writer.abort()  # what the caller does; already done by the writer itself
    assert bucket_keys(s3_server, bucket) == []
    assert open_uploads(s3_server, bucket) == []
    assert secret not in err.value.message


async def test_cancelled_backup_aborts_the_upload(
    storage: S3Storage, s3_server: MotoServer, bucket: str
) -> None:
    parts_up = asyncio.Event()

    async def endless_dump() -> AsyncIterator[bytes]:
        sent = 0
        while True:
            yield os.urandom(MiB)
            sent += MiB
            if sent >= 3 * PART:
                parts_up.set()
            await asyncio.sleep(0.01)

    async def backup() -> None:
        writer = await storage.open_writer("db/cancelled.rbk")
        try:
            await run_backup_pipeline(
                endless_dump(), writer, compression="none", level=0, job_key=None, key_id=None
            )
            await writer.commit()
        except BaseException:
            await asyncio.shield(writer.abort())
            raise

    task = asyncio.create_task(backup())
    await asyncio.wait_for(parts_up.wait(), 60)
    assert len(open_uploads(s3_server, bucket)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bucket_keys(s3_server, bucket) == []
    assert open_uploads(s3_server, bucket) == []
    assert_nothing_left_running()


async def test_cancelled_write_aborts_even_without_the_callers_abort(
    storage: S3Storage, s3_server: MotoServer, bucket: str
) -> None:
    writer = await storage.open_writer("db/orphan.rbk")
    started = asyncio.Event()

    async def keep_writing() -> None:
        while True:
            await writer.write(os.urandom(MiB))
            if writer.parts_started >= 2:
                started.set()

    task = asyncio.create_task(keep_writing())
    await asyncio.wait_for(started.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert open_uploads(s3_server, bucket) == []
    assert bucket_keys(s3_server, bucket) == []
    with pytest.raises(StorageError):
        await writer.write(b"x")
    assert_nothing_left_running()


# ---------------------------------------------------------------- reading, listing, deleting


async def test_read_streams_ranges_in_bounded_chunks(s3_server: MotoServer, bucket: str) -> None:
    data = os.urandom(3 * MiB + 12_345)
    s3_server.client().put_object(Bucket=bucket, Key="a/obj", Body=data)
    storage = make_storage(s3_server, bucket, range_size=MiB // 2 + 7)
    chunks = [chunk async for chunk in storage.read("a/obj")]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= MiB
    assert len(chunks) >= 7  # one range is never more than ~half a MiB here

    with pytest.raises(StorageError) as err:
        await storage.get_bytes("a/missing")
    assert err.value.code == "not_found"
    assert "a/missing" in err.value.message


async def test_object_replaced_while_reading_is_refused(s3_server: MotoServer, bucket: str) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=os.urandom(3 * MiB))
    storage = make_storage(s3_server, bucket, range_size=MiB)
    reader = storage.read("k")
    first = await anext(reader)
    assert len(first) == MiB
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=os.urandom(3 * MiB))
    with pytest.raises(StorageError) as err:
        async for _ in reader:
            pass
    assert err.value.code == "changed"


class CuttingProxy:
    """A TCP proxy in front of moto that cuts one response after `cut_after` bytes when armed,
    as a flaky network would mid-download."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.cut_after: int | None = None
        self.cuts = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, cut: bool) -> None:
            sent = 0
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    limit = self.cut_after if cut else None
                    if limit is not None and sent + len(data) > limit:
                        dst.write(data[: max(limit - sent, 0)])
                        await dst.drain()
                        self.cut_after = None
                        self.cuts += 1
                        break
                    dst.write(data)
                    await dst.drain()
                    sent += len(data)
            for w in (client_w, up_w):
                w.close()

        await asyncio.gather(pipe(client_r, up_w, False), pipe(up_r, client_w, True))


async def test_read_resumes_after_the_connection_breaks_mid_range(s3_server: MotoServer, bucket: str) -> None:
    data = os.urandom(3 * MiB)
    s3_server.client().put_object(Bucket=bucket, Key="flaky", Body=data)
    proxy = CuttingProxy(s3_server.port)
    url = await proxy.start()
    try:
        storage = make_storage(s3_server, bucket, endpoint_url=url, range_size=2 * MiB)
        proxy.cut_after = 700_000  # inside the first range's body
        got = await storage.get_bytes("flaky")
    finally:
        await proxy.stop()
    assert proxy.cuts == 1
    assert got == data


async def test_delete_is_idempotent(storage: S3Storage, s3_server: MotoServer, bucket: str) -> None:
    await storage.put_bytes("a/b", b"1")
    await storage.delete("a/b")
    await storage.delete("a/b")
    assert bucket_keys(s3_server, bucket) == []


@pytest.mark.parametrize("kind", ["local", "s3"])
async def test_list_by_prefix(kind: str, s3_server: MotoServer, bucket: str, tmp_path: Path) -> None:
    """The same answers from both storages: complete objects only, lexicographic order."""
    storage: Storage = make_storage(s3_server, bucket) if kind == "s3" else LocalStorage(tmp_path)
    for key in ["shop/2026/11/b.rbk", "shop/2026/11/a.rbk", "shop/2026/12/c.rbk", "shopx/d", "top"]:
        await storage.put_bytes(key, b"x")
    unfinished = await storage.open_writer("shop/2026/11/unfinished.rbk")
    await unfinished.write(b"partial" * (PART // 7 + 1))  # a multipart upload / temporary file

    async def listed(prefix: str) -> list[str]:
        return [key async for key in storage.list(prefix)]

    every = ["shop/2026/11/a.rbk", "shop/2026/11/b.rbk", "shop/2026/12/c.rbk", "shopx/d", "top"]
    assert await listed("") == every
    assert await listed("shop/") == every[:3]
    assert await listed("shop") == every[:4]
    assert await listed("shop/2026/1") == every[:3]
    assert await listed("shop/2026/11/") == every[:2]
    assert await listed("shop/2026/11/b") == ["shop/2026/11/b.rbk"]
    assert await listed("nothing/here/") == []
    await unfinished.abort()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a/./b", "a\x00b", "k" * 1025])
async def test_bad_keys_are_refused(storage: S3Storage, key: str) -> None:
    for attempt in (
        storage.open_writer(key),
        storage.put_bytes(key, b"x"),
        storage.get_bytes(key),
        storage.delete(key),
    ):
        with pytest.raises(StorageError) as err:
            await attempt
        assert err.value.code == "bad_key"


# ---------------------------------------------------------------- probe (the storage test)


async def test_probe_succeeds_under_the_prefix_and_cleans_up(s3_server: MotoServer, bucket: str) -> None:
    # a user only allowed under its prefix, as a careful admin would set it up
    key_id, secret = s3_server.create_user(
        policy(
            allow(["s3:ListBucket"], f"arn:aws:s3:::{bucket}"),
            allow(
                [
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                    "s3:ListMultipartUploadParts",
                ],
                f"arn:aws:s3:::{bucket}/backups/*",
            ),
        )
    )
    storage = make_storage(
        s3_server, bucket, access_key_id=key_id, secret_access_key=secret, prefix="/backups/"
    )
    await storage.probe()
    assert bucket_keys(s3_server, bucket) == []
    assert open_uploads(s3_server, bucket) == []
    # the same user without the prefix may not write: the probe really writes under the prefix
    with pytest.raises(StorageError) as err:
        await make_storage(s3_server, bucket, access_key_id=key_id, secret_access_key=secret).probe()
    assert err.value.code == "permission_denied"


async def test_probe_wrong_secret_is_auth_failed(s3_server: MotoServer, bucket: str) -> None:
    wrong = "Wr0ng" + s3_server.secret_access_key[5:]
    with pytest.raises(StorageError) as err:
        await make_storage(s3_server, bucket, secret_access_key=wrong).probe()
    assert err.value.code == "auth_failed"
    assert "secret access key does not match" in err.value.message
    assert wrong not in err.value.message and s3_server.secret_access_key not in err.value.message


async def test_probe_unknown_access_key_is_auth_failed(s3_server: MotoServer, bucket: str) -> None:
    with pytest.raises(StorageError) as err:
        await make_storage(s3_server, bucket, access_key_id="AKIANOTAREALKEY00000").probe()
    assert err.value.code == "auth_failed"
    assert "InvalidAccessKeyId" in err.value.message


async def test_probe_missing_bucket(s3_server: MotoServer) -> None:
    with pytest.raises(StorageError) as err:
        await make_storage(s3_server, "no-such-bucket-here").probe()
    assert err.value.code == "bucket_missing"
    assert "'no-such-bucket-here' does not exist" in err.value.message


async def test_probe_unreachable_endpoint(s3_server: MotoServer, bucket: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as err:
        await make_storage(s3_server, bucket, endpoint_url=closed).probe()
    assert err.value.code == "unreachable"
    assert closed.removeprefix("http://") in err.value.message


@pytest.mark.parametrize(
    ("granted", "failing_step"),
    [
        (["s3:GetObject", "s3:DeleteObject"], "write"),
        (["s3:PutObject", "s3:DeleteObject"], "read"),
        (["s3:PutObject", "s3:GetObject"], "delete"),
        (["s3:PutObject", "s3:GetObject", "s3:DeleteObject"], "abort the multipart upload of"),
    ],
)
async def test_probe_names_the_denied_operation(
    s3_server: MotoServer, bucket: str, granted: list[str], failing_step: str
) -> None:
    key_id, secret = s3_server.create_user(policy(allow(granted, f"arn:aws:s3:::{bucket}/*")))
    storage = make_storage(s3_server, bucket, access_key_id=key_id, secret_access_key=secret)
    with pytest.raises(StorageError) as err:
        await storage.probe()
    assert err.value.code == "permission_denied"
    assert f"may not {failing_step} s3://{bucket}/.rahatback-probe-" in err.value.message
    assert secret not in err.value.message
    if failing_step == "read":  # the object that could be written was cleaned up after the failure
        assert bucket_keys(s3_server, bucket) == []


# ---------------------------------------------------------------- through the pipeline


def sample_dump(random_bytes: int) -> bytes:
    rows = b"".join(b"INSERT INTO t VALUES (%d, 'row %d');\n" % (i, i * 7) for i in range(60_000))
    return os.urandom(random_bytes) + rows + os.urandom(333)


async def test_pipeline_backup_and_restore_through_s3(
    storage: S3Storage, s3_server: MotoServer, bucket: str
) -> None:
    job_key = os.urandom(32)
    data = sample_dump(12 * MiB)
    key = "shop/2026/11/26/shop_x.sql.zst.rbk"
    writer = await storage.open_writer(key)
    result = await run_backup_pipeline(
        blocks(data), writer, compression="zstd", level=3, job_key=job_key, key_id="k1"
    )
    await writer.commit()
    assert writer.parts_started >= 2  # really multipart

    artifact = object_bytes(s3_server, bucket, key)
    assert hashlib.sha256(artifact).hexdigest() == result.artifact_sha256
    assert len(artifact) == result.artifact_size
    restored = b"".join(
        [
            chunk
            async for chunk in restore_stream(
                storage.read(key),
                compression="zstd",
                job_key_lookup=job_key,
                expected_artifact_sha256=result.artifact_sha256,
                expected_dump_sha256=result.dump_sha256,
            )
        ]
    )
    assert restored == data
    assert_nothing_left_running()


async def test_200_mb_upload_keeps_memory_bounded(s3_server: MotoServer, bucket: str) -> None:
    """200 MB through the real pipeline (encrypted) into S3: Python's peak allocations stay near
    (in-flight parts + one filling part + the pipeline's queues), not the artifact size."""
    storage = make_storage(s3_server, bucket, max_in_flight=2)
    total = 200 * MiB
    seeds = [os.urandom(MiB) for _ in range(7)]  # allocated before measuring; the source allocates nothing

    async def big_dump() -> AsyncIterator[bytes]:
        for i in range(total // MiB):
            yield seeds[i % len(seeds)]

    writer = await storage.open_writer("big/x.rbk")
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        result = await run_backup_pipeline(
            big_dump(), writer, compression="none", level=0, job_key=os.urandom(32), key_id="k"
        )
        await writer.commit()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grown = peak - baseline
    # writer: 1 filling + 2 in-flight parts (15 MiB); the pipeline's queues ~7 MiB; 24 MiB measured
    assert grown < 32 * MiB, f"peak grew by {grown / MiB:.1f} MiB while uploading {total / MiB:.0f} MiB"
    assert result.artifact_size > total
    assert writer.parts_started == -(-result.artifact_size // PART)

    digest = hashlib.sha256()
    async for chunk in storage.read("big/x.rbk"):
        digest.update(chunk)
    assert digest.hexdigest() == result.artifact_sha256
    await storage.delete("big/x.rbk")


# ---------------------------------------------------------------- through the agent, over NATS


def _rows(pg: PostgresServer, db: str) -> str:
    return pg.psql(db, "SELECT count(*), md5(string_agg(id || ':' || name, ',' ORDER BY id)) FROM customers")


async def test_agent_backup_and_restore_through_s3(
    nats_server: NatsServer,
    api_nc: NATS,
    postgres: PostgresServer,
    s3_server: MotoServer,
    bucket: str,
    tmp_path: Path,
) -> None:
    """The agent gets sealed S3 credentials in its commands, tests the storage, backs a PostgreSQL
    database up into the bucket and restores it into another database."""
    source, target = f"s3src_{uuid.uuid4().hex[:8]}", f"s3dst_{uuid.uuid4().hex[:8]}"
    postgres.psql("postgres", f"CREATE DATABASE {source}")
    postgres.psql("postgres", f"CREATE DATABASE {target}")
    postgres.psql(
        source,
        "CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL);"
        " INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 20000) g;",
    )
    job_key = secrets.token_bytes(32)
    settings = {
        "bucket": bucket,
        "prefix": "rahatback",
        "region": s3_server.region,
        "endpoint_url": s3_server.url,
        "path_style": True,
        "access_key_id": s3_server.access_key_id,
    }
    now = datetime.now(UTC)

    def storage_target(public_key: str, info: str, secret: str) -> StorageTarget:
        return StorageTarget(
            name="s3",
            kind="s3",
            settings=settings,
            secrets=seal(public_key, {"secret_access_key": secret}, info),
        )

    def db_target(public_key: str, db: str, info: str) -> DatabaseTarget:
        return DatabaseTarget(
            name=db,
            engine="postgresql",
            settings={"host": postgres.host, "port": postgres.port, "user": postgres.user, "database": db},
            secrets=seal(public_key, {"password": postgres.password}, info),
        )

    def sealed_key(public_key: str, info: str) -> Any:
        return seal(public_key, {"key_b64": base64.b64encode(job_key).decode()}, info)

    async with running_agent(nats_server, api_nc, tmp_path) as agent:
        pk = agent.public_key_b64
        checks: dict[str, Any] = {}
        for name, secret in [
            ("good", s3_server.secret_access_key),
            ("wrong", "Wr0ng-" + s3_server.secret_access_key),
        ]:
            request_id = uuid.uuid4().hex
            checks[name] = await agent.request(
                "storage.test",
                StorageTestRequest(
                    request_id=request_id, storage=storage_target(pk, seal_info("rpc", request_id), secret)
                ),
            )
        assert checks["good"]["ok"] is True, checks["good"]
        assert checks["wrong"]["ok"] is False and checks["wrong"]["error_code"] == "auth_failed", checks

        run_id = uuid.uuid4().hex
        info = seal_info("run", run_id)
        command = BackupCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now,
            expires_at=now + timedelta(minutes=10),
            run_id=run_id,
            job_id=uuid.uuid4().hex,
            database=db_target(pk, source, info),
            storage=storage_target(pk, info, s3_server.secret_access_key),
            compression="zstd",
            encryption=EncryptionSpec(enabled=True, key_id="job-key-1", job_key=sealed_key(pk, info)),
        )
        await agent.send_command("job.execute", command)
        done = await agent.reports.outcome("backup", "completed", "run_id", run_id)

        key = done["storage_key"]
        assert key.startswith(f"rahatback/{source}/{now:%Y}/"), key  # the prefix, once
        assert sorted(bucket_keys(s3_server, bucket)) == [key, done["manifest_key"]]
        artifact = object_bytes(s3_server, bucket, key)
        assert hashlib.sha256(artifact).hexdigest() == done["artifact_sha256"]
        assert b"customer 19999" not in artifact  # encrypted
        manifest = Manifest.from_json(object_bytes(s3_server, bucket, done["manifest_key"]))
        assert manifest.artifact_sha256 == done["artifact_sha256"] and manifest.run_id == run_id

        restore_id = uuid.uuid4().hex
        rinfo = seal_info("restore", restore_id)
        restore = RestoreCommand(
            command_id=uuid.uuid4().hex,
            org_id=agent.identity.org_id,
            issued_at=now,
            expires_at=now + timedelta(minutes=10),
            restore_id=restore_id,
            backup_run_id=run_id,
            database=db_target(pk, target, rinfo),
            storage=storage_target(pk, rinfo, s3_server.secret_access_key),
            storage_key=key,
            compression="zstd",
            encrypted=True,
            artifact_sha256=done["artifact_sha256"],
            dump_sha256=done["dump_sha256"],
            encryption=EncryptionSpec(key_id="job-key-1", job_key=sealed_key(pk, rinfo)),
        )
        await agent.send_command("restore.execute", restore)
        restored = await agent.reports.outcome("restore", "completed", "restore_id", restore_id)
        assert restored["bytes_restored"] == done["dump_size"]

    assert _rows(postgres, target) == _rows(postgres, source)
    assert _rows(postgres, target).startswith("20000|")
    assert agent.wiretap.messages
    for needle in (s3_server.secret_access_key, postgres.password):
        assert agent.wiretap.contains(needle) == []
