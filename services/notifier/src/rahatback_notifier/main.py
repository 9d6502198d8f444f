"""`rahatback-notifier`: run (consume events until SIGTERM), keygen, public-key."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import sys
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import start_http_server
from pydantic import ValidationError
from rahatback_logging import configure_logging

from . import __version__
from .consumer import Notifier
from .settings import ConfigurationError, NotifierSettings

# httpx logs every request line, URL included, at INFO: a Slack or webhook URL is a credential
QUIET_LOGGERS = ("httpx", "httpcore")


def public_key_b64(key: X25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


async def run_notifier(settings: NotifierSettings, private_key: X25519PrivateKey | None) -> None:
    log = structlog.get_logger("rahatback_notifier")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(signame: str) -> None:
        if not stop.is_set():
            log.info("stop requested; finishing the current event", signal=signame)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    metrics_server = None
    if settings.metrics_port:
        metrics_server, _ = start_http_server(settings.metrics_port, addr=settings.metrics_host)
        log.info("metrics.listening", host=settings.metrics_host, port=settings.metrics_port)
    try:
        await Notifier(settings, private_key=private_key).run(stop)
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def keygen(out: Path | None, force: bool) -> int:
    key = X25519PrivateKey.generate()
    private_b64 = base64.b64encode(key.private_bytes_raw()).decode()
    if out is None:
        print(f"RAHATBACK_NOTIFIER_PRIVATE_KEY={private_b64}")
    else:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
        try:
            fd = os.open(out, flags, 0o600)
        except FileExistsError:
            print(f"error: {out} exists; pass --force to replace it", file=sys.stderr)
            return 1
        with os.fdopen(fd, "w") as handle:
            handle.write(private_b64 + "\n")
        print(f"private key written to {out} (set RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE={out})")
    # the API seals webhook and Slack URLs to this key
    print(f"public key (give it to the API): {public_key_b64(key)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahatback-notifier",
        description="RahatBack notifier: emails, webhooks and Slack messages for domain events",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="consume events and send notifications until SIGTERM")
    p_keygen = sub.add_parser("keygen", help="generate the X25519 key pair channel secrets are sealed to")
    p_keygen.add_argument("--out", type=Path, help="write the private key to this file (mode 0600)")
    p_keygen.add_argument("--force", action="store_true", help="replace an existing key file")
    sub.add_parser("public-key", help="print the public key of the configured private key")
    sub.add_parser("version", help="print the notifier version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "version":
        print(__version__)
        return 0
    if args.command == "keygen":
        return keygen(args.out, args.force)
    try:
        settings = NotifierSettings()
        private_key = settings.load_private_key()
    except (ConfigurationError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.command == "public-key":
        if private_key is None:
            print(
                "error: no private key configured "
                "(RAHATBACK_NOTIFIER_PRIVATE_KEY or RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE)",
                file=sys.stderr,
            )
            return 1
        print(public_key_b64(private_key))
        return 0
    configure_logging(settings.log_format, settings.log_level, quiet=QUIET_LOGGERS)
    asyncio.run(run_notifier(settings, private_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
