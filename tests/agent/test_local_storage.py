"""Local folder storage: complete files only, keys confined to the root, honest probe errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rahatback_agent.storages.base import StorageError
from rahatback_agent.storages.local import LocalStorage


def visible_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def test_commit_produces_exact_bytes_under_the_key(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    data = os.urandom(3 * (1 << 20) + 17)
    writer = await storage.open_writer("shop/2026/11/26/shop_x.sql.zst.rbk")
    for i in range(0, len(data), 500_000):
        await writer.write(data[i : i + 500_000])
    # Until commit, nothing is visible under the final name.
    assert not (tmp_path / "shop/2026/11/26/shop_x.sql.zst.rbk").exists()
    await writer.commit()
    assert (tmp_path / "shop/2026/11/26/shop_x.sql.zst.rbk").read_bytes() == data
    assert visible_files(tmp_path) == ["shop/2026/11/26/shop_x.sql.zst.rbk"]
    assert await storage.get_bytes("shop/2026/11/26/shop_x.sql.zst.rbk") == data
    chunks = [c async for c in storage.read("shop/2026/11/26/shop_x.sql.zst.rbk")]
    assert max(len(c) for c in chunks) == 1 << 20
    assert b"".join(chunks) == data


async def test_abort_leaves_no_file(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    writer = await storage.open_writer("db/a.rbk")
    await writer.write(b"partial backup")
    await writer.abort()
    assert visible_files(tmp_path) == []
    with pytest.raises(StorageError) as err:
        await writer.write(b"more")
    assert err.value.code == "closed"


async def test_commit_replaces_an_existing_object_atomically(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put_bytes("m.json", b"old")
    writer = await storage.open_writer("m.json")
    await writer.write(b"new")
    assert (tmp_path / "m.json").read_bytes() == b"old"
    await writer.commit()
    assert (tmp_path / "m.json").read_bytes() == b"new"


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../escape",
        "/etc/passwd",
        "",
        "a//b",
        "./a",
        "a/.",
        "a\\..\\b",
        "a\x00b",
        "x/.rahatback-tmp-y",
    ],
)
async def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "root")
    (tmp_path / "root").mkdir()
    for attempt in (
        storage.open_writer(key),
        storage.put_bytes(key, b"x"),
        storage.get_bytes(key),
        storage.delete(key),
    ):
        with pytest.raises(StorageError) as err:
            await attempt
        assert err.value.code == "bad_key"
    assert visible_files(tmp_path) == []


async def test_missing_object_is_not_found(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(StorageError) as err:
        await storage.get_bytes("nope/x.rbk")
    assert err.value.code == "not_found"
    assert "nope/x.rbk" in err.value.message


async def test_delete_is_idempotent(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await storage.put_bytes("a/b", b"1")
    await storage.delete("a/b")
    await storage.delete("a/b")
    assert visible_files(tmp_path) == []


async def test_probe_succeeds_and_cleans_up(tmp_path: Path) -> None:
    await LocalStorage(tmp_path).probe()
    assert visible_files(tmp_path) == []


async def test_probe_reports_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as err:
        await LocalStorage(tmp_path / "not-mounted").probe()
    assert err.value.code == "folder_missing"
    assert "not-mounted" in err.value.message
    with pytest.raises(StorageError) as err:
        await LocalStorage(tmp_path / "not-mounted").open_writer("a")
    assert err.value.code == "folder_missing"


async def test_probe_reports_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError) as err:
        await LocalStorage(tmp_path / "file").probe()
    assert err.value.code == "not_a_folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
async def test_probe_reports_a_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(StorageError) as err:
            await LocalStorage(ro).probe()
        assert err.value.code == "not_writable"
    finally:
        ro.chmod(0o755)


async def test_probe_reports_an_unwritable_folder_even_as_root() -> None:
    # /proc/self is a folder nobody can create files in, root included.
    with pytest.raises(StorageError) as err:
        await LocalStorage(Path("/proc/self")).probe()
    assert err.value.code == "not_writable"
    assert "cannot write to '/proc/self'" in err.value.message
    assert "does not exist" not in err.value.message


def test_from_settings(tmp_path: Path) -> None:
    assert LocalStorage.from_settings({"path": str(tmp_path)}).root == tmp_path
    for bad in ({}, {"path": ""}, {"path": "relative/dir"}, {"path": 3}):
        with pytest.raises(StorageError) as err:
            LocalStorage.from_settings(bad)
        assert err.value.code == "bad_settings"
