"""`rahatback-api nats-setup`: creates the operator, accounts, users and config once, privately."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from rahatback_api.security import nats_jwt

from scripts.devstack import BIN


def run_setup(out: Path) -> str:
    result = subprocess.run(
        [str(BIN / "rahatback-api"), "nats-setup", "--out", str(out), "--resolver-dir", "/data/jwt"],
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout


def test_setup_creates_everything_once_and_never_rotates_keys(tmp_path: Path) -> None:
    out = tmp_path / "nats"
    first = run_setup(out)
    assert "keys/operator.nk" in first and "creds/api.creds" in first and "nats-auth.conf" in first
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    second = run_setup(out)
    assert "already set up; nothing changed" in second
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    # a lost creds file is re-created from the same account; the keys stay what they were
    (out / "creds" / "scheduler.creds").unlink()
    third = run_setup(out)
    created = [line.strip() for line in third.splitlines() if line.startswith("  ")]
    assert created == ["creds/scheduler.creds"]
    account = nats_jwt.nkey_from_seed((out / "keys" / "account.nk").read_text(), "account")
    scheduler_jwt = (out / "creds" / "scheduler.creds").read_text().split("\n")[1]
    assert nats_jwt.decode_claims(scheduler_jwt)["iss"] == account.public


def test_secrets_are_private_and_the_config_names_the_resolver(tmp_path: Path) -> None:
    out = tmp_path / "nats"
    run_setup(out)
    secrets = [*(out / "keys").iterdir(), *(out / "creds").iterdir(), out / "api-signing.json"]
    assert len(secrets) == 5 + 4 + 1
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    config = (out / "nats-auth.conf").read_text()
    assert "type: full" in config and 'dir: "/data/jwt"' in config
    assert "resolver_preload" in config and "system_account: A" in config
    for seed_file in (out / "keys").iterdir():  # no seed ends up in the server's config
        assert seed_file.read_text().strip() not in config


def test_seeds_moved_offline_are_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "nats"
    run_setup(out)
    offline = tmp_path / "offline"
    offline.mkdir()
    for name in (
        "operator.nk",
        "account.nk",
        "system-account.nk",
    ):  # the custody docs/nats-security.md asks for
        (out / "keys" / name).rename(offline / name)
    assert "already set up; nothing changed" in run_setup(out)
    assert not (out / "keys" / "account.nk").exists()

    (out / "creds" / "notifier.creds").unlink()
    refused = subprocess.run(
        [str(BIN / "rahatback-api"), "nats-setup", "--out", str(out)], capture_output=True, text=True
    )
    assert refused.returncode != 0
    assert "account.nk is missing (moved offline?): put it back" in refused.stderr
    assert not (out / "keys" / "account.nk").exists() and not (out / "creds" / "notifier.creds").exists()
    (offline / "account.nk").rename(out / "keys" / "account.nk")
    assert "creds/notifier.creds" in run_setup(out)
