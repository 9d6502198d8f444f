"""`rahatback-scheduler`: `run` the service, or `next` to preview an expression's fire times."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime

import structlog
from rahatback_logging import configure_logging

from .cron import CronError, CronSchedule
from .metrics import Metrics
from .scheduler import Scheduler
from .settings import SchedulerSettings


async def run_scheduler(settings: SchedulerSettings) -> None:
    log = structlog.get_logger("rahatback_scheduler")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signame: str) -> None:
        if not stop.is_set():
            log.info("stop requested; draining", signal=signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    metrics = Metrics()
    if settings.metrics_port:
        port = metrics.serve(settings.metrics_host, settings.metrics_port)
        log.info("metrics.serving", url=f"http://{settings.metrics_host}:{port}/metrics")
    try:
        await Scheduler(settings, metrics).run(stop)
    finally:
        metrics.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def preview(expr: str, timezone: str, count: int) -> int:
    try:
        schedule = CronSchedule(expr, timezone)
    except CronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for fire in schedule.preview(datetime.now(UTC), count):
        print(f"{fire.astimezone(schedule.zone).isoformat()}  ({fire:%Y-%m-%dT%H:%M:%SZ})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rahatback-scheduler", description="RahatBack scheduler")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run", help="watch KV SCHEDULES and publish backup.requested (settings: RAHATBACK_SCHEDULER_*)"
    )
    p_next = sub.add_parser("next", help="print the next fire times of a cron expression")
    p_next.add_argument("cron", help="e.g. '30 2 * * *' (quote it)")
    p_next.add_argument("--timezone", "--tz", default="UTC", help="IANA name, e.g. Europe/Berlin")
    p_next.add_argument("-n", "--count", type=int, default=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "next":
        return preview(args.cron, args.timezone, args.count)
    settings = SchedulerSettings()
    # APScheduler logs every job it adds and runs through stdlib logging: only its problems matter
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    configure_logging(settings.log_format, settings.log_level, quiet=("apscheduler",))
    asyncio.run(run_scheduler(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
