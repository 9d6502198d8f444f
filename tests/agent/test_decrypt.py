"""The offline `decrypt` command: the file plus the key give back the dump, or a clear failure."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest
from rahatback_agent.decrypt import decrypt_main
from rahatback_agent.pipeline import Manifest, PipelineResult, artifact_extension, run_backup_pipeline
from rahatback_agent.storages.local import LocalStorage

JOB_KEY = os.urandom(32)
KEY_B64 = base64.b64encode(JOB_KEY).decode()
ROWS = b"".join(b"INSERT INTO shop VALUES (%d, 'item %d');\n" % (i, i) for i in range(80_000))
DUMP = ROWS + os.urandom(50_000)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def make(
    folder: Path, compression: Literal["zstd", "gzip", "none"], encrypted: bool
) -> tuple[Path, PipelineResult]:
    name = f"shop.sql{artifact_extension(compression, encrypted)}"
    storage = LocalStorage(folder)

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(DUMP), 100_000):
            yield DUMP[i : i + 100_000]

    writer = await storage.open_writer(name)
    result = await run_backup_pipeline(
        source(),
        writer,
        compression=compression,
        level=3 if compression != "gzip" else 6,
        job_key=JOB_KEY if encrypted else None,
        key_id="job-9" if encrypted else None,
    )
    await writer.commit()
    return folder / name, result


def write_manifest(artifact: Path, result: PipelineResult, **changes: object) -> None:
    manifest = Manifest(
        run_id="r",
        engine="postgresql",
        server_version="15",
        dump_format="postgresql-plain-sql",
        database_name="shop",
        compression="zstd",
        encrypted=True,
        key_id="job-9",
        dump_size=result.dump_size,
        artifact_size=result.artifact_size,
        dump_sha256=result.dump_sha256,
        artifact_sha256=result.artifact_sha256,
        agent_version="0.1.0",
        created_at=datetime.now(UTC),
    ).model_copy(update=changes)
    artifact.with_name(artifact.name + ".manifest.json").write_bytes(manifest.to_json())


@pytest.mark.parametrize("compression", ["zstd", "gzip", "none"])
@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
async def test_round_trip_to_file(
    tmp_path: Path, compression: Literal["zstd", "gzip", "none"], encrypted: bool
) -> None:
    artifact, _ = await make(tmp_path, compression, encrypted)
    out = tmp_path / "restored.sql"
    args = [str(artifact), "--out", str(out)] + (["--key", KEY_B64] if encrypted else [])
    assert decrypt_main(args) == 0
    assert out.read_bytes() == DUMP


async def test_key_from_file_and_manifest_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact, result = await make(tmp_path, "zstd", True)
    write_manifest(artifact, result)
    key_file = tmp_path / "job.key"
    key_file.write_text(KEY_B64 + "\n")
    out = tmp_path / "restored.sql"
    assert decrypt_main([str(artifact), "--key", f"@{key_file}", "--out", str(out)]) == 0
    assert out.read_bytes() == DUMP
    assert "checksums match the manifest" in capsys.readouterr().err


async def test_manifest_mismatch_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact, result = await make(tmp_path, "zstd", True)
    write_manifest(artifact, result, dump_sha256="0" * 64)
    out = tmp_path / "restored.sql"
    assert decrypt_main([str(artifact), "--key", KEY_B64, "--out", str(out)]) == 1
    assert "dump checksum mismatch" in capsys.readouterr().err
    assert not out.exists()
    assert names(tmp_path) == sorted([artifact.name, artifact.name + ".manifest.json"])


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    code = (
        "import sys; from rahatback_agent.decrypt import decrypt_main; sys.exit(decrypt_main(sys.argv[1:]))"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120, check=False)


async def test_cli_tampered_artifact_exit_1_and_no_partial_output(tmp_path: Path) -> None:
    artifact, _ = await make(tmp_path, "zstd", True)
    data = bytearray(artifact.read_bytes())
    data[-3] ^= 0x01  # inside the final chunk's tag: everything before it authenticates
    artifact.write_bytes(bytes(data))
    out = tmp_path / "restored.sql"
    proc = run_cli(str(artifact), "--key", KEY_B64, "--out", str(out))
    assert proc.returncode == 1
    assert b"failed authentication: tampered or wrong key" in proc.stderr
    assert not out.exists()
    assert names(tmp_path) == [artifact.name]


async def test_cli_truncated_and_wrong_key(tmp_path: Path) -> None:
    artifact, _ = await make(tmp_path, "gzip", True)
    full = artifact.read_bytes()
    artifact.write_bytes(full[: len(full) // 2])
    proc = run_cli(str(artifact), "--key", KEY_B64, "--out", str(tmp_path / "o.sql"))
    assert proc.returncode == 1
    assert b"artifact is truncated" in proc.stderr
    assert not (tmp_path / "o.sql").exists()

    artifact.write_bytes(full)
    wrong = base64.b64encode(os.urandom(32)).decode()
    proc = run_cli(str(artifact), "--key", wrong)
    assert proc.returncode == 1
    assert b"wrong key" in proc.stderr and b"job-9" in proc.stderr
    assert wrong.encode() not in proc.stderr

    proc = run_cli(str(artifact))
    assert proc.returncode == 2
    assert b"encrypted (key id 'job-9'); pass --key" in proc.stderr


async def test_cli_stdout(tmp_path: Path) -> None:
    artifact, _ = await make(tmp_path, "zstd", True)
    proc = run_cli(str(artifact), "--key", KEY_B64, "--out", "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == DUMP


def test_bad_key_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    artifact = tmp_path / "a.rbk"
    artifact.write_bytes(b"RBK1" + bytes(200))
    assert decrypt_main([str(artifact), "--key", "not base64!!"]) == 2
    assert "not valid base64" in capsys.readouterr().err
    assert decrypt_main([str(artifact), "--key", base64.b64encode(b"short").decode()]) == 2
    assert "exactly 32 bytes" in capsys.readouterr().err
    assert decrypt_main([str(tmp_path / "missing.rbk"), "--key", KEY_B64]) == 2
