"""RahatBack vs the best shell pipeline on a reference PostgreSQL database: `make bench`.

Builds a throwaway PostgreSQL 15 cluster with a ~1 GB database (pgbench -s 30 plus a table of mixed
rows) and a half-size one, starts the real stack (nats-server, API on SQLite, one agent: the
processes `make up` starts), then measures, interleaved and N times each (medians reported):

- backup: `pg_dump -Fp | zstd -3 -T0 | openssl enc -aes-256-ctr > file` vs a RahatBack run through
  the API, NATS and the agent to local storage (HTTP POST until the run reads `completed`);
- the agent's peak RSS during those backups (VmRSS sampled every 50 ms, and VmHWM with the agent
  restarted before each database size);
- restore into an empty database: `zstd -d < dump.sql.zst | psql --single-transaction` vs a
  RahatBack restore through the API.

- the S3 path (unless `--no-s3`): the same RahatBack backup of the full database into S3 (a
  moto_server on loopback, through the agent's aioboto3 multipart upload) vs into local storage:
  wall time, artifact throughput, agent CPU and peak RSS.

Writes docs/benchmarks.md and prints the same table. `--quick` is a ~100 MB smoke run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.devstack import Stack  # noqa: E402
from tests.servers import PG_BIN, MotoServer, PostgresServer, free_port, running_moto, running_postgres  # noqa: E402

BACKUP_TARGET = 1.10
RESTORE_TARGET = 1.10
RSS_TARGET_MIB = 150
POLL_S = 0.05
MIXED_ROWS_FULL = 2_500_000
PGBENCH_SCALE_FULL = 30

MIXED_SQL = """
select setseed(0.42);
create table bench_events (
  id bigint primary key,
  customer text not null,
  amount numeric(12,2) not null,
  created_at timestamptz not null,
  shipped_at timestamp,
  status text not null,
  payload jsonb not null,
  note text
);
insert into bench_events
select i,
       'customer-' || (i % 100000) || '-' || md5(i::text),
       round((random() * 100000)::numeric, 2),
       timestamptz '2020-01-01 00:00:00+00' + i * interval '7 seconds',
       case when i % 3 = 0 then null else timestamp '2021-01-01' + (i % 86400) * interval '1 minute' end,
       (array['new', 'paid', 'shipped', 'cancelled'])[1 + i % 4],
       jsonb_build_object('i', i, 'tags', jsonb_build_array('a' || (i % 10), 'b' || (i % 7)),
                          'score', round((random() * 1000)::numeric, 1), 'ok', i % 2 = 0),
       case when i % 5 = 0 then null else repeat(chr(97 + i % 26), 10 + i % 60) end
from generate_series(1, {rows}) i;
create index bench_events_created on bench_events (created_at);
analyze;
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


# ------------------------------------------------------------------------------------ processes


class RssSampler:
    """Max VmRSS of one pid, sampled every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        kib = status_kib(self.pid, "VmRSS")
        if kib is not None:
            self.peak_kib = max(self.peak_kib, kib)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def code_version() -> str:
    """git HEAD plus a digest of the agent's and contracts' sources as they are on disk now.

    The agent runs from the working tree (editable install), which others may be editing while
    the benchmark runs; a row whose digest changed between its start and end measured mixed code.
    """
    digest = hashlib.sha256()
    for base in (ROOT / "services" / "agent" / "src", ROOT / "libs" / "contracts" / "src"):
        for path in sorted(base.rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    head = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return f"{head}/{digest.hexdigest()[:8]}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its children it has reaped (pg_dump, psql)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def shell(command: str, env: dict[str, str], cpu: Series) -> float:
    """Run a bash pipeline (pipefail); return its wall time, append its processes' CPU to `cpu`."""
    before = os.times()
    started = time.perf_counter()
    subprocess.run(["bash", "-o", "pipefail", "-c", command], env=env, check=True)
    elapsed = time.perf_counter() - started
    after = os.times()
    cpu.values.append(
        after.children_user - before.children_user + after.children_system - before.children_system
    )
    return elapsed


# ------------------------------------------------------------------------------------ API client


@dataclass
class Api:
    base: str
    token: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=60
        )

    def ok(self, method: str, path: str, json: Any = None) -> Any:
        response = self.client.request(method, path, json=json)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path} → {response.status_code} {response.text}")
        return response.json() if response.content else None

    def wait(self, path: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            item: dict[str, Any] = self.ok("GET", path)
            if item["status"] in ("completed", "failed", "partial"):
                if item["status"] != "completed":
                    raise RuntimeError(f"{path} ended {item['status']}: {item.get('error')}")
                return item
            time.sleep(POLL_S)
        raise RuntimeError(f"{path} did not finish within {timeout:.0f} s")


class EventStream:
    """Follows GET /v1/events (SSE) in a thread and remembers when each run/restore finished.

    Cheaper for the API than polling every 50 ms (which costs it ~10 % of a core), and exact: the
    time recorded is when the `*.completed` frame arrived.
    """

    DONE = ("backup.completed", "backup.failed", "backup.partial", "restore.completed", "restore.failed")

    def __init__(self, api: Api) -> None:
        self.api = api
        self.finished: dict[str, tuple[float, str]] = {}
        self._cond = threading.Condition()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("GET /v1/events did not connect")

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.api.token}"}
        timeout = httpx.Timeout(10, read=None)
        with httpx.stream("GET", self.api.base + "/v1/events", headers=headers, timeout=timeout) as response:
            name = ""
            for line in response.iter_lines():
                if line.startswith(": connected"):
                    self._ready.set()
                elif line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and name in self.DONE:
                    payload = json.loads(line.split(":", 1)[1])
                    key = payload.get("run_id") or payload.get("restore_id")
                    with self._cond:
                        self.finished[key] = (time.perf_counter(), name)
                        self._cond.notify_all()

    def wait(self, key: str, timeout: float) -> float:
        """perf_counter() when `key` finished; raises if it did not complete."""
        with self._cond:
            if not self._cond.wait_for(lambda: key in self.finished, timeout):
                raise RuntimeError(f"{key} did not finish within {timeout:.0f} s")
            at, name = self.finished[key]
        if not name.endswith(".completed"):
            raise RuntimeError(f"{key} ended with {name}")
        return at


# ------------------------------------------------------------------------------------ dataset


def pg_env(pg: PostgresServer, database: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGHOST=pg.host, PGPORT=str(pg.port), PGUSER=pg.user, PGPASSWORD=pg.password, PGDATABASE=database
    )
    return env


def populate(pg: PostgresServer, database: str, pgbench_scale: int, rows: int) -> subprocess.Popen[bytes]:
    """Start filling `database` in the background (pgbench -i, then the mixed table)."""
    pg.psql("postgres", f"drop database if exists {database} with (force)")
    pg.psql("postgres", f"create database {database}")
    pgbench = shlex.quote(str(PG_BIN / "pgbench"))
    psql = shlex.quote(str(PG_BIN / "psql"))
    sql = shlex.quote(MIXED_SQL.format(rows=rows))
    command = (
        f"{pgbench} -i -q -s {pgbench_scale} {database} && "
        f"{psql} -X -q -v ON_ERROR_STOP=1 -d {database} -c {sql} >/dev/null"
    )
    return subprocess.Popen(["bash", "-o", "pipefail", "-c", command], env=pg_env(pg, database))


@dataclass
class Dataset:
    label: str
    database: str
    pgbench_scale: int
    mixed_rows: int
    db_bytes: int = 0
    dump_bytes: int = 0
    job_id: str = ""
    database_id: str = ""


# ------------------------------------------------------------------------------------ results


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cell(self) -> str:
        return ", ".join(f"{v:.2f}" for v in self.values)


@dataclass
class Row:
    name: str
    baseline: Series = field(default_factory=Series)
    rahat: Series = field(default_factory=Series)
    agent_reported: Series = field(default_factory=Series)
    baseline_cpu: Series = field(default_factory=Series)
    rahat_cpu: Series = field(default_factory=Series)
    rss_peaks_kib: list[int] = field(default_factory=list)
    hwm_kib: int | None = None
    loads: list[str] = field(default_factory=list)
    code: list[str] = field(default_factory=list)

    @property
    def code_cell(self) -> str:
        heads = " → ".join(dict.fromkeys(c.split("/")[0] for c in self.code))
        digests = list(dict.fromkeys(c.split("/")[1] for c in self.code))
        if len(digests) == 1:
            return f"HEAD {heads}, sources `{digests[0]}`"
        return f"HEAD {heads}, sources {' → '.join(f'`{d}`' for d in digests)} **(changed during the row)**"

    @property
    def ratio(self) -> float:
        return self.rahat.median / self.baseline.median


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class StoragePath:
    """RahatBack backups of one dataset, alternating between local storage and S3."""

    label: str
    local: Series = field(default_factory=Series)
    s3: Series = field(default_factory=Series)
    local_cpu: Series = field(default_factory=Series)
    s3_cpu: Series = field(default_factory=Series)
    local_rss_kib: list[int] = field(default_factory=list)
    s3_rss_kib: list[int] = field(default_factory=list)
    artifact_bytes: list[int] = field(default_factory=list)
    hwm_kib: int | None = None

    def throughput(self, seconds: Series) -> float:
        """Artifact MiB per second of wall time (median artifact size / median time)."""
        return statistics.median(self.artifact_bytes) / (1 << 20) / seconds.median


# ------------------------------------------------------------------------------------ bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale: float = args.scale
        self.runs: int = args.runs
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rahatback-bench-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o755)  # the postgres OS user must reach its cluster inside
        self.backups = self.work / "backups"
        self.backups.mkdir(exist_ok=True)
        self.baseline_dir = self.work / "baseline"
        self.baseline_dir.mkdir(exist_ok=True)
        full_scale = max(1, round(PGBENCH_SCALE_FULL * self.scale))
        full_rows = max(10_000, round(MIXED_ROWS_FULL * self.scale))
        self.datasets = [
            Dataset("full", "bench_full", full_scale, full_rows),
            Dataset("half", "bench_half", max(1, full_scale // 2), full_rows // 2),
        ]
        self.load_start = loadavg()
        self.load_end = ""
        self.started = dt.datetime.now(dt.UTC)
        self.rows: list[Row] = []
        self.versions: dict[str, str] = {}
        self.newest_artifact: dict[str, Path] = {}
        self.last_run_id = ""
        self.agent_version = "?"
        self.s3_paths: list[StoragePath] = []
        self.s3_bucket = ""

    # -- setup

    def build(self, pg: PostgresServer) -> None:
        log(
            f"building datasets in {self.work} (scale {self.scale}): "
            + ", ".join(
                f"{d.database}: pgbench -s {d.pgbench_scale} + {d.mixed_rows:,} mixed rows"
                for d in self.datasets
            )
        )
        started = time.perf_counter()
        procs = [populate(pg, d.database, d.pgbench_scale, d.mixed_rows) for d in self.datasets]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit("building a dataset failed")
        for d in self.datasets:
            d.db_bytes = int(pg.psql("postgres", f"select pg_database_size('{d.database}')"))
            pg.psql(d.database, "checkpoint")
        log(
            f"datasets built in {time.perf_counter() - started:.0f} s: "
            + ", ".join(f"{d.database} {human(d.db_bytes)}" for d in self.datasets)
        )

    def register(self, api: Api, pg: PostgresServer) -> tuple[str, str]:
        agents = api.ok("GET", "/v1/agents")
        agent_id = agents[0]["id"]
        self.agent_version = str(agents[0].get("version") or "?")
        settings = {"host": pg.host, "port": pg.port, "user": pg.user, "password": pg.password}
        storage = api.ok(
            "POST",
            "/v1/storages",
            {"name": "bench", "kind": "local", "agent_id": agent_id, "settings": {"path": str(self.backups)}},
        )
        for d in self.datasets:
            db = api.ok(
                "POST",
                "/v1/databases",
                {
                    "name": d.database.replace("_", "-"),
                    "engine": "postgresql",
                    "agent_id": agent_id,
                    "settings": {**settings, "database": d.database},
                },
            )
            d.database_id = db["id"]
            job = api.ok(
                "POST",
                "/v1/backups/jobs",
                {
                    "name": f"bench-{d.label}",
                    "database_id": db["id"],
                    "storage_id": storage["id"],
                    "compression": "zstd",
                    "compression_level": 3,
                    "encryption_enabled": True,
                    "cron": "0 3 1 1 *",
                    "timezone": "UTC",
                },
            )
            d.job_id = job["id"]
        target = api.ok(
            "POST",
            "/v1/databases",
            {
                "name": "bench-restore",
                "engine": "postgresql",
                "agent_id": agent_id,
                "settings": {**settings, "database": "bench_restore"},
            },
        )
        return agent_id, target["id"]

    # -- measurements

    def restart_agent(self, stack: Stack, token: str) -> int:
        stack.stop_child("agent")
        stack.start_agent(token)
        return stack.children["agent"].pid

    def backup_row(self, stack: Stack, token: str, api: Api, pg: PostgresServer, d: Dataset) -> Row:
        row = Row(f"backup, {d.label} ({human(d.db_bytes)} database)")
        row.code.append(code_version())
        pid = self.restart_agent(stack, token)  # VmHWM is cumulative: a fresh agent per size
        env = pg_env(pg, d.database)
        pg_dump = shlex.quote(str(PG_BIN / "pg_dump"))
        target = self.baseline_dir / f"{d.database}.sql.zst.enc"
        baseline = (
            f"{pg_dump} -Fp --no-owner --no-privileges {d.database} | zstd -q -3 -T0 "
            f"| openssl enc -aes-256-ctr -pass pass:x -pbkdf2 > {shlex.quote(str(target))}"
        )
        # warm-up, untimed: the page cache holds the database for both contenders
        d.dump_bytes = int(
            subprocess.run(
                ["bash", "-o", "pipefail", "-c", f"{pg_dump} -Fp --no-owner --no-privileges | wc -c"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        log(f"{d.label}: plain dump is {human(d.dump_bytes)}; agent pid {pid}")
        for i in range(self.runs):
            # alternate who goes first, so a drift in machine load does not favour either side
            order: list[Callable[[], None]] = [
                lambda: row.baseline.values.append(shell(baseline, env, row.baseline_cpu)),
                lambda: self.rahat_backup(api, d, pid, row),
            ]
            if i % 2:
                order.reverse()
            row.loads.append(loadavg())
            for step in order:
                step()
            log(
                f"{d.label} run {i + 1}: baseline {row.baseline.values[-1]:.2f} s, "
                f"rahatback {row.rahat.values[-1]:.2f} s (agent {row.agent_reported.values[-1]:.2f} s), "
                f"agent rss peak {row.rss_peaks_kib[-1] / 1024:.1f} MiB, load {row.loads[-1]}"
            )
        row.hwm_kib = status_kib(pid, "VmHWM")
        row.code.append(code_version())
        row.code = list(dict.fromkeys(row.code))
        return row

    def rahat_backup(self, api: Api, d: Dataset, pid: int, row: Row) -> None:
        cpu_before = cpu_seconds(pid)
        with RssSampler(pid) as rss:
            started = time.perf_counter()
            run = api.ok("POST", f"/v1/backups/jobs/{d.job_id}/run")
            elapsed = self.events.wait(run["id"], timeout=3600) - started
        run = api.wait(f"/v1/backups/history/{run['id']}", timeout=60)
        row.rahat_cpu.values.append(cpu_seconds(pid) - cpu_before)
        row.rahat.values.append(elapsed)
        row.agent_reported.values.append((run.get("duration_ms") or 0) / 1000)
        row.rss_peaks_kib.append(rss.peak_kib)
        self.last_run_id = run["id"]
        # keep the disk from filling up over many runs: the newest artifact is what restores use
        if self.args.prune:
            previous = self.newest_artifact.get(d.label)
            if previous is not None:
                previous.unlink(missing_ok=True)
            self.newest_artifact[d.label] = self.backups / run["storage_key"]

    def restore_row(
        self, stack: Stack, token: str, api: Api, pg: PostgresServer, d: Dataset, run_id: str, target_id: str
    ) -> Row:
        row = Row(f"restore, {d.label} (into an empty database)")
        row.code.append(code_version())
        pid = self.restart_agent(stack, token)
        dump_file = self.baseline_dir / f"{d.database}.sql.zst"
        pg_dump = shlex.quote(str(PG_BIN / "pg_dump"))
        subprocess.run(
            [
                "bash",
                "-o",
                "pipefail",
                "-c",
                f"{pg_dump} -Fp --no-owner --no-privileges | zstd -q -3 -T0 > {shlex.quote(str(dump_file))}",
            ],
            env=pg_env(pg, d.database),
            check=True,
        )
        psql = shlex.quote(str(PG_BIN / "psql"))
        baseline = (
            f"zstd -q -d < {shlex.quote(str(dump_file))} "
            f"| {psql} -X -q --single-transaction -v ON_ERROR_STOP=1 -d bench_restore > /dev/null"
        )
        env = pg_env(pg, "bench_restore")

        def fresh_target() -> None:
            pg.psql("postgres", "drop database if exists bench_restore with (force)")
            pg.psql("postgres", "create database bench_restore")
            pg.psql("postgres", "checkpoint")

        def baseline_run() -> None:
            fresh_target()
            row.baseline.values.append(shell(baseline, env, row.baseline_cpu))

        def rahat_run() -> None:
            fresh_target()
            cpu_before = cpu_seconds(pid)
            with RssSampler(pid) as rss:
                started = time.perf_counter()
                restore = api.ok("POST", f"/v1/backups/history/{run_id}/restore", {"database_id": target_id})
                row.rahat.values.append(self.events.wait(restore["id"], timeout=3600) - started)
            restore = api.wait(f"/v1/backups/restores/{restore['id']}", timeout=60)
            row.rahat_cpu.values.append(cpu_seconds(pid) - cpu_before)
            row.agent_reported.values.append((restore.get("duration_ms") or 0) / 1000)
            row.rss_peaks_kib.append(rss.peak_kib)

        for i in range(self.runs):
            order = [baseline_run, rahat_run]
            if i % 2:
                order.reverse()
            row.loads.append(loadavg())
            for step in order:
                step()
            log(
                f"restore run {i + 1}: baseline {row.baseline.values[-1]:.2f} s, "
                f"rahatback {row.rahat.values[-1]:.2f} s (agent {row.agent_reported.values[-1]:.2f} s), "
                f"agent rss peak {row.rss_peaks_kib[-1] / 1024:.1f} MiB, load {row.loads[-1]}"
            )
        # the last RahatBack restore (the last step when runs is odd) must hold the source's rows
        check = "select (select count(*) from pgbench_accounts) || ' ' || (select count(*) from bench_events)"
        source, restored = pg.psql(d.database, check), pg.psql("bench_restore", check)
        if source != restored:
            raise SystemExit(f"restored row counts {restored} differ from the source's {source}")
        row.hwm_kib = status_kib(pid, "VmHWM")
        row.code.append(code_version())
        row.code = list(dict.fromkeys(row.code))
        return row

    # -- the S3 path

    def register_s3(self, api: Api, s3: MotoServer, agent_id: str, d: Dataset) -> str:
        bucket = s3.create_bucket("bench")
        storage = api.ok(
            "POST",
            "/v1/storages",
            {
                "name": "bench-s3",
                "kind": "s3",
                "agent_id": agent_id,
                "settings": {
                    "bucket": bucket,
                    "prefix": "bench",
                    "endpoint_url": s3.url,
                    "region": s3.region,
                    "path_style": True,
                    "access_key_id": s3.access_key_id,
                    "secret_access_key": s3.secret_access_key,
                },
            },
        )
        job = api.ok(
            "POST",
            "/v1/backups/jobs",
            {
                "name": f"bench-s3-{d.label}",
                "database_id": d.database_id,
                "storage_id": storage["id"],
                "compression": "zstd",
                "compression_level": 3,
                "encryption_enabled": True,
                "cron": "0 3 1 1 *",
                "timezone": "UTC",
            },
        )
        self.s3_bucket = bucket
        return str(job["id"])

    def timed_backup(self, api: Api, job_id: str, pid: int) -> tuple[float, float, int, dict[str, Any]]:
        """(wall s from POST to the completed event, agent CPU s, agent peak VmRSS KiB, the run)."""
        cpu_before = cpu_seconds(pid)
        with RssSampler(pid) as rss:
            started = time.perf_counter()
            run = api.ok("POST", f"/v1/backups/jobs/{job_id}/run")
            elapsed = self.events.wait(run["id"], timeout=3600) - started
        run = api.wait(f"/v1/backups/history/{run['id']}", timeout=60)
        return elapsed, cpu_seconds(pid) - cpu_before, rss.peak_kib, run

    def s3_row(
        self, stack: Stack, token: str, api: Api, s3: MotoServer, d: Dataset, s3_job_id: str
    ) -> StoragePath:
        path = StoragePath(f"backup, {d.label} ({human(d.db_bytes)} database)")
        pid = self.restart_agent(stack, token)
        bucket = s3.client()

        def local_run() -> None:
            elapsed, cpu, rss, run = self.timed_backup(api, d.job_id, pid)
            path.local.values.append(elapsed)
            path.local_cpu.values.append(cpu)
            path.local_rss_kib.append(rss)
            if self.args.prune:
                (self.backups / run["storage_key"]).unlink(missing_ok=True)

        def s3_run() -> None:
            elapsed, cpu, rss, run = self.timed_backup(api, s3_job_id, pid)
            path.s3.values.append(elapsed)
            path.s3_cpu.values.append(cpu)
            path.s3_rss_kib.append(rss)
            path.artifact_bytes.append(int(run["artifact_size"]))
            head = bucket.head_object(Bucket=self.s3_bucket, Key=run["storage_key"])
            if head["ContentLength"] != run["artifact_size"]:
                raise SystemExit(
                    f"S3 object is {head['ContentLength']} bytes, the run says {run['artifact_size']}"
                )
            if self.args.prune:  # moto keeps objects in its own process: do not let them pile up
                bucket.delete_object(Bucket=self.s3_bucket, Key=run["storage_key"])

        for i in range(self.runs):
            order = [local_run, s3_run]
            if i % 2:
                order.reverse()
            for step in order:
                step()
            log(
                f"s3 path run {i + 1}: local {path.local.values[-1]:.2f} s, s3 {path.s3.values[-1]:.2f} s, "
                f"agent rss peak local {path.local_rss_kib[-1] / 1024:.1f} MiB, "
                f"s3 {path.s3_rss_kib[-1] / 1024:.1f} MiB, load {loadavg()}"
            )
        path.hwm_kib = status_kib(pid, "VmHWM")
        return path

    def s3_table(self) -> str:
        lines = [
            "| measurement | to local storage, runs (s) | median | to S3 (moto), runs (s) | median "
            "| S3 / local | artifact MiB/s, local / S3 | agent CPU s (median), local / S3 "
            "| agent peak RSS, local / S3 (VmRSS / 50 ms) | VmHWM after the runs |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in self.s3_paths:
            lines.append(
                f"| {p.label} | {p.local.cell()} | {p.local.median:.2f} | {p.s3.cell()} | {p.s3.median:.2f} "
                f"| {p.s3.median / p.local.median:.2f} "
                f"| {p.throughput(p.local):.1f} / {p.throughput(p.s3):.1f} "
                f"| {p.local_cpu.median:.2f} / {p.s3_cpu.median:.2f} "
                f"| {max(p.local_rss_kib) / 1024:.1f} / {max(p.s3_rss_kib) / 1024:.1f} MiB "
                f"| {(p.hwm_kib or 0) / 1024:.1f} MiB {verdict((p.hwm_kib or 0) / 1024 <= RSS_TARGET_MIB)} |"
            )
        return "\n".join(lines)

    def s3_section(self) -> str:
        if not self.s3_paths:
            return ""
        return f"""
## S3 path

{self.s3_table()}

The same RahatBack backup job run against two storages, alternating: local storage (as above) and
S3 — a `moto_server` on loopback with signatures and IAM checked, reached through the agent's
aioboto3 streaming multipart upload (6 MiB parts, up to 2 in flight). Throughput is artifact
bytes per second of wall time from the POST to the `backup.completed` event. moto is a
single-process Python server that keeps every part and copies them again on completion, so the
S3 wall time measures moto more than the agent; the agent's CPU and peak RSS are the numbers
that carry over to a real S3 endpoint.
"""

    # -- report

    def collect_versions(self, pg: PostgresServer) -> None:
        cpu = "?"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        try:
            import zstandard

            zstd_py = zstandard.__version__
        except ImportError:  # pragma: no cover
            zstd_py = "?"
        self.versions = {
            "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}",
            "memory": human(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "PostgreSQL server": pg.psql("postgres", "show server_version"),
            "pg_dump": first_line([str(PG_BIN / "pg_dump"), "--version"]),
            "zstd": first_line(["zstd", "--version"]),
            "openssl": first_line(["openssl", "version"]),
            "python": platform.python_version(),
            "python-zstandard": zstd_py,
            "nats-server": first_line([str(Path(sys.executable).parent / "nats-server"), "--version"]),
            "rahatback agent": self.agent_version,
            "git commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
            + (
                " (+ uncommitted changes)"
                if first_line(["git", "-C", str(ROOT), "status", "--porcelain"]) != "?"
                else ""
            ),
        }

    def table(self) -> str:
        lines = [
            "| measurement | baseline runs (s) | baseline median | RahatBack runs (s) | RahatBack median "
            "| ratio (target ≤ 1.10) | agent peak RSS (target ≤ 150 MiB) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            target = RESTORE_TARGET if row.name.startswith("restore") else BACKUP_TARGET
            peak = max(max(row.rss_peaks_kib), row.hwm_kib or 0) / 1024
            lines.append(
                f"| {row.name} | {row.baseline.cell()} | {row.baseline.median:.2f} | {row.rahat.cell()} "
                f"| {row.rahat.median:.2f} | **{row.ratio:.2f}** {verdict(row.ratio <= target)} "
                f"| {peak:.1f} MiB {verdict(peak <= RSS_TARGET_MIB)} |"
            )
        return "\n".join(lines)

    def details(self) -> str:
        lines = [
            "| measurement | agent-reported duration (s), per run | control-plane overhead (median) "
            "| CPU s, baseline runs (median) | CPU s, RahatBack runs (median) | CPU ratio "
            "| RSS peak per run (VmRSS / 50 ms) | VmHWM after the runs | 1-min load before each run "
            "| agent code (git HEAD; digest of agent + contracts sources) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            overhead = statistics.median(
                r - a for r, a in zip(row.rahat.values, row.agent_reported.values, strict=True)
            )
            loads = "; ".join(load.split()[0] for load in row.loads)
            lines.append(
                f"| {row.name} | {row.agent_reported.cell()} | {overhead:.2f} s "
                f"| {row.baseline_cpu.cell()} ({row.baseline_cpu.median:.2f}) "
                f"| {row.rahat_cpu.cell()} ({row.rahat_cpu.median:.2f}) "
                f"| {row.rahat_cpu.median / row.baseline_cpu.median:.2f} "
                f"| {', '.join(f'{k / 1024:.1f}' for k in row.rss_peaks_kib)} MiB "
                f"| {(row.hwm_kib or 0) / 1024:.1f} MiB | {loads} | {row.code_cell} |"
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        mode = "full" if self.scale == 1 else f"scale {self.scale} (NOT the reference size)"
        versions = "\n".join(f"| {k} | {v} |" for k, v in self.versions.items())
        return f"""# Benchmarks

Reproduce: `make bench` (runs `uv run --frozen python bench/run.py`; `python bench/run.py --quick`
is a ~100 MB smoke run). Everything is built from scratch in a temporary folder: a throwaway
PostgreSQL 15 cluster (fsync off), the datasets, and the real stack — nats-server, the API on
SQLite and one enrolled agent, the same processes `make up` starts.

Run: {self.started:%Y-%m-%d %H:%M} UTC, {mode}, {self.runs} runs per measurement, medians.
Load average (1/5/15 min) at start: **{self.load_start}**, at end: **{self.load_end}** — the
machine was shared with other test runs, so absolute numbers are noisy; baseline and RahatBack
runs alternate (and alternate who goes first) so that drift hits both sides alike.

## Results

{self.table()}

- **baseline, backup**: `pg_dump -Fp --no-owner --no-privileges DB | zstd -3 -T0 | openssl enc
  -aes-256-ctr -pass pass:x -pbkdf2 > file` (bash, pipefail).
- **RahatBack, backup**: `POST /v1/backups/jobs/{{id}}/run` → API → NATS → agent → pg_dump →
  zstd level 3 → AES-GCM (RBK1) → local storage (fsync + rename) → report → API; timed from the
  POST to the `backup.completed` event arriving on `GET /v1/events` (SSE; the run is then read
  back from `GET /v1/backups/history/{{id}}` to check it is `completed`).
- **baseline, restore**: `zstd -d < dump.sql.zst | psql --single-transaction -v ON_ERROR_STOP=1`
  into a freshly created empty database.
- **RahatBack, restore**: `POST /v1/backups/history/{{id}}/restore` into a freshly created empty
  database until the `restore.completed` event arrives on `GET /v1/events`; row counts checked
  against the source afterwards.
- **peak RSS**: the agent process only (not its pg_dump/psql children), the larger of VmRSS
  sampled every 50 ms during the RahatBack runs and VmHWM read after them; the agent is restarted
  before each row so VmHWM covers only that row.

### Datasets

| database | contents | size on disk | plain dump |
|---|---|---|---|
{self.dataset_rows()}

Mixed rows (`bench_events`): bigint key, text (with an md5), numeric(12,2), timestamptz,
nullable timestamp, short status text, a jsonb object, nullable repeated text; an index on the
timestamp. See `MIXED_SQL` in bench/run.py.

### Details

{self.details()}

CPU = user + system seconds of the processes each side runs: for the baseline every process of
the shell pipeline (pg_dump or psql, zstd, openssl); for RahatBack the agent plus its pg_dump or
psql child. The PostgreSQL server's own work is in neither. On a shared 2-core machine the wall
time of a CPU-bound pipeline follows the CPU it needs and the share it gets, so the CPU ratio is
the steadier of the two comparisons.

Control-plane overhead = RahatBack wall time minus the duration the agent reports for the job
(API → NATS dispatch, agent pick-up, the agent's connection test, report back to the API, outbox
relay → NATS → SSE event).

### Machine and versions

| | |
|---|---|
{versions}

{self.s3_section()}
## Notes

{self.notes()}
{self.analysis()}"""

    @staticmethod
    def analysis() -> str:
        """bench/analysis.md (profiling findings, kept by hand) is appended to the report as is."""
        path = Path(__file__).with_name("analysis.md")
        return "\n" + path.read_text() if path.exists() else ""

    def dataset_rows(self) -> str:
        return "\n".join(
            f"| {d.database} | `pgbench -i -s {d.pgbench_scale}` + {d.mixed_rows:,} mixed rows "
            f"| {human(d.db_bytes)} | {human(d.dump_bytes)} |"
            for d in self.datasets
        )

    def notes(self) -> str:
        misses, close = [], []
        for row in self.rows:
            target = RESTORE_TARGET if row.name.startswith("restore") else BACKUP_TARGET
            peak = max(max(row.rss_peaks_kib), row.hwm_kib or 0) / 1024
            for label, value, limit in (("ratio", row.ratio, target), ("peak RSS MiB", peak, RSS_TARGET_MIB)):
                if value > limit:
                    misses.append(f"{row.name}: {label} {value:.2f} > {limit}")
                elif value > 0.95 * limit:
                    close.append(f"{row.name}: {label} {value:.2f} (target {limit})")
        text = (
            "Targets missed in this run: " + "; ".join(misses) + "."
            if misses
            else "All targets met in this run."
        )
        if close:
            text += " Within 5 % of a target (a noisier run could miss): " + "; ".join(close) + "."
        if self.args.note:
            text += "\n\n" + self.args.note
        return text

    # -- main

    def run(self) -> None:
        with running_postgres(self.work / "pg") as pg:
            self.build(pg)
            stack = Stack(self.work / "stack", api_port=free_port(), nats_port=free_port())
            try:
                token = stack.start()
                api = Api(stack.api, token)
                self.events = EventStream(api)
                agent_id, target_id = self.register(api, pg)
                self.collect_versions(pg)
                full, half = self.datasets
                log(f"load average {self.load_start}; measuring backups")
                self.rows.append(self.backup_row(stack, token, api, pg, full))
                full_run_id = self.last_run_id
                self.rows.append(self.backup_row(stack, token, api, pg, half))
                log("measuring restores")
                self.rows.append(self.restore_row(stack, token, api, pg, full, full_run_id, target_id))
                if self.args.s3:
                    log("measuring the S3 path (moto_server on loopback)")
                    with running_moto(self.work / "moto") as s3:
                        s3_job = self.register_s3(api, s3, agent_id, full)
                        self.s3_paths.append(self.s3_row(stack, token, api, s3, full, s3_job))
            finally:
                stack.stop()
        self.load_end = loadavg()
        text = self.markdown()
        output = Path(self.args.output)
        output.write_text(text)
        print()
        print(self.table())
        print()
        print(self.details())
        if self.s3_paths:
            print()
            print(self.s3_table())
        print(f"\nload average at start {self.load_start}, at end {self.load_end}; written to {output}")
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size factor (1 = ~1 GB)")
    parser.add_argument("--quick", action="store_true", help="a ~100 MB smoke run (--scale 0.1)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (default 3)")
    parser.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--workdir", help="where to build everything (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("--no-prune", dest="prune", action="store_false", help="keep every artifact")
    parser.add_argument("--note", help="extra text for the Notes section of the report")
    parser.add_argument("--no-s3", dest="s3", action="store_false", help="skip the S3 (moto) path")
    args = parser.parse_args()
    if args.quick:
        args.scale = 0.1
    Bench(args).run()


if __name__ == "__main__":
    main()
