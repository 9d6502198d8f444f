"""The agent image's entry point (enroll on first start, then run) and health check (identity plus a
live connection to NATS), run here as the image runs them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.servers import NatsServer

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy/docker/agent-entrypoint.sh"
HEALTHCHECK = ROOT / "deploy/docker/agent_healthcheck.py"

# stands in for the real CLI: logs each call, and `enroll` writes the identity file as the real one does
FAKE_AGENT = """#!/bin/sh
echo "$* | token=${RAHATBACK_AGENT_ENROLL_TOKEN:-}" >> "$CALLS"
if [ "$1" = enroll ]; then echo '{}' > "$RAHATBACK_AGENT_CONFIG"; fi
"""


Outcome = tuple[subprocess.CompletedProcess[str], list[str]]


def run_entrypoint(tmp_path: Path, args: list[str], **env: str) -> Outcome:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "rahatback-agent"
    fake.write_text(FAKE_AGENT)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    full_env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "CALLS": str(calls),
        "RAHATBACK_AGENT_CONFIG": str(tmp_path / "state" / "agent.json"),
        **env,
    }
    (tmp_path / "state").mkdir(exist_ok=True)
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True)
    return done, calls.read_text().splitlines() if calls.exists() else []


def test_first_start_without_a_token_says_what_to_do(tmp_path: Path) -> None:
    done, calls = run_entrypoint(tmp_path, ["rahatback-agent", "run"])
    assert done.returncode == 78 and calls == []
    assert "RAHATBACK_AGENT_ENROLL_TOKEN" in done.stderr and "enrollment-tokens" in done.stderr


def test_first_start_with_a_token_enrolls_then_runs_without_it(tmp_path: Path) -> None:
    done, calls = run_entrypoint(
        tmp_path,
        ["rahatback-agent", "run"],
        RAHATBACK_AGENT_ENROLL_TOKEN="rbe_secret",
        ENROLL_API_URL="http://api:8000",
        ENROLL_NAME="compose-agent",
    )
    assert done.returncode == 0, done.stderr
    config = tmp_path / "state" / "agent.json"
    assert calls == [
        f"enroll --api http://api:8000 --config {config} --name compose-agent | token=rbe_secret",
        "run | token=",  # the spent token is not in the long-running process's environment
    ]
    assert all("rbe_secret" not in call.split(" | ")[0] for call in calls), "never on a command line"


def test_token_without_api_url_is_refused(tmp_path: Path) -> None:
    done, calls = run_entrypoint(tmp_path, ["rahatback-agent", "run"], RAHATBACK_AGENT_ENROLL_TOKEN="rbe_x")
    assert done.returncode == 78 and calls == [] and "ENROLL_API_URL" in done.stderr


def test_enrolled_agent_just_runs_and_other_commands_pass_through(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent.json").write_text("{}")
    done, calls = run_entrypoint(
        tmp_path, ["rahatback-agent", "run"], RAHATBACK_AGENT_ENROLL_TOKEN="rbe_x", ENROLL_API_URL="http://a"
    )
    assert done.returncode == 0 and calls == ["run | token="]
    (tmp_path / "state" / "agent.json").unlink()
    done, calls = run_entrypoint(tmp_path, ["rahatback-agent", "enroll", "--api", "http://a"])
    assert done.returncode == 0 and calls[-1] == "enroll --api http://a | token="


def healthcheck(config: Path, nats_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAHATBACK_AGENT_")}
    env["RAHATBACK_AGENT_CONFIG"] = str(config)
    if nats_url is not None:
        env["RAHATBACK_AGENT_NATS_URL"] = nats_url
    return subprocess.run([sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_health_check_needs_the_identity_and_a_live_nats_connection(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = tmp_path / "agent.json"
    missing = healthcheck(config)
    assert missing.returncode != 0 and "no readable agent identity" in missing.stderr

    config.write_text(json.dumps({"agent_id": "a1", "nats_url": nats_server.url}))
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port))):
        assert healthcheck(config).returncode == 0
    # the same identity, but NATS reached through an override nobody is connected to
    down = healthcheck(config, nats_url=f"nats://127.0.0.1:{free_port()}")
    assert down.returncode == 1 and "no established connection to NATS port" in down.stderr
