"""Files only the agent's user may read: the identity, the keyring and key exports, the replay cache,
the scratch registry. They hold private keys or decide what the agent obeys, so each is replaced
whole and is never readable by anyone else, not even for a moment."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_private_atomic"]


def write_private_atomic(path: Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8).

    Mode 0600 from the first byte whatever the umask (the temp file is chmod-ed before anything is
    written); temp file in the same folder, fsync, rename over the old file, fsync of the folder. A
    reader or a crash sees the old content or the new, never half of it; a failed write leaves the
    old file as it was and no temp file behind, and raises the OSError."""
    path = path.expanduser()
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # makes the rename itself survive a power loss
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
