"""The real stack, started the way a user starts it (scripts/devstack.py: nats-server, API, agent)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from scripts.devstack import Stack
from tests.servers import PostgresServer, free_port


@dataclass
class Client:
    stack: Stack
    token: str

    def call(self, method: str, path: str, json: Any = None, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.request(method, self.stack.api + path, json=json, headers=headers, timeout=60)

    def ok(self, method: str, path: str, json: Any = None) -> Any:
        response = self.call(method, path, json)
        assert response.status_code < 300, f"{method} {path} → {response.status_code} {response.text}"
        return response.json() if response.content else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    var = tmp_path_factory.mktemp("stack")
    stack = Stack(var, api_port=free_port(), nats_port=free_port())
    try:
        token = stack.start()
        yield Client(stack, token)
    finally:
        stack.stop()


def table_fingerprint(pg: PostgresServer, database: str) -> dict[str, tuple[int, str]]:
    """Per table: (row count, md5 of all rows in a stable order) — what a user would compare."""
    tables = pg.psql(database, "select tablename from pg_tables where schemaname='public' order by 1").split()
    result = {}
    for table in tables:
        # table names come from pg_tables, not from input
        query = f"""select count(*) || ' ' || coalesce(md5(string_agg(t::text, ',' order by t::text)), '-')
                    from public."{table}" t"""  # noqa: S608
        row = pg.psql(database, query)
        count, digest = row.split()
        result[table] = (int(count), digest)
    return result


def stack_logs(var: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in var.glob("*.log"))


@dataclass
class LocalSetup:
    """A SQLite database with rows and a local backup folder, both registered on the stack's agent."""

    source: Path
    folder: Path
    database: dict[str, Any]
    storage: dict[str, Any]


class _Api(Protocol):
    def ok(self, method: str, path: str, json: Any = None) -> Any: ...


def sqlite_and_folder(api: _Api, tmp_path: Path, name: str, rows: int = 500) -> LocalSetup:
    source, folder = tmp_path / f"{name}.db", tmp_path / f"{name}-backups"
    with sqlite3.connect(source) as conn:
        conn.execute("create table orders (id integer primary key, item text)")
        conn.executemany("insert into orders (item) values (?)", [(f"item {i}",) for i in range(rows)])
    folder.mkdir()
    agent = api.ok("GET", "/v1/agents")[0]
    database = api.ok(
        "POST",
        "/v1/databases",
        {"name": name, "engine": "sqlite", "agent_id": agent["id"], "settings": {"path": str(source)}},
    )
    storage = api.ok(
        "POST",
        "/v1/storages",
        {"name": f"{name}-disk", "kind": "local", "agent_id": agent["id"], "settings": {"path": str(folder)}},
    )
    return LocalSetup(source, folder, database, storage)
