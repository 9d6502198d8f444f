"""structlog set-up for every RahatBack service: console in a terminal, JSON in containers.

Never a "rich" traceback with local variables: locals can hold decrypted secrets, opened webhook
URLs or keys. Services still never log a secret; this only keeps tracebacks from doing it for them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Literal

import structlog

__all__ = ["configure_logging"]


def configure_logging(
    log_format: Literal["console", "json"] | str = "console",
    level: str = "info",
    *,
    quiet: Iterable[str] = (),
) -> None:
    """Render to stderr at `level` ("debug" … "error", any case). `quiet`: stdlib loggers that only
    matter at WARNING (e.g. httpx logs every request URL at INFO, and a Slack URL is a credential)."""
    renderer: structlog.typing.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if log_format == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
