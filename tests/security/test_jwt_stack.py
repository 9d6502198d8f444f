"""The real stack in operator/JWT mode (`scripts/devstack.py --nats-jwt`): nats-server with the full
resolver, API, scheduler, notifier and an enrolled agent, each with its own NATS user. A backup runs
end to end on the agent's own permissions; revoking the agent stops it for good."""

from __future__ import annotations

import json
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.devstack import BIN, ROOT, Stack
from tests.e2e.conftest import Client, sqlite_and_folder, stack_logs
from tests.servers import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    var = tmp_path_factory.mktemp("jwt-stack")
    stack = Stack(var, api_port=free_port(), nats_port=free_port(), nats_jwt=True)
    try:
        token = stack.start()
        yield Client(stack, token)
    finally:
        stack.stop()


def wait_status(client: Client, path: str, done: set[str], timeout: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        item: dict[str, object] = client.ok("GET", path)
        if item["status"] in done or time.monotonic() > deadline:
            return item
        time.sleep(0.3)


def test_a_backup_runs_end_to_end_with_per_service_nats_users(jwt_stack: Client, tmp_path: Path) -> None:
    var = jwt_stack.stack.var
    identity_file = var / "agent" / "agent.json"
    identity = json.loads(identity_file.read_text())
    assert identity["nats_seed"].startswith("SU") and identity["nats_jwt"].count(".") == 2
    assert stat.S_IMODE(identity_file.stat().st_mode) == 0o600
    assert identity["nats_seed"] not in stack_logs(var)  # only the public key left the agent

    setup = sqlite_and_folder(jwt_stack, tmp_path, "shop")
    job = jwt_stack.ok(
        "POST",
        "/v1/backups/jobs",
        {"name": "shop", "database_id": setup.database["id"], "storage_id": setup.storage["id"]},
    )
    run = jwt_stack.ok("POST", f"/v1/backups/jobs/{job['id']}/run")
    run = wait_status(jwt_stack, f"/v1/backups/history/{run['id']}", {"completed", "failed"})
    assert run["status"] == "completed", run["error"]
    assert (setup.folder / str(run["storage_key"])).stat().st_size == run["artifact_size"]
    # nothing any service or the agent did was refused
    assert "permissions violation" not in stack_logs(var)


def test_a_revoked_agent_is_disconnected_and_cannot_come_back(jwt_stack: Client) -> None:
    stack = jwt_stack.stack
    agent_id = jwt_stack.ok("GET", "/v1/agents")[0]["id"]
    process = stack.children["agent"]
    started = time.monotonic()
    revoked = jwt_stack.ok("POST", f"/v1/agents/{agent_id}/revoke")
    assert revoked["nats_user_revoked"] is True and revoked["consumer_deleted"] is True
    # the server closed it; the API refuses it new credentials: it stops by itself, as a failure
    assert process.wait(timeout=60) == 1
    stopped_after = time.monotonic() - started
    log = (stack.var / "agent.log").read_text()
    assert "the API refuses this agent new NATS credentials" in log and "(403)" in log
    assert stopped_after < 60

    # started again with the same identity: refused, every time
    with open(stack.var / "agent-again.log", "wb") as out:
        again = subprocess.Popen(
            [str(BIN / "rahatback-agent"), "run"],
            env=stack.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "Authorization Violation" not in (stack.var / "agent-again.log").read_text():
            assert time.monotonic() < deadline, (stack.var / "agent-again.log").read_text()[-2000:]
            time.sleep(0.3)
    finally:
        again.terminate()
        again.wait(30)
    assert jwt_stack.ok("GET", f"/v1/agents/{agent_id}")["online"] is False
