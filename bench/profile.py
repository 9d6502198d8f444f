"""Where does a RahatBack backup/restore spend its time? `python bench/profile.py --py-spy PATH`.

Builds the bench datasets (default scale 0.5), starts the real stack, then runs one backup and one
restore of the full dataset through the API while py-spy records the agent (raw collapsed stacks,
one file per operation, `--threads`), and prints the CPU seconds the agent and its tool children
used against the wall time. py-spy is not a dependency: install it anywhere (e.g. a throwaway venv)
and pass its path. Needs root or ptrace rights over the agent.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from run import Api, Bench, Stack, free_port, log, running_postgres

TICKS = 100  # USER_HZ on Linux


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process plus its waited-for children (pg_dump/psql once reaped)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / TICKS


def record(py_spy: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--threads",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let py-spy attach before the operation starts
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(60)


def top_frames(raw: Path, limit: int = 25) -> str:
    """Self time per leaf function from py-spy's collapsed stacks (`frame;frame;leaf count`)."""
    totals: dict[str, int] = {}
    all_samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        totals[leaf] = totals.get(leaf, 0) + int(count)
        all_samples += int(count)
    rows = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)[:limit]
    return "\n".join(f"{count / all_samples:6.1%}  {leaf}" for leaf, count in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--py-spy", required=True, help="path to the py-spy binary")
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "rahatback-profile"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        argparse.Namespace(
            scale=args.scale, runs=1, workdir=None, prune=False, note=None, output="", keep=False
        )
    )
    try:
        with running_postgres(bench.work / "pg") as pg:
            bench.build(pg)
            stack = Stack(bench.work / "stack", api_port=free_port(), nats_port=free_port())
            try:
                token = stack.start()
                api = Api(stack.api, token)
                _, target_id = bench.register(api, pg)
                full = bench.datasets[0]
                pid = bench.restart_agent(stack, token)
                spy = record(args.py_spy, pid, out / "backup.txt")
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                run = api.ok("POST", f"/v1/backups/jobs/{full.job_id}/run")
                run = api.wait(f"/v1/backups/history/{run['id']}", timeout=3600)
                wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                stop(spy)
                log(f"backup: wall {wall:.2f} s, agent+children CPU {cpu:.2f} s, dump {run['dump_size']:,} B")
                print(top_frames(out / "backup.txt"))
                pg.psql("postgres", "create database bench_restore")
                spy = record(args.py_spy, pid, out / "restore.txt")
                cpu0, t0 = cpu_seconds(pid), time.perf_counter()
                restore = api.ok(
                    "POST", f"/v1/backups/history/{run['id']}/restore", {"database_id": target_id}
                )
                api.wait(f"/v1/backups/restores/{restore['id']}", timeout=3600)
                wall, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
                stop(spy)
                log(f"restore: wall {wall:.2f} s, agent+children CPU {cpu:.2f} s")
                print(top_frames(out / "restore.txt"))
                log(f"raw stacks in {out}; agent log: {bench.work / 'stack' / 'agent.log'}")
                shutil.copy(bench.work / "stack" / "agent.log", out / "agent.log")
            finally:
                stack.stop()
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)


if __name__ == "__main__":
    main()
