"""Customer-held keys end to end, through the real processes (nats-server, API, agent).

The key is made on the agent host with `rahatback-agent keys create`; a backup and a restore of a
database holding a distinctive marker run while a NATS subscriber on `>` records every message.
Then every recorded message, every file of the JetStream store and the API's SQLite files are
scanned for the key (raw, base64, hex) and the marker: none may hold either. The same scan finds
the marker in the dump decrypted offline with the exported key, so it is able to fail. Rotation:
backup, rotate to a new key, backup, both backups restore.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from scripts.devstack import BIN
from tests.e2e.conftest import Client, sqlite_and_folder
from tests.e2e.test_core_flows import NatsTap, wait_status

pytestmark = pytest.mark.e2e

MARKER = f"zebra-{secrets.token_hex(8)}"


def agent_cli(stack: Client, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "rahatback-agent"), *args], env=stack.stack.env, capture_output=True, text=True, check=True
    )
    return done.stdout


def create_key(stack: Client) -> tuple[str, bytes]:
    """A key made on the agent host; the test plays the customer, who can read their own keyring."""
    out = agent_cli(stack, "keys", "create", "--name", "e2e")
    key_id = re.findall(r"created backup key (\S+)", out)[0]
    keyring = Path(stack.stack.env["RAHATBACK_AGENT_CONFIG"]).with_name("agent.keys.json")
    (entry,) = [k for k in json.loads(keyring.read_text())["keys"] if k["key_id"] == key_id]
    key = base64.b64decode(entry["key_b64"])
    assert entry["key_b64"] not in out
    # the running agent reports it in its next heartbeat
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = {k["key_id"]: k for k in stack.ok("GET", "/v1/keys")}
        if key_id in listed and listed[key_id]["holders"]:
            return key_id, key
        time.sleep(0.5)
    raise AssertionError(f"the agent never reported key {key_id}")


def forms(key: bytes) -> list[bytes]:
    """Every way the key could be written down in a message, a row or a file."""
    return [
        key,
        base64.b64encode(key),
        base64.urlsafe_b64encode(key),
        base64.b64encode(key).rstrip(b"="),
        key.hex().encode(),
        key.hex().upper().encode(),
    ]


def findings(blobs: dict[str, bytes], needles: dict[str, bytes]) -> list[str]:
    return [f"{what} in {where}" for where, blob in blobs.items() for what, n in needles.items() if n in blob]


def backup_and_wait(stack: Client, job_id: str) -> dict[str, Any]:
    run = stack.ok("POST", f"/v1/backups/jobs/{job_id}/run")
    run = wait_status(stack, f"/v1/backups/history/{run['id']}", {"completed", "failed"})
    assert run["status"] == "completed", run["error"]
    return run


def restore_and_check(stack: Client, run: dict[str, Any], tmp_path: Path, agent_id: str) -> None:
    suffix = secrets.token_hex(4)
    path = tmp_path / f"restored-{suffix}.db"
    target = stack.ok(
        "POST",
        "/v1/databases",
        {
            "name": f"restored-{suffix}",
            "engine": "sqlite",
            "agent_id": agent_id,
            "settings": {"path": str(path)},
        },
    )
    restore = stack.ok("POST", f"/v1/backups/history/{run['id']}/restore", {"database_id": target["id"]})
    restore = wait_status(stack, f"/v1/backups/restores/{restore['id']}", {"completed", "failed"})
    assert restore["status"] == "completed", restore["error"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("select count(*) from secrets where body like ?", (f"{MARKER}%",)).fetchone() == (
            300,
        )


def test_customer_key_and_data_never_reach_the_control_plane_or_nats(stack: Client, tmp_path: Path) -> None:
    setup = sqlite_and_folder(stack, tmp_path, "vault")
    with sqlite3.connect(setup.source) as conn:
        conn.execute("create table secrets (id integer primary key, body text)")
        conn.executemany(
            "insert into secrets (body) values (?)", [(f"{MARKER} row {i}",) for i in range(300)]
        )
    agent_id = setup.database["agent_id"]

    with NatsTap(stack.stack.nats_url) as tap:
        key_id, key = create_key(stack)
        job = stack.ok(
            "POST",
            "/v1/backups/jobs",
            {
                "name": "vault-nightly",
                "database_id": setup.database["id"],
                "storage_id": setup.storage["id"],
                "key_custody": "customer",
                "customer_key_id": key_id,
            },
        )
        assert (job["key_custody"], job["key_id"]) == ("customer", key_id)
        first = backup_and_wait(stack, job["id"])
        assert (first["key_id"], first["key_custody"]) == (key_id, "customer")
        restore_and_check(stack, first, tmp_path, agent_id)

        # rotation: new backups use the new key, the old backup stays restorable with the old one
        new_id, new_key = create_key(stack)
        rotated = stack.ok("POST", f"/v1/backups/jobs/{job['id']}/rotate-key", {"customer_key_id": new_id})
        assert rotated["key_id"] == new_id
        second = backup_and_wait(stack, job["id"])
        assert second["key_id"] == new_id
        restore_and_check(stack, second, tmp_path, agent_id)
        restore_and_check(stack, first, tmp_path, agent_id)
        # verification also runs on the agent holding the key (the old one, after rotation)
        verify = stack.ok("POST", f"/v1/backups/history/{first['id']}/verify", {"level": "integrity"})
        verify = wait_status(stack, f"/v1/backups/verifications/{verify['id']}", {"completed", "failed"})
        assert verify["status"] == "completed", verify["error"]

    # the control plane cannot export a customer key
    refused = stack.call("POST", f"/v1/backups/keys/{key_id}/export")
    assert refused.status_code == 409 and "rahatback-agent keys export" in refused.json()["detail"]

    needles = {f"key {i} form {n}": f for i, k in enumerate((key, new_key)) for n, f in enumerate(forms(k))}
    needles["marker"] = MARKER.encode()
    assert len(tap.bodies) > 20, "the tap saw (almost) no traffic"
    traffic = {f"NATS message {i}": body for i, body in enumerate(tap.bodies)}
    assert any(b"keys" in body and key_id.encode() in body for body in tap.bodies), (
        "no heartbeat with key ids"
    )
    store = stack.stack.var / "nats"
    jetstream = {str(p): p.read_bytes() for p in store.rglob("*") if p.is_file()}
    assert any("AGENT_COMMANDS" in name for name in jetstream) and any(
        "AGENT_REPORTS" in n for n in jetstream
    )
    api_db = {str(p): p.read_bytes() for p in stack.stack.var.glob("rahatback.db*")}
    assert api_db and any(key_id.encode() in blob for blob in api_db.values())  # ids and fingerprints only
    assert findings(traffic, needles) == []
    assert findings(jetstream, needles) == []
    assert findings(api_db, needles) == []

    # the same scan does find the marker in the dump decrypted offline with the exported key, and
    # the key in the exported file: it can fail
    exported = tmp_path / "first.key"
    agent_cli(stack, "keys", "export", key_id, "--out", str(exported))
    artifact = setup.folder / first["storage_key"]
    plain = tmp_path / "first.sql"
    subprocess.run(
        [
            str(BIN / "rahatback-agent"),
            "decrypt",
            str(artifact),
            "--key",
            f"@{exported}",
            "--out",
            str(plain),
        ],
        check=True,
        capture_output=True,
    )
    assert findings({"decrypted dump": plain.read_bytes()}, needles) == ["marker in decrypted dump"]
    assert findings({"artifact": artifact.read_bytes()}, needles) == []
    assert "key 0 form 1 in exported key" in findings({"exported key": exported.read_bytes()}, needles)
