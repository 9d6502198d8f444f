"""Enrollment over real HTTP and the identity file's safety (mode 0600, refuses readable files)."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_agent.identity import IdentityError, load_identity
from rahatback_agent.main import main
from rahatback_agent.sealing import open_sealed
from rahatback_contracts.sealing import seal

VALID_TOKEN = "enroll-token-" + "a" * 20
# the API's command-signing public key (docs/security.md "Signed commands"): the agent pins it
API_COMMAND_KEY = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()


class FakeEnrollApi(BaseHTTPRequestHandler):
    """A real HTTP endpoint speaking the enrollment contract (the API's side is tested in tests/api)."""

    received: list[dict[str, Any]] = []  # noqa: RUF012 - shared with the test on purpose

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/agents/enroll":
            self._send(404, {"detail": "not found"})
            return
        type(self).received.append(body)
        if body["token"] != VALID_TOKEN:
            self._send(410, {"detail": "this enrollment token was already used; create a new one"})
            return
        self._send(
            201,
            {
                "agent_id": uuid.uuid4().hex,
                "org_id": uuid.uuid4().hex,
                "nats_url": "nats://127.0.0.1:4222",
                "command_signing_key_id": "c1",
                "command_signing_public_key": API_COMMAND_KEY,
            },
        )

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def api_url() -> Iterator[str]:
    FakeEnrollApi.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeEnrollApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_enroll_writes_a_private_identity_that_opens_secrets_sealed_to_it(
    api_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "conf" / "agent.json"
    assert (
        main(
            [
                "enroll",
                "--api",
                api_url,
                "--token",
                VALID_TOKEN,
                "--name",
                "db-host-1",
                "--config",
                str(config),
            ]
        )
        == 0
    )

    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    identity = load_identity(config)
    assert identity.name == "db-host-1"
    assert identity.api_url == api_url
    assert identity.nats_url == "nats://127.0.0.1:4222"
    assert len(identity.agent_id) == 32
    assert (identity.command_key_id, identity.command_public_key_b64) == ("c1", API_COMMAND_KEY)

    sent = FakeEnrollApi.received[-1]
    assert set(sent) >= {"token", "name", "hostname", "version", "x25519_public_key", "engines", "storages"}
    assert "postgresql" in sent["engines"] and sent["storages"] == ["local", "s3", "gdrive"]
    # only the public key left the host, and it matches the stored private key
    assert sent["x25519_public_key"] == identity.public_key_b64
    assert len(base64.b64decode(sent["x25519_public_key"])) == 32
    assert identity.x25519_private_key_b64 not in json.dumps(sent)
    sealed = seal(sent["x25519_public_key"], {"password": "pw"}, "rahatback:run:1")
    assert open_sealed(identity.private_key, sealed, "rahatback:run:1") == {"password": "pw"}
    # no temp files left next to it
    assert [p.name for p in config.parent.iterdir()] == ["agent.json"]
    assert str(config) in capsys.readouterr().out


def test_enroll_refuses_to_overwrite_without_force(api_url: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    assert main(["enroll", "--api", api_url, "--token", VALID_TOKEN, "--config", str(config)]) == 0
    first = load_identity(config)
    assert main(["enroll", "--api", api_url, "--token", VALID_TOKEN, "--config", str(config)]) == 1
    assert load_identity(config) == first
    assert len(FakeEnrollApi.received) == 1  # refused before even calling the API
    assert main(["enroll", "--api", api_url, "--token", VALID_TOKEN, "--config", str(config), "--force"]) == 0
    second = load_identity(config)
    assert second.agent_id != first.agent_id
    assert stat.S_IMODE(config.stat().st_mode) == 0o600


def test_enroll_reports_the_api_error_and_writes_nothing(
    api_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "agent.json"
    assert main(["enroll", "--api", api_url, "--token", "used-token", "--config", str(config)]) == 1
    assert "already used" in capsys.readouterr().err
    assert not config.exists()


def test_enroll_reports_an_unreachable_api(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.json"
    assert main(["enroll", "--api", "http://127.0.0.1:9", "--token", "t", "--config", str(config)]) == 1
    assert "cannot reach" in capsys.readouterr().err
    assert not config.exists()


def test_enroll_token_from_environment(api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAHATBACK_AGENT_ENROLL_TOKEN", VALID_TOKEN)
    monkeypatch.setenv("RAHATBACK_AGENT_CONFIG", str(tmp_path / "from-env.json"))
    assert main(["enroll", "--api", api_url]) == 0
    assert load_identity(tmp_path / "from-env.json").agent_id


def test_load_identity_refuses_a_readable_file(api_url: str, tmp_path: Path) -> None:
    config = tmp_path / "agent.json"
    assert main(["enroll", "--api", api_url, "--token", VALID_TOKEN, "--config", str(config)]) == 0
    os.chmod(config, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity(config)
    # `run` says so too, instead of starting
    assert main(["run", "--config", str(config)]) == 1


def test_load_identity_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="enroll"):
        load_identity(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"agent_id": "x", "x25519_private_key_b64": "SECRET-ish"}))
    bad.chmod(0o600)
    with pytest.raises(IdentityError) as caught:
        load_identity(bad)
    assert "SECRET-ish" not in str(caught.value)


def test_identity_repr_hides_the_private_key() -> None:
    from rahatback_agent.identity import AgentIdentity, private_key_b64

    key = private_key_b64(X25519PrivateKey.generate())
    identity = AgentIdentity(
        agent_id="a" * 32,
        org_id="o",
        nats_url="nats://x",
        api_url="http://x",
        name="n",
        x25519_private_key_b64=key,
    )
    assert key not in repr(identity) and key not in str(identity)
