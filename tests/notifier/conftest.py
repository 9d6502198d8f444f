"""Notifier test rig: the real notifier loop against the session's nats-server, a real aiosmtpd
SMTP server, and a stdlib HTTP server standing in for webhook receivers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import json
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import nats
import pytest
import structlog
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from rahatback_contracts import messages as m
from rahatback_contracts import streams, subjects
from rahatback_contracts.sealing import seal
from rahatback_notifier.consumer import Notifier
from rahatback_notifier.main import public_key_b64
from rahatback_notifier.settings import NotifierSettings

from tests.servers import NatsServer, free_port

DEADLINE_SECONDS = 30.0  # only a bound against hanging, never an assertion about speed


@pytest.fixture(autouse=True)
def fresh_logging() -> Iterator[None]:
    """Other suites configure structlog with the stderr of their moment (possibly a closed capture
    stream); the notifier's tests log through structlog's defaults instead."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


# ------------------------------------------------------------------------------------- SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    login: str | None

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None and body.get_content_subtype() == subtype, f"no text/{subtype} part"
        content: str = body.get_content()  # type: ignore[attr-defined]
        return content


@dataclass
class SmtpServer:
    host: str
    port: int
    messages: list[Received] = field(default_factory=list)
    login: str = "notifier"
    password: str = "smtp-Pa55-word-9f2c"
    ca_file: Path | None = None

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        parsed = message_from_bytes(content, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        auth = session.auth_data
        self.messages.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                message=parsed,
                login=auth.login.decode() if isinstance(auth, LoginPassword) else None,
            )
        )
        return "250 Message accepted for delivery"

    def authenticate(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == self.login
            and auth_data.password.decode() == self.password
        )
        # handled=False: aiosmtpd answers a refusal with 535 itself
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclass
class TlsFiles:
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        return context


@contextlib.contextmanager
def running_smtp(
    mode: Literal["plain", "starttls", "tls"] = "plain", tls: TlsFiles | None = None
) -> Iterator[SmtpServer]:
    """A real SMTP server on a random loopback port: plain; STARTTLS required with AUTH required
    (only over TLS); or implicit TLS with AUTH (aiosmtpd does not see implicit TLS as TLS, so AUTH
    is offered without its TLS check, and the test asserts the login reached the server)."""
    server = SmtpServer(host="127.0.0.1", port=free_port(), ca_file=tls.cert if tls else None)
    options: dict[str, Any] = {}
    if mode == "starttls":
        assert tls is not None
        options = {
            "tls_context": tls.server_context(),
            "require_starttls": True,
            "authenticator": server.authenticate,
            "auth_required": True,
        }
    elif mode == "tls":
        assert tls is not None
        options = {
            "ssl_context": tls.server_context(),
            "authenticator": server.authenticate,
            "auth_require_tls": False,
        }
    controller = Controller(server, hostname=server.host, port=server.port, **options)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with running_smtp() as server:
        yield server


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 that the notifier trusts through smtp_ca_file."""
    directory = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "RahatBack test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(cert=directory / "smtp.crt", key=directory / "smtp.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


# ------------------------------------------------------------------------------------- webhooks


@dataclass
class HttpRequest:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    base_url: str
    requests: list[HttpRequest] = field(default_factory=list)
    # status for each request in turn; the last one repeats
    statuses: list[int] = field(default_factory=lambda: [200])

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def next_status(self) -> int:
        return self.statuses[min(len(self.requests) - 1, len(self.statuses) - 1)]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    state = WebhookReceiver(base_url=f"http://127.0.0.1:{server.server_address[1]}")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(
                HttpRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            status = state.next_status()
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            # the request line holds the webhook path (a credential): never print it
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------------- NATS


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
async def js(nc: Client) -> AsyncIterator[JetStreamContext]:
    context = nc.jetstream()
    # each test starts with a fresh notifier consumer, so it sees only its own events
    with contextlib.suppress(NotFoundError):
        await context.delete_consumer(streams.EVENTS.name, streams.NOTIFIER_EVENTS_CONSUMER.durable)
    yield context


@dataclass
class NotifierKey:
    private: X25519PrivateKey
    public_b64: str


@pytest.fixture(scope="session")
def notifier_key() -> NotifierKey:
    key = X25519PrivateKey.generate()
    return NotifierKey(private=key, public_b64=public_key_b64(key))


@pytest.fixture
def make_settings(nats_server: NatsServer, tmp_path: Path) -> Callable[..., NotifierSettings]:
    def build(**overrides: Any) -> NotifierSettings:
        values: dict[str, Any] = {
            "nats_url": nats_server.url,
            "mail_from": "RahatBack <backups@rahatback.test>",
            "outbox_dir": tmp_path / "outbox",
            "max_attempts": 3,
            "backoff_base_seconds": 0.05,
            "backoff_cap_seconds": 0.2,
            "fetch_timeout_seconds": 0.2,
            "http_timeout_seconds": 5.0,
        }
        values.update(overrides)
        return NotifierSettings(**values)

    return build


@contextlib.asynccontextmanager
async def running_notifier(settings: NotifierSettings, key: NotifierKey | None) -> AsyncIterator[Notifier]:
    notifier = Notifier(settings, private_key=key.private if key else None)
    stop = asyncio.Event()
    task = asyncio.create_task(notifier.run(stop))
    ready = asyncio.create_task(notifier.ready.wait())
    await asyncio.wait({task, ready}, timeout=DEADLINE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises what made it stop
    assert ready.done(), "the notifier did not become ready"
    try:
        yield notifier
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE_SECONDS)


# ------------------------------------------------------------------------------------- events


def email_target(*recipients: str, channel_id: str | None = None) -> m.NotifyTarget:
    return m.NotifyTarget(
        channel_id=channel_id or uuid.uuid4().hex,
        channel_name="Ops mailbox",
        kind="email",
        recipients=list(recipients),
    )


def sealed_target(
    key: NotifierKey, event_id: str, kind: str, url: str, secret: str | None = None, name: str = "Hook"
) -> m.NotifyTarget:
    channel_id = uuid.uuid4().hex
    payload = {"url": url} if secret is None else {"url": url, "secret": secret}
    return m.NotifyTarget(
        channel_id=channel_id,
        channel_name=name,
        kind=kind,  # type: ignore[arg-type]
        secrets=seal(key.public_b64, payload, m.seal_info("notify", f"{event_id}:{channel_id}")),
    )


def backup_event(
    event_type: str = "backup.completed",
    *,
    event_id: str | None = None,
    notify: list[m.NotifyTarget] | None = None,
    **fields: Any,
) -> m.BackupEvent:
    status = {"backup.completed": "completed", "backup.failed": "failed", "backup.partial": "partial"}
    values: dict[str, Any] = {
        "event_id": event_id or uuid.uuid4().hex,
        "type": event_type,
        "org_id": uuid.uuid4().hex,
        "occurred_at": dt.datetime(2026, 11, 26, 3, 2, 5, tzinfo=dt.UTC),
        "link": "http://127.0.0.1:8000/v1/backups/history/run-1",
        "run_id": uuid.uuid4().hex,
        "job_id": uuid.uuid4().hex,
        "job_name": "Nightly orders",
        "database_id": uuid.uuid4().hex,
        "database_name": "orders_db",
        "status": status.get(event_type, "running"),
        "trigger": "schedule",
        "dump_size": 123_456_789,  # 117.7 MiB
        "artifact_size": 23_456_789,  # 22.4 MiB
        "duration_ms": 125_000,  # 2 min 05 s
        "storage_name": "NAS",
        "storage_key": "orders_db/2026/11/26/orders_db_20261126T030000Z_run.sql.zst.rbk",
        "notify": notify or [],
    }
    values.update(fields)
    return m.BackupEvent(**values)


async def publish(js: JetStreamContext, event: m.DomainEvent, msg_id: str | None = None) -> int:
    ack = await js.publish(
        subjects.event_subject(event.type),
        event.to_bytes(),
        headers={"Nats-Msg-Id": msg_id or f"event:{event.event_id}"},
    )
    return int(ack.seq)


async def handled(js: JetStreamContext, seq: int) -> None:
    """Wait until the notifier has acknowledged (or terminated) every event up to `seq`."""
    spec = streams.NOTIFIER_EVENTS_CONSUMER
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        info = await js.consumer_info(spec.stream, spec.durable)
        if info.ack_floor is not None and (info.ack_floor.stream_seq or 0) >= seq:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"event {seq} was not acknowledged: {info}")
        await asyncio.sleep(0.05)


async def dead_letters(js: JetStreamContext, event_id: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Every dead letter of one event: (raw bytes, decoded JSON)."""
    info = await js.stream_info(streams.DEAD_LETTERS.name)
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(NotFoundError):
            raw = await js.get_msg(streams.DEAD_LETTERS.name, seq)
            assert raw.data is not None
            letter = json.loads(raw.data)
            if letter["event_id"] == event_id:
                found.append((raw.data, letter))
    return found


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
