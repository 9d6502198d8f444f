"""Google Drive storage: the real google-api-python-client / google-auth code against a fake Drive.

No Drive server can run here (DESIGN.md): `fake_drive.FakeDrive` implements the Drive v3 endpoints
the storage uses, and the client library is pointed at it through `api_endpoint` and `token_uri`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from rahatback_agent.pipeline import restore_stream, run_backup_pipeline
from rahatback_agent.storages.base import StorageError
from rahatback_agent.storages.gdrive import GDriveStorage, RetryPolicy
from rahatback_agent.storages.registry import get_storage
from rahatback_contracts.messages import StorageTarget

from tests.agent.fake_drive import FOLDER_MIME, FakeDrive, Fault
from tests.servers import free_port

CHUNK = 256 * 1024
FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
SA_EMAIL = "backup@rahatback-tests.iam.gserviceaccount.com"
KEY = "shop/2026/11/26/shop_20261126T010203Z_run1.sql.zst.rbk"


@pytest.fixture
def drive() -> Iterator[FakeDrive]:
    fake = FakeDrive().start()
    yield fake
    fake.stop()


@pytest.fixture
def root(drive: FakeDrive) -> str:
    return drive.add_folder("RahatBack backups")


@pytest.fixture
def sa_info(drive: FakeDrive) -> dict[str, str]:
    return drive.add_service_account(SA_EMAIL)


def settings(drive: FakeDrive, root: str, **extra: Any) -> dict[str, Any]:
    return {"folder_id": root, "api_endpoint": drive.api_endpoint, "chunk_size": CHUNK, **extra}


def make_storage(drive: FakeDrive, root: str, sa_info: dict[str, str], **extra: Any) -> GDriveStorage:
    storage = GDriveStorage.from_settings(
        settings(drive, root, **extra), {"service_account_json": json.dumps(sa_info)}
    )
    storage.retry = FAST_RETRY
    return storage


async def listed(storage: GDriveStorage, prefix: str) -> list[str]:
    return [key async for key in storage.list(prefix)]


async def write_in_pieces(storage: GDriveStorage, key: str, data: bytes, piece: int = 300_000) -> int:
    writer = await storage.open_writer(key)
    for i in range(0, len(data), piece):
        await writer.write(data[i : i + piece])
    await writer.commit()
    return writer.buffered_peak


async def test_multi_chunk_round_trip_creates_each_folder_once(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    data = os.urandom(5 * CHUNK + 12_345)
    peak = await write_in_pieces(storage, KEY, data)

    assert drive.content(root, KEY) == data
    assert drive.folder_creates == ["shop", "2026", "11", "26"]
    # sent as several chunks, each non-final one a whole chunk (the fake refuses anything else)
    starts = [put.start for put in drive.chunk_puts]
    assert starts == [i * CHUNK for i in range(6)]
    assert [put.total for put in drive.chunk_puts] == ["*"] * 5 + [str(len(data))]
    # memory: about one chunk (plus one incoming write), never the whole object
    assert peak <= CHUNK + 300_000

    chunks = [c async for c in storage.read(KEY)]
    assert b"".join(chunks) == data
    assert len(chunks) == 6 and max(len(c) for c in chunks) == CHUNK

    # same day, another file, and a fresh storage instance: the folders are found, not re-created
    await storage.put_bytes(KEY + ".manifest.json", b"{}")
    again = make_storage(drive, root, sa_info)
    await again.put_bytes("shop/2026/11/26/other.rbk", b"x")
    await again.put_bytes("shop/2026/11/27/next-day.rbk", b"y")
    assert drive.folder_creates == ["shop", "2026", "11", "26", "27"]


async def test_concurrent_writers_share_new_folders(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    await asyncio.gather(*(storage.put_bytes(f"db/2026/01/02/f{i}", b"%d" % i) for i in range(4)))
    assert sorted(drive.folder_creates) == sorted(["db", "2026", "01", "02"])
    assert [await storage.get_bytes(f"db/2026/01/02/f{i}") for i in range(4)] == [b"0", b"1", b"2", b"3"]


async def test_duplicate_folders_from_a_race_are_all_searched(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    """Two agents created `shop` at the same moment and each wrote into its own copy: new files go
    to the oldest copy, and reads, lists and deletes see the files in both."""
    older = drive.add_folder("shop", root)
    newer = drive.add_folder("shop", root)
    drive.add_file("a.rbk", older, b"in the older folder")
    drive.add_file("b.rbk", newer, b"in the newer folder")
    drive.add_file("m.json", older, b"old manifest")
    drive.add_file("m.json", newer, b"new manifest")
    storage = make_storage(drive, root, sa_info)

    assert await storage.get_bytes("shop/a.rbk") == b"in the older folder"
    assert await storage.get_bytes("shop/b.rbk") == b"in the newer folder"
    assert await storage.get_bytes("shop/m.json") == b"new manifest"  # the newest copy of a key
    assert await listed(storage, "shop/") == ["shop/a.rbk", "shop/b.rbk", "shop/m.json"]
    await storage.put_bytes("shop/c.rbk", b"c")
    assert [f.name for f in drive.children(older)] == ["a.rbk", "m.json", "c.rbk"]
    assert drive.folder_creates == []
    await storage.delete("shop/m.json")
    assert await listed(storage, "shop/") == ["shop/a.rbk", "shop/b.rbk", "shop/c.rbk"]
    assert {f.id for f in drive.files.values() if f.mime_type == FOLDER_MIME} == {root, older, newer}


@pytest.mark.parametrize("size", [0, 1, CHUNK, 2 * CHUNK, 2 * CHUNK + 1], ids=lambda n: f"{n}B")
async def test_sizes_at_chunk_boundaries(
    drive: FakeDrive, root: str, sa_info: dict[str, str], size: int
) -> None:
    storage = make_storage(drive, root, sa_info)
    data = os.urandom(size)
    await write_in_pieces(storage, "db/edge.rbk", data, piece=CHUNK)
    assert drive.content(root, "db/edge.rbk") == data
    assert await storage.get_bytes("db/edge.rbk") == data


@pytest.mark.parametrize(
    "fault",
    [
        Fault("partial_503", keep=100_000),  # 503 after the server kept part of the chunk
        Fault("short_ack", keep=CHUNK // 2 + 7),  # 308 acknowledging fewer bytes than sent
        Fault("reset", keep=40_000),  # connection dropped with no answer (twice: httplib2 resends once)
        Fault("fail"),  # 503, nothing kept
    ],
    ids=lambda f: f.kind,
)
async def test_a_chunk_dropped_mid_upload_is_resumed_from_the_acknowledged_offset(
    drive: FakeDrive, root: str, sa_info: dict[str, str], fault: Fault
) -> None:
    storage = make_storage(drive, root, sa_info)
    data = os.urandom(6 * CHUNK + 999)
    # the first two chunks go through; the third suffers the fault
    drive.faults = [Fault("short_ack", keep=CHUNK), Fault("short_ack", keep=CHUNK), fault]
    if fault.kind == "reset":
        drive.faults.append(Fault("reset", keep=0))

    await write_in_pieces(storage, KEY, data)

    assert drive.content(root, KEY) == data
    assert drive.faults == []
    if fault.kind != "short_ack":
        assert drive.status_queries >= 1  # the client asked the session where to resume
    acknowledged = 2 * CHUNK + fault.keep
    # the next chunk after the fault starts exactly at what the server had acknowledged
    after = [put.start for put in drive.chunk_puts if put.start >= 2 * CHUNK]
    assert acknowledged in after
    assert await storage.get_bytes(KEY) == data


async def test_a_resume_point_past_the_buffered_bytes_waits_for_more_data(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    """After the fault the server holds 100,000 bytes, and fewer than a chunk remain buffered
    beyond them: the writer must wait for the stream rather than send a short (final) chunk."""
    storage = make_storage(drive, root, sa_info)
    data = os.urandom(4 * CHUNK)
    drive.faults = [Fault("partial_503", keep=100_000)]
    await write_in_pieces(storage, KEY, data, piece=CHUNK + 10)
    assert drive.content(root, KEY) == data
    assert [put.start for put in drive.chunk_puts][:2] == [0, 100_000]
    assert all(put.total == "*" for put in drive.chunk_puts[:-1])


async def test_upload_gives_up_after_bounded_attempts_and_abort_leaves_nothing(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    writer = await storage.open_writer(KEY)
    await writer.write(os.urandom(CHUNK))  # buffered, nothing sent yet
    drive.fail_every_chunk = True
    with pytest.raises(StorageError) as err:
        await writer.write(os.urandom(CHUNK))
    assert err.value.code == "upload_failed"
    assert "4 times" in err.value.message
    assert len(drive.chunk_puts) == FAST_RETRY.attempts
    await writer.abort()
    assert drive.all_files() == []
    assert drive.sessions == {} and drive.cancelled_sessions == 1


async def test_abort_cancels_the_session_and_leaves_no_file(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    writer = await storage.open_writer(KEY)
    await writer.write(os.urandom(3 * CHUNK))  # two chunks sent
    assert len(drive.sessions) == 1 and len(drive.chunk_puts) == 2
    await writer.abort()
    assert drive.all_files() == []
    assert drive.sessions == {} and drive.cancelled_sessions == 1
    with pytest.raises(StorageError) as err:
        await writer.write(b"more")
    assert err.value.code == "closed"
    with pytest.raises(StorageError) as err:
        await storage.get_bytes(KEY)
    assert err.value.code == "not_found"


async def test_abort_after_the_final_chunk_deletes_the_completed_file(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    """The final chunk's answer is lost (twice: httplib2 resends once) and retries run out: the
    upload completed on the server anyway, so the abort must find that file and delete it."""
    storage = make_storage(drive, root, sa_info)
    storage.retry = RetryPolicy(attempts=1, base_delay=0.01)
    writer = await storage.open_writer("db/lost-answer.rbk")
    await writer.write(b"small object")
    drive.lost_completion_answers = 2
    with pytest.raises(StorageError) as err:
        await writer.commit()
    assert err.value.code == "upload_failed"
    assert drive.lost_completion_answers == 0 and drive.status_queries == 1
    assert drive.all_files() == []  # the failed commit aborted: the completed file is gone again


async def test_commit_replaces_an_existing_object(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    await storage.put_bytes("db/m.json", b"old")
    writer = await storage.open_writer("db/m.json")
    await writer.write(b"new")
    assert await storage.get_bytes("db/m.json") == b"old"
    await writer.commit()
    assert [f.content for f in drive.at_path(root, "db/m.json")] == [b"new"]
    assert await storage.get_bytes("db/m.json") == b"new"


async def test_read_is_chunked_and_missing_keys_are_not_found(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    data = os.urandom(3 * CHUNK + 5)
    await storage.put_bytes("a/b.rbk", data)
    sizes = [len(c) async for c in storage.read("a/b.rbk")]
    assert sizes == [CHUNK, CHUNK, CHUNK, 5]
    for key in ("a/missing.rbk", "no/such/folder.rbk"):
        with pytest.raises(StorageError) as err:
            await storage.get_bytes(key)
        assert err.value.code == "not_found"


async def test_delete_is_idempotent_and_keeps_other_files(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    await storage.put_bytes("db/1/x.rbk", b"x")
    await storage.put_bytes("db/1/y.rbk", b"y")
    await storage.delete("db/1/x.rbk")
    await storage.delete("db/1/x.rbk")
    await storage.delete("never/existed.rbk")
    assert [f.name for f in drive.all_files()] == ["y.rbk"]
    assert await storage.get_bytes("db/1/y.rbk") == b"y"


async def test_list_walks_folders_with_paging(drive: FakeDrive, root: str, sa_info: dict[str, str]) -> None:
    storage = make_storage(drive, root, sa_info)
    keys = [
        "shop/2026/11/26/a.rbk",
        "shop/2026/11/26/a.rbk.manifest.json",
        "shop/2026/11/27/b.rbk",
        "shop/2026/12/01/c.rbk",
        "shopping/2026/11/26/d.rbk",
        "crm/2026/11/26/e.rbk",
    ]
    for key in keys:
        await storage.put_bytes(key, key.encode())
    drive.max_page_size = 2  # every listing spans several pages
    assert await listed(storage, "") == sorted(keys)
    assert await listed(storage, "shop/") == keys[:4]
    assert await listed(storage, "shop") == sorted(keys[:5])
    assert await listed(storage, "shop/2026/11/") == keys[:3]
    assert await listed(storage, "shop/2026/11/26/a.rbk.m") == [keys[1]]
    assert await listed(storage, "nothing/") == []
    # folders of another tree are not listed
    drive.add_folder("unrelated")
    assert await listed(storage, "") == sorted(keys)


async def test_names_with_quotes_and_backslashes_are_escaped_in_queries(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    key = "it's a \u00e7ay/o'reilly and 'x' in parents.rbk"
    await storage.put_bytes(key, b"quoted")
    assert await storage.get_bytes(key) == b"quoted"
    assert await listed(storage, "it's") == [key]
    assert drive.folder_creates == ["it's a \u00e7ay"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "a/../b", "./a", "a\\b", "a\x00b"])
async def test_bad_keys_are_refused(drive: FakeDrive, root: str, sa_info: dict[str, str], key: str) -> None:
    storage = make_storage(drive, root, sa_info)
    for attempt in (storage.open_writer(key), storage.get_bytes(key), storage.delete(key)):
        with pytest.raises(StorageError) as err:
            await attempt
        assert err.value.code == "bad_key"
    assert drive.folder_creates == []


# ---------------------------------------------------------------- probe and credentials


async def test_probe_writes_reads_and_deletes(drive: FakeDrive, root: str, sa_info: dict[str, str]) -> None:
    storage = make_storage(drive, root, sa_info)
    await storage.probe()
    assert drive.all_files() == []
    assert drive.token_grants == 1


async def test_probe_with_a_wrong_private_key_is_auth_failed(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    other = FakeDrive().add_service_account(SA_EMAIL)  # same e-mail, a key Google never issued
    forged = {**sa_info, "private_key": other["private_key"]}
    storage = make_storage(drive, root, forged)
    with pytest.raises(StorageError) as err:
        await storage.probe()
    assert err.value.code == "auth_failed"
    assert "invalid_grant" in err.value.message
    assert "PRIVATE KEY" not in err.value.message and other["private_key"][40:80] not in err.value.message


async def test_probe_of_a_missing_folder_is_folder_missing(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, "1NoSuchFolder", sa_info)
    with pytest.raises(StorageError) as err:
        await storage.probe()
    assert err.value.code == "folder_missing"
    assert "1NoSuchFolder" in err.value.message and SA_EMAIL in err.value.message


async def test_probe_of_a_file_id_is_not_a_folder(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    storage = make_storage(drive, root, sa_info)
    await storage.put_bytes("plain.txt", b"x")
    file_id = drive.at_path(root, "plain.txt")[0].id
    with pytest.raises(StorageError) as err:
        await make_storage(drive, file_id, sa_info).probe()
    assert err.value.code == "not_a_folder"


async def test_probe_of_a_read_only_folder_is_permission_denied(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    drive.read_only_folders.add(root)
    storage = make_storage(drive, root, sa_info)
    with pytest.raises(StorageError) as err:
        await storage.probe()
    assert err.value.code == "permission_denied"
    assert "cannot create a test file" in err.value.message and SA_EMAIL in err.value.message


async def test_probe_of_an_unreachable_endpoint_is_unreachable(sa_info: dict[str, str]) -> None:
    port = free_port()  # nothing listens there
    info = {**sa_info, "token_uri": f"http://127.0.0.1:{port}/token"}
    storage = GDriveStorage.from_settings(
        {"folder_id": "root", "api_endpoint": f"http://127.0.0.1:{port}/drive/v3/"},
        {"service_account_json": json.dumps(info)},
    )
    storage.api_retries = 0  # the library's backoff (up to 30 s) is not what this test is about
    with pytest.raises(StorageError) as err:
        await storage.probe()
    assert err.value.code == "unreachable"
    assert "cannot reach Google" in err.value.message


async def test_oauth_client_mode(drive: FakeDrive, root: str) -> None:
    drive.add_oauth_client("client-1.apps.googleusercontent.com", "client-secret-1", "1//refresh-token-1")
    good = {"client_secret": "client-secret-1", "refresh_token": "1//refresh-token-1"}
    oauth = settings(
        drive,
        root,
        auth_mode="oauth",
        client_id="client-1.apps.googleusercontent.com",
        token_uri=drive.token_uri,
    )
    storage = GDriveStorage.from_settings(oauth, good)
    await storage.probe()
    await storage.put_bytes("db/x.rbk", b"via oauth")
    assert drive.content(root, "db/x.rbk") == b"via oauth"

    revoked = GDriveStorage.from_settings(oauth, {**good, "refresh_token": "1//revoked-token"})
    with pytest.raises(StorageError) as err:
        await revoked.probe()
    assert err.value.code == "auth_failed"
    assert "revoked-token" not in err.value.message and "client-secret-1" not in err.value.message


@pytest.mark.parametrize(
    ("extra", "secrets", "needle"),
    [
        ({}, {}, "service_account_json"),
        ({}, {"service_account_json": "{not json"}, "not valid JSON"),
        ({}, {"service_account_json": '{"type": "authorized_user"}'}, "service_account"),
        ({"auth_mode": "oauth"}, {"client_secret": "s"}, "client_id, client_secret and refresh_token"),
        ({"auth_mode": "ldap"}, {}, "auth_mode"),
        ({"chunk_size": 1000}, {"service_account_json": "{}"}, "256 KiB"),
    ],
)
def test_bad_settings(extra: dict[str, Any], secrets: dict[str, str], needle: str) -> None:
    with pytest.raises(StorageError) as err:
        GDriveStorage.from_settings({"folder_id": "f", **extra}, secrets)
    assert err.value.code == "bad_settings"
    assert needle in err.value.message


def test_an_unreadable_private_key_is_not_quoted(sa_info: dict[str, str]) -> None:
    broken = {**sa_info, "private_key": "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END"}
    with pytest.raises(StorageError) as err:
        GDriveStorage.from_settings({"folder_id": "f"}, {"service_account_json": json.dumps(broken)})
    assert err.value.code == "bad_settings"
    assert "c2VjcmV0" not in err.value.message


async def test_registry_builds_the_drive_storage(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    target = StorageTarget(name="drive", kind="gdrive", settings=settings(drive, root))
    storage = get_storage(target, {"service_account_json": json.dumps(sa_info)})
    assert isinstance(storage, GDriveStorage)
    await storage.probe()


# ---------------------------------------------------------------- through the real pipeline


async def test_backup_and_restore_through_the_pipeline(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    rows = b"".join(b"INSERT INTO t VALUES (%d, 'row %d');\n" % (i, i) for i in range(40_000))
    dump = os.urandom(1_200_000) + rows
    job_key = os.urandom(32)

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(dump), 65_536):
            yield dump[i : i + 65_536]

    storage = make_storage(drive, root, sa_info)
    drive.faults = [Fault("short_ack", keep=CHUNK), Fault("partial_503", keep=70_000)]  # and it resumes
    writer = await storage.open_writer(KEY)
    try:
        result = await run_backup_pipeline(
            source(), writer, compression="zstd", level=3, job_key=job_key, key_id="job-1"
        )
    except BaseException:
        await writer.abort()
        raise
    await writer.commit()

    stored = drive.content(root, KEY)
    assert result.artifact_size == len(stored) > 2 * CHUNK
    assert result.artifact_sha256 == hashlib.sha256(stored).hexdigest()
    restored = bytearray()
    async for piece in restore_stream(
        make_storage(drive, root, sa_info).read(KEY),
        compression="zstd",
        job_key_lookup=job_key,
        expected_artifact_sha256=result.artifact_sha256,
        expected_dump_sha256=result.dump_sha256,
    ):
        restored += piece
    assert bytes(restored) == dump


async def test_a_failing_pipeline_leaves_no_file(
    drive: FakeDrive, root: str, sa_info: dict[str, str]
) -> None:
    async def broken_dump() -> AsyncIterator[bytes]:
        yield os.urandom(3 * CHUNK)
        raise RuntimeError("pg_dump exited with 1")

    storage = make_storage(drive, root, sa_info)
    writer = await storage.open_writer(KEY)
    with pytest.raises(RuntimeError):
        try:
            await run_backup_pipeline(
                broken_dump(), writer, compression="none", level=0, job_key=None, key_id=None
            )
        except BaseException:
            await writer.abort()
            raise
    assert drive.all_files() == []
    assert drive.sessions == {}
    assert all(f.mime_type == FOLDER_MIME for f in drive.files.values())
