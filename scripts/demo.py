"""A guided first backup against the stack started by `make up`: `make demo`.

Creates a SQLite demo database, registers it, tests the connection, backs it up to a local folder,
restores the backup into a new file and shows that the rows match. Every step is one HTTP call you
can repeat with curl (printed as it goes).
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VAR = Path(os.environ.get("RAHATBACK_VAR_DIR", ROOT / "var")).resolve()
API = os.environ.get("RAHATBACK_API", "http://127.0.0.1:8000")


def call(method: str, path: str, body: dict[str, Any] | None = None, *, show: bool = True) -> Any:
    token = (VAR / "admin-token").read_text().strip()
    if show:
        print(f"  → {method} {path}" + (f"  {json.dumps(body)}" if body else ""))
    request = urllib.request.Request(  # noqa: S310 - the local API
        API + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"    {exc.code}: {exc.read().decode()}") from None
    except urllib.error.URLError as exc:
        raise SystemExit(
            f"the API at {API} is not answering ({exc.reason}): start it with `make up` and wait for"
            " 'RahatBack is running'"
        ) from None


def step(title: str) -> None:
    print(f"\n== {title}")


def rows(path: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("select id, name, email, balance from customers order by id").fetchall()


def wait(path: str, done: set[str]) -> dict[str, Any]:
    print(f"  → GET {path}  (until it is {' or '.join(sorted(done))})")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        item: dict[str, Any] = call("GET", path, show=False)
        if item["status"] in done:
            return item
        time.sleep(0.5)
    raise SystemExit(f"{path} did not finish within 2 minutes")


def wait_for_email(run_id: str, timeout: float = 30) -> Path | None:
    """The notifier's dev outbox: one .eml file per email, mentioning the run's link."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted((VAR / "outbox").glob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            body = message.get_body(("plain",))
            if body is not None and run_id in body.get_content():
                return path
        time.sleep(0.5)
    return None


def main() -> None:
    if not (VAR / "admin-token").exists():
        raise SystemExit("start the stack first: make up (in another terminal)")
    demo = VAR / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    source, restored = demo / "shop.db", demo / "shop-restored.db"
    for path in (source, restored):
        path.unlink(missing_ok=True)

    step(f"Create a SQLite demo database: {source}")
    with sqlite3.connect(source) as conn:
        conn.execute("create table customers (id integer primary key, name text, email text, balance real)")
        conn.executemany(
            "insert into customers (name, email, balance) values (?, ?, ?)",
            [(f"Müşteri {i}", f"customer{i}@example.com", i * 10.5) for i in range(1, 1001)],
        )
    print(f"  {len(rows(source))} customers")

    agents = call("GET", "/v1/agents")
    agent = next((a for a in agents if a["online"]), None)
    if agent is None:
        raise SystemExit("no agent is online: is `make up` still running?")

    step("Register it and test the connection (through NATS, by the agent)")
    suffix = time.strftime("%H%M%S")
    db = call(
        "POST",
        "/v1/databases",
        {
            "name": f"shop-{suffix}",
            "engine": "sqlite",
            "agent_id": agent["id"],
            "settings": {"path": str(source)},
        },
    )
    test = call("POST", f"/v1/databases/{db['id']}/test")
    print(f"    ok={test['ok']} version={test.get('server_version')} latency={test.get('latency_ms')} ms")

    step("Add a local storage folder and a backup job (zstd, encrypted)")
    (VAR / "backups").mkdir(exist_ok=True)
    storage = call(
        "POST",
        "/v1/storages",
        {
            "name": f"local-{suffix}",
            "kind": "local",
            "agent_id": agent["id"],
            "settings": {"path": str(VAR / "backups")},
        },
    )
    job = call(
        "POST",
        "/v1/backups/jobs",
        {
            "name": f"shop-nightly-{suffix}",
            "database_id": db["id"],
            "storage_id": storage["id"],
            "cron": "0 3 * * *",
            "timezone": "Europe/Istanbul",
            "retention": {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6},
        },
    )

    step("Email me about this job (with no SMTP server configured, emails land in var/outbox)")
    call(
        "POST",
        "/v1/notifications/channels",
        {
            "name": f"me-{suffix}",
            "kind": "email",
            "recipients": ["you@example.com"],
            "events": ["backup.completed", "backup.failed", "backup.overdue", "restore.failed"],
            "job_ids": [job["id"]],
        },
    )

    step("Run the job now and wait for it")
    run = call("POST", f"/v1/backups/jobs/{job['id']}/run")
    run = wait(f"/v1/backups/history/{run['id']}", {"completed", "failed"})
    if run["status"] != "completed":
        raise SystemExit(f"backup failed: {run['error']}")
    print(
        f"    {run['dump_size']} bytes dumped → {run['artifact_size']} bytes stored"
        f" in {run['duration_ms']} ms"
    )
    print(f"    {VAR / 'backups' / run['storage_key']}")
    print(f"    sha256 {run['artifact_sha256']}")
    email = wait_for_email(run["id"])
    print(f"    email: {email}" if email else "    no email yet: is the notifier running? (var/notifier.log)")

    step(f"Restore it into a new database file: {restored}")
    target = call(
        "POST",
        "/v1/databases",
        {
            "name": f"shop-restored-{suffix}",
            "engine": "sqlite",
            "agent_id": agent["id"],
            "settings": {"path": str(restored)},
        },
    )
    restore = call("POST", f"/v1/backups/history/{run['id']}/restore", {"database_id": target["id"]})
    restore = wait(f"/v1/backups/restores/{restore['id']}", {"completed", "failed"})
    if restore["status"] != "completed":
        raise SystemExit(f"restore failed: {restore['error']}")

    step("Compare")
    same = rows(source) == rows(restored)
    print(
        f"  source {len(rows(source))} rows, restored {len(rows(restored))} rows: "
        + ("identical ✔" if same else "DIFFERENT ✘")
    )
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
