"""Session fixtures: one real nats-server and one real PostgreSQL per test session."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import NatsServer, PostgresServer, running_postgres, start_nats


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


def open_to_service_users(base: Path) -> None:
    """Let the postgres and mysql OS users traverse pytest's temp folders (private to root by
    default), up to the system temp dir; with pytest-xdist there is one more level per worker."""
    top = Path(tempfile.gettempdir()).resolve()
    for folder in (base.resolve(), *base.resolve().parents):
        if folder == top or top not in folder.parents:
            break
        folder.chmod(0o755)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    # postgres must be able to reach its data dir: pytest's base temp is private to root
    open_to_service_users(tmp_path_factory.getbasetemp())
    with running_postgres(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


# appended per engine, with its own imports, so engine fixtures can be added independently
from tests.servers import MariaDBServer, mariadb_missing_tools, running_mariadb  # noqa: E402


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MariaDBServer]:
    if missing := mariadb_missing_tools():
        install = "apt-get install -y mariadb-server mariadb-client"
        pytest.skip(f"MariaDB is not installed ({', '.join(missing)}): {install}")
    # mariadbd runs as the mysql OS user: pytest's base temp is private to root, so open it up
    open_to_service_users(tmp_path_factory.getbasetemp())
    with running_mariadb(tmp_path_factory.mktemp("mariadb")) as server:
        yield server


# appended with its own imports (see above): a real S3 endpoint that checks signatures and IAM
from tests.servers import MotoServer, running_moto  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server
