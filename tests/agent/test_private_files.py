"""The one way the agent writes a file only its user may read (identity, keyring, replay cache,
scratch registry): 0600 whatever the umask, and all or nothing."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from rahatback_agent import private_files
from rahatback_agent.private_files import write_private_atomic


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
def test_the_file_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "agent.keys.json"
    write_private_atomic(fresh, '{"keys": []}\n')
    assert fresh.read_text() == '{"keys": []}\n' and mode(fresh) == 0o600
    assert mode(fresh.parent) == 0o700  # a folder it had to create is the user's alone too

    # replacing a file someone made world-readable: the new one is 0600 again
    shared = tmp_path / "agent.json"
    shared.write_bytes(b"old")
    shared.chmod(0o644)
    write_private_atomic(shared, b"new \xe2\x9c\x93")
    assert shared.read_bytes() == b"new \xe2\x9c\x93" and mode(shared) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.json", "new"]  # no temp file left


def test_a_failed_write_leaves_the_old_content_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "agent.commands.json"
    write_private_atomic(target, "old content")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(private_files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_private_atomic(target, "new content " * 1000)
    assert target.read_text() == "old content" and mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["agent.commands.json"]
