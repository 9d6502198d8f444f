"""Customer-held keys on the agent host: the keyring file, the `keys` CLI, a key command, and what a
backup or restore does when the key is missing or is not the one the control plane recorded."""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import stat
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_agent import jobs
from rahatback_agent import keyring as keyring_module
from rahatback_agent.decrypt import decrypt_main
from rahatback_agent.keyring import Keyring, KeyringError, fingerprint
from rahatback_agent.main import main
from rahatback_contracts import messages as m

AGENT = uuid.uuid4().hex
PRIVATE = X25519PrivateKey.generate()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def envelope() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "command_id": uuid.uuid4().hex,
        "org_id": "o",
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
    }


def test_fingerprint_is_domain_separated_and_binds_the_key_id() -> None:
    key = bytes(range(32))
    fp = fingerprint("ck-1", key)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert fp == fingerprint("ck-1", key)
    assert fp != fingerprint("ck-2", key) and fp != fingerprint("ck-1", bytes(32))
    assert key.hex() not in fp


def test_create_list_export_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "agent.json"
    monkeypatch.setenv("RAHATBACK_AGENT_CONFIG", str(config))
    assert main(["keys", "create", "--name", "nightly"]) == 0
    out = capsys.readouterr().out
    key_id = re.findall(r"created backup key (\S+)", out)[0]
    keyring = tmp_path / "agent.keys.json"
    assert mode(keyring) == 0o600
    stored = json.loads(keyring.read_text())["keys"]
    assert [k["key_id"] for k in stored] == [key_id]
    raw = base64.b64decode(stored[0]["key_b64"])
    assert f"fingerprint {fingerprint(key_id, raw)}" in out
    assert stored[0]["key_b64"] not in out and raw.hex() not in out  # the key itself is never printed
    assert "export a copy for safekeeping" in out

    assert main(["keys", "create"]) == 0
    second = re.findall(r"created backup key (\S+)", capsys.readouterr().out)[0]
    assert main(["keys", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in listed] == [
        [key_id, fingerprint(key_id, raw), "keyring"],
        [second, Keyring(keyring).infos()[1].fingerprint, "keyring"],
    ]
    assert "nightly" in listed[0]

    out_file = tmp_path / "safe" / "nightly.key"
    assert main(["keys", "export", key_id, "--out", str(out_file)]) == 0
    said = capsys.readouterr().out
    assert "offline recovery" in said and str(out_file) in said
    assert mode(out_file) == 0o600
    exported = json.loads(out_file.read_text())
    assert exported == {
        "format": "rahatback-backup-key",
        "version": 1,
        "custody": "customer",
        "key_id": key_id,
        "fingerprint": fingerprint(key_id, raw),
        "key_b64": base64.b64encode(raw).decode(),
    }
    # an export never overwrites, and an unknown id says what to do
    assert main(["keys", "export", key_id, "--out", str(out_file)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["keys", "export", "ck-nope", "--out", str(tmp_path / "x")]) == 1
    assert "does not hold backup key 'ck-nope'" in capsys.readouterr().err


def test_a_keyring_readable_by_others_is_refused(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "agent.keys.json")
    info = keyring.create()
    os.chmod(keyring.path, 0o644)
    with pytest.raises(KeyringError, match=r"readable by other users .*chmod 600"):
        keyring.key(info.key_id)
    assert keyring.held() == []  # the heartbeat reports nothing rather than failing
    os.chmod(keyring.path, 0o600)
    assert [h.key_id for h in keyring.held()] == [info.key_id]


def test_keys_from_a_key_file_and_a_key_command(tmp_path: Path) -> None:
    vault_key = os.urandom(32)
    script = tmp_path / "vault-get"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, base64\n"
        "if sys.argv[1] != 'vault-1':\n"
        "    sys.exit('no such secret: ' + sys.argv[1])\n"
        f"print(base64.b64encode(bytes.fromhex('{vault_key.hex()}')).decode())\n"
    )
    script.chmod(0o700)
    source = Keyring(tmp_path / "other.keys.json")
    made = source.create()
    exported = tmp_path / "one.key"
    source.export(made.key_id, exported)

    keyring = Keyring(
        tmp_path / "agent.keys.json",
        key_file=exported,
        key_command=str(script),
        key_command_ids=["vault-1", "vault-2"],
    )
    assert keyring.key("vault-1") == vault_key
    held = {h.key_id: h.fingerprint for h in keyring.held()}
    assert held == {made.key_id: made.fingerprint, "vault-1": fingerprint("vault-1", vault_key)}
    with pytest.raises(KeyringError, match="exited with 1: no such secret: vault-2"):
        keyring.key("vault-2")
    assert keyring.key(made.key_id) == source.key(made.key_id)


def test_the_key_command_runs_once_per_key_and_a_failure_is_retried_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat asks for held keys every few seconds: a vault script must not run every time,
    a key it gave once stays reported when the vault fails later, and a failing script is retried
    by the heartbeat only after a pause (a job that needs the key asks at once)."""
    vault_key = os.urandom(32)
    calls, vault_down = tmp_path / "calls", tmp_path / "vault-down"
    script = tmp_path / "vault-get"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys, base64, pathlib\n"
        f"with open({str(calls)!r}, 'a') as f: f.write(sys.argv[1] + '\\n')\n"
        f"if pathlib.Path({str(vault_down)!r}).exists(): sys.exit('vault sealed')\n"
        f"print(base64.b64encode(bytes.fromhex('{vault_key.hex()}')).decode())\n"
    )
    script.chmod(0o700)
    keyring = Keyring(tmp_path / "agent.keys.json", key_command=str(script), key_command_ids=["v-1", "v-2"])
    clock = [1000.0]
    monkeypatch.setattr(keyring_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))

    def ran() -> list[str]:
        return calls.read_text().split() if calls.exists() else []

    expected = {"v-1": fingerprint("v-1", vault_key), "v-2": fingerprint("v-2", vault_key)}
    for _ in range(5):
        assert {h.key_id: h.fingerprint for h in keyring.held()} == expected
    assert sorted(ran()) == ["v-1", "v-2"]
    vault_down.touch()  # a vault that fails now: the keys it gave stay reported, nothing runs
    assert {h.key_id: h.fingerprint for h in keyring.held()} == expected
    assert keyring.job_key("v-1", expected["v-1"]) == vault_key and len(ran()) == 2

    # a key the vault failed to give: the heartbeat tries once, then waits before trying again
    fresh = Keyring(tmp_path / "agent.keys.json", key_command=str(script), key_command_ids=["v-3"])
    for _ in range(5):
        assert fresh.held() == []
    assert ran().count("v-3") == 1
    with pytest.raises(KeyringError, match="exited with 1: vault sealed"):
        fresh.key("v-3")  # a job asks at once
    assert ran().count("v-3") == 2
    vault_down.unlink()
    assert fresh.held() == []  # within the pause
    clock[0] += keyring_module.KEY_COMMAND_RETRY_SECONDS
    assert [h.key_id for h in fresh.held()] == ["v-3"]
    assert [h.key_id for h in fresh.held()] == ["v-3"] and ran().count("v-3") == 3


def test_fingerprint_mismatch_and_missing_key_are_clear_errors(tmp_path: Path) -> None:
    keyring = Keyring(tmp_path / "agent.keys.json")
    info = keyring.create()
    assert keyring.job_key(info.key_id, info.fingerprint) == keyring.key(info.key_id)
    with pytest.raises(KeyringError, match=r"expects 0{32}: this is a different key under the same id"):
        keyring.job_key(info.key_id, "0" * 32)
    with pytest.raises(KeyringError, match="does not hold backup key 'ck-gone'"):
        keyring.job_key("ck-gone", None)


def make_database(path: Path, marker: str) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("create table notes (id integer primary key, body text)")
        conn.executemany("insert into notes (body) values (?)", [(f"{marker} {i}",) for i in range(200)])


def customer(key_id: str, fp: str | None) -> m.EncryptionSpec:
    return m.EncryptionSpec(enabled=True, key_id=key_id, custody="customer", fingerprint=fp)


async def backup(
    tmp_path: Path, source: Path, encryption: m.EncryptionSpec, keyring: Keyring | None
) -> m.BackupCompleted | m.BackupFailed:
    run_id = uuid.uuid4().hex
    command = m.BackupCommand(
        **envelope(),
        run_id=run_id,
        job_id="j",
        database=m.DatabaseTarget(name="shop", engine="sqlite", settings={"path": str(source)}),
        storage=m.StorageTarget(name="nas", kind="local", settings={"path": str(tmp_path / "store")}),
        encryption=encryption,
    )
    progress = jobs.ProgressState(kind="backup", run_id=run_id)
    return await jobs.run_backup(
        command, agent_id=AGENT, private_key=PRIVATE, progress=progress, keyring=keyring
    )


async def restore(
    tmp_path: Path, storage_key: str, target: Path, encryption: m.EncryptionSpec, keyring: Keyring
) -> m.RestoreCompleted | m.RestoreFailed:
    restore_id = uuid.uuid4().hex
    command = m.RestoreCommand(
        **envelope(),
        restore_id=restore_id,
        backup_run_id="r",
        database=m.DatabaseTarget(name="shop", engine="sqlite", settings={"path": str(target)}),
        storage=m.StorageTarget(name="nas", kind="local", settings={"path": str(tmp_path / "store")}),
        storage_key=storage_key,
        compression="zstd",
        encrypted=True,
        encryption=encryption,
    )
    progress = jobs.ProgressState(kind="restore", run_id=restore_id)
    return await jobs.run_restore(
        command, agent_id=AGENT, private_key=PRIVATE, progress=progress, keyring=keyring
    )


async def test_backup_and_restore_with_a_customer_key_and_the_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "shop.db"
    make_database(source, "kiwi-marker")
    keyring = Keyring(tmp_path / "agent.keys.json")
    info = keyring.create()
    (tmp_path / "store").mkdir()

    missing = await backup(tmp_path, source, customer("ck-elsewhere", "1" * 32), keyring)
    assert isinstance(missing, m.BackupFailed)
    assert "this agent does not hold backup key 'ck-elsewhere'" in missing.error
    differs = await backup(tmp_path, source, customer(info.key_id, "1" * 32), keyring)
    assert isinstance(differs, m.BackupFailed)
    assert f"has fingerprint {info.fingerprint}, but the control plane expects {'1' * 32}" in differs.error
    no_keyring = await backup(tmp_path, source, customer(info.key_id, info.fingerprint), None)
    assert isinstance(no_keyring, m.BackupFailed) and "has no keyring" in no_keyring.error
    assert not any((tmp_path / "store").rglob("*"))  # refused before anything was written

    done = await backup(tmp_path, source, customer(info.key_id, info.fingerprint), keyring)
    assert isinstance(done, m.BackupCompleted), done
    artifact = tmp_path / "store" / (done.storage_key or "")
    manifest = json.loads(artifact.with_name(artifact.name + ".manifest.json").read_text())
    assert (manifest["key_id"], manifest["encrypted"]) == (info.key_id, True)
    assert b"kiwi-marker" not in artifact.read_bytes()

    restored = tmp_path / "restored.db"
    ok = await restore(
        tmp_path, done.storage_key or "", restored, customer(info.key_id, info.fingerprint), keyring
    )
    assert isinstance(ok, m.RestoreCompleted), ok
    with sqlite3.connect(restored) as conn:
        assert conn.execute("select count(*) from notes where body like 'kiwi-marker%'").fetchone() == (200,)

    other = Keyring(tmp_path / "other.keys.json")
    refused = await restore(
        tmp_path, done.storage_key or "", tmp_path / "nope.db", customer(info.key_id, info.fingerprint), other
    )
    assert isinstance(refused, m.RestoreFailed)
    assert f"this agent does not hold backup key {info.key_id!r}" in refused.error
    assert not (tmp_path / "nope.db").exists()

    # offline: the customer export decrypts; another key's export is named as the wrong one
    exported = tmp_path / "mine.key"
    keyring.export(info.key_id, exported)
    out = tmp_path / "dump.sql"
    assert decrypt_main([str(artifact), "--key", f"@{exported}", "--out", str(out)]) == 0
    assert b"kiwi-marker 199" in out.read_bytes()
    wrong = tmp_path / "wrong.key"
    other.export(other.create().key_id, wrong)
    capsys.readouterr()
    assert decrypt_main([str(artifact), "--key", f"@{wrong}", "--out", str(tmp_path / "x.sql")]) == 2
    err = capsys.readouterr().err
    assert f"the artifact was encrypted with key id {info.key_id!r}, but the key file" in err
    assert f"use the key exported for {info.key_id!r}" in err
    # the whole keyring works as a key file too (the key is picked by the artifact's key id)
    assert decrypt_main([str(artifact), "--key", f"@{keyring.path}", "--out", str(tmp_path / "k.sql")]) == 0


def test_decrypt_takes_the_apis_managed_export_as_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from rahatback_agent.pipeline import run_backup_pipeline
    from rahatback_agent.storages.local import LocalStorage

    key = os.urandom(32)

    async def make() -> None:
        async def source() -> Any:
            yield b"managed-marker " * 1000

        writer = await LocalStorage(tmp_path).open_writer("a.sql.zst.rbk")
        await run_backup_pipeline(source(), writer, compression="zstd", level=3, job_key=key, key_id="job1:2")
        await writer.commit()

    asyncio.run(make())
    managed = tmp_path / "job1-2.json"  # the body of POST /v1/backups/keys/job1:2/export, saved
    managed.write_text(json.dumps({"key_id": "job1:2", "key_b64": base64.b64encode(key).decode()}))
    out = tmp_path / "a.sql"
    assert decrypt_main([str(tmp_path / "a.sql.zst.rbk"), "--key", f"@{managed}", "--out", str(out)]) == 0
    assert out.read_bytes() == b"managed-marker " * 1000
    managed.write_text(json.dumps({"key_id": "job1:1", "key_b64": base64.b64encode(key).decode()}))
    assert decrypt_main([str(tmp_path / "a.sql.zst.rbk"), "--key", f"@{managed}", "--out", str(out)]) == 2
    assert "encrypted with key id 'job1:2', but the key file" in capsys.readouterr().err
