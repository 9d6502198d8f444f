"""A small Google Drive v3 server for the tests: exactly the endpoints the gdrive storage uses.

No Drive server can run here, so the real google-api-python-client / google-auth code is pointed
at this one (`client_options={"api_endpoint": ...}`, `token_uri`). It implements:

- the OAuth token endpoint: the JWT-bearer grant of service accounts (the RS256 signature is
  checked against the registered public key) and the refresh-token grant of OAuth clients;
- files.list with the `q` grammar the storage sends (name / parents / mimeType / trashed with
  and, or and parentheses), orderBy createdTime, paging; files.get (metadata, and `alt=media`
  with Range); files.create (folders); files.delete (recursively, like Drive for an owner);
- resumable uploads: POST `uploadType=resumable` → Location; PUT chunks with Content-Range,
  308 + `Range: bytes=0-N`; status queries `Content-Range: bytes */*`; DELETE cancels (499).
  Non-final chunks must be multiples of 256 KiB, as on Drive. A chunk that starts before the
  acknowledged offset has its overlap checked and skipped (what Google's upload servers do);
  one that starts after it is refused.

Faults (`FakeDrive.faults`) are applied to the next data-carrying chunk PUTs, to test resuming.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

FOLDER_MIME = "application/vnd.google-apps.folder"
GRANULARITY = 256 * 1024
API_PREFIX = "/drive/v3/"
UPLOAD_PATH = "/upload/drive/v3/files"
EPOCH = datetime(2026, 1, 1)

FaultKind = Literal["partial_503", "short_ack", "reset", "fail"]


@dataclass
class Fault:
    """What the next data-carrying chunk PUT suffers.

    partial_503: the server keeps only the first `keep` bytes of the chunk, then answers 503.
    short_ack:   keeps `keep` bytes and answers 308 acknowledging only those.
    reset:       keeps `keep` bytes and drops the connection without an answer.
    fail:        keeps nothing and answers 503.
    """

    kind: FaultKind
    keep: int = 0


@dataclass
class FakeFile:
    id: str
    name: str
    mime_type: str
    parents: list[str]
    created: int
    content: bytes = b""

    def resource(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "drive#file",
            "id": self.id,
            "name": self.name,
            "mimeType": self.mime_type,
            "parents": list(self.parents),
            "trashed": False,
            "createdTime": (EPOCH + timedelta(milliseconds=self.created)).isoformat(timespec="milliseconds")
            + "Z",
        }
        if self.mime_type != FOLDER_MIME:
            out["size"] = str(len(self.content))
            out["md5Checksum"] = hashlib.md5(self.content, usedforsecurity=False).hexdigest()
        return out


@dataclass
class Session:
    id: str
    name: str
    parents: list[str]
    mime_type: str
    received: bytearray = field(default_factory=bytearray)
    file_id: str | None = None


@dataclass
class ChunkPut:
    start: int
    length: int
    total: str


class HttpFailure(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------- the `q` grammar


_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^'\\]|\\.)*')|(?P<op>!=|=|\(|\))|(?P<word>[A-Za-z]+))")

Predicate = Callable[[FakeFile], bool]


def _tokens(q: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(q.rstrip()):
        m = _TOKEN.match(q, pos)
        if m is None:
            raise HttpFailure(400, "invalidQuery", f"Invalid Value (query at {pos}: {q[pos : pos + 20]!r})")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("str", re.sub(r"\\(.)", r"\1", m.group("str")[1:-1])))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("word", m.group("word")))
    return out


class _Query:
    """expr := term ('or' term)*; term := factor ('and' factor)*;
    factor := '(' expr ')' | STRING 'in' 'parents' | FIELD ('='|'!=') value"""

    def __init__(self, q: str) -> None:
        self.toks = _tokens(q)
        self.i = 0
        self.predicate = self.expr()
        if self.i != len(self.toks):
            raise HttpFailure(400, "invalidQuery", "Invalid Value (trailing tokens in q)")

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise HttpFailure(400, "invalidQuery", "Invalid Value (q ends early)")
        self.i += 1
        return tok

    def expr(self) -> Predicate:
        parts = [self.term()]
        while self.peek() == ("word", "or"):
            self.i += 1
            parts.append(self.term())
        return lambda f: any(p(f) for p in parts)

    def term(self) -> Predicate:
        parts = [self.factor()]
        while self.peek() == ("word", "and"):
            self.i += 1
            parts.append(self.factor())
        return lambda f: all(p(f) for p in parts)

    def factor(self) -> Predicate:
        kind, value = self.take()
        if (kind, value) == ("op", "("):
            inner = self.expr()
            if self.take() != ("op", ")"):
                raise HttpFailure(400, "invalidQuery", "Invalid Value (unbalanced parentheses)")
            return inner
        if kind == "str":
            if self.take() != ("word", "in") or self.take() != ("word", "parents"):
                raise HttpFailure(400, "invalidQuery", "Invalid Value (expected 'in parents')")
            return lambda f: value in f.parents
        if kind != "word" or value not in ("name", "mimeType", "trashed"):
            raise HttpFailure(400, "invalidQuery", f"Invalid Value (unsupported term {value!r})")
        _, op = self.take()
        if op not in ("=", "!="):
            raise HttpFailure(400, "invalidQuery", f"Invalid Value (unsupported operator {op!r})")
        vkind, operand = self.take()
        if value == "trashed":
            if vkind != "word" or operand not in ("true", "false"):
                raise HttpFailure(400, "invalidQuery", "Invalid Value (trashed takes true/false)")
            wanted = operand == "true"
            return lambda f: (wanted is False) == (op == "=")  # nothing in this fake is trashed
        if vkind != "str":
            raise HttpFailure(400, "invalidQuery", f"Invalid Value ({value} takes a quoted string)")
        attr = "name" if value == "name" else "mime_type"
        if op == "=":
            return lambda f: getattr(f, attr) == operand
        return lambda f: getattr(f, attr) != operand


# ---------------------------------------------------------------- the server


class FakeDrive:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, FakeFile] = {}
        self.sessions: dict[str, Session] = {}
        self.tokens: set[str] = set()
        self.service_accounts: dict[str, rsa.RSAPublicKey] = {}
        self.oauth_clients: dict[str, tuple[str, str]] = {}  # client id -> (secret, refresh token)
        self.read_only_folders: set[str] = set()
        self.faults: list[Fault] = []
        self.fail_every_chunk = False
        # answers to a completing PUT that are lost (the upload completes, the client never hears)
        self.lost_completion_answers = 0
        self.max_page_size = 1000
        # what happened, for the tests' assertions
        self.folder_creates: list[str] = []
        self.chunk_puts: list[ChunkPut] = []
        self.status_queries = 0
        self.cancelled_sessions = 0
        self.token_grants = 0
        self.list_calls = 0
        self._created = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle and addresses

    def start(self) -> FakeDrive:
        drive = self

        class Handler(_Handler):
            fake = drive

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-drive", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def api_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{API_PREFIX}"

    @property
    def token_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    # -- set-up helpers

    def add_service_account(self, email: str) -> dict[str, str]:
        """Register a service account and return its JSON key file's content (as Google issues it)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        from cryptography.hazmat.primitives import serialization

        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.service_accounts[email] = key.public_key()
        return {
            "type": "service_account",
            "project_id": "rahatback-tests",
            "private_key_id": secrets.token_hex(20),
            "private_key": pem,
            "client_email": email,
            "client_id": "1" * 21,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "universe_domain": "googleapis.com",
        }

    def add_oauth_client(self, client_id: str, client_secret: str, refresh_token: str) -> None:
        self.oauth_clients[client_id] = (client_secret, refresh_token)

    def add_folder(self, name: str, parent: str | None = None) -> str:
        with self.lock:
            return self._new_file(name, FOLDER_MIME, [parent] if parent else []).id

    def add_file(self, name: str, parent: str, content: bytes) -> str:
        with self.lock:
            return self._new_file(name, "application/octet-stream", [parent], content).id

    # -- inspection helpers

    def children(self, parent: str) -> list[FakeFile]:
        with self.lock:
            return sorted((f for f in self.files.values() if parent in f.parents), key=lambda f: f.created)

    def at_path(self, root: str, key: str) -> list[FakeFile]:
        """Every file reachable as `key` (folder names, then a file name) under `root`."""
        parents = [root]
        *folders, name = key.split("/")
        for segment in folders:
            parents = [
                f.id
                for p in parents
                for f in self.children(p)
                if f.name == segment and f.mime_type == FOLDER_MIME
            ]
        return [f for p in parents for f in self.children(p) if f.name == name and f.mime_type != FOLDER_MIME]

    def content(self, root: str, key: str) -> bytes:
        found = self.at_path(root, key)
        assert len(found) == 1, f"{key!r}: {len(found)} files"
        return found[0].content

    def all_files(self) -> list[FakeFile]:
        with self.lock:
            return [f for f in self.files.values() if f.mime_type != FOLDER_MIME]

    # -- state changes (called with the lock held)

    def _new_file(self, name: str, mime: str, parents: list[str], content: bytes = b"") -> FakeFile:
        self._created += 1
        f = FakeFile(secrets.token_hex(8), name, mime, parents, self._created, content)
        self.files[f.id] = f
        return f

    def _check_parents(self, parents: list[str]) -> None:
        for parent in parents:
            folder = self.files.get(parent)
            if folder is None or folder.mime_type != FOLDER_MIME:
                raise HttpFailure(404, "notFound", f"File not found: {parent}.")
            if parent in self.read_only_folders:
                raise HttpFailure(
                    403,
                    "insufficientFilePermissions",
                    "The user does not have sufficient permissions for this file.",
                )

    def _delete(self, file_id: str) -> None:
        for child in [f.id for f in self.files.values() if file_id in f.parents]:
            self._delete(child)
        self.files.pop(file_id, None)


def _jwt_part(data: str) -> bytes:
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeDrive
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # headers and body go out in two writes: without this, Nagle + delayed ACKs add 40 ms a request
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        return

    # -- plumbing

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})}
        )

    def _error(self, failure: HttpFailure) -> None:
        self._json(
            failure.status,
            {
                "error": {
                    "code": failure.status,
                    "message": failure.message,
                    "errors": [{"domain": "global", "reason": failure.reason, "message": failure.message}],
                }
            },
        )

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = self._body() if method in ("POST", "PUT") else b""
            if url.path == "/token" and method == "POST":
                return self._token(body)
            if url.path == UPLOAD_PATH:
                if method == "POST" and query.get("uploadType") == "resumable" and "upload_id" not in query:
                    self._authorize()
                    return self._start_session(body)
                if "upload_id" in query and method in ("PUT", "DELETE"):
                    return self._session(method, query["upload_id"], body)
            if url.path.startswith(API_PREFIX + "files"):
                self._authorize()
                rest = url.path[len(API_PREFIX + "files") :].strip("/")
                if not rest and method == "GET":
                    return self._list(query)
                if not rest and method == "POST":
                    return self._create(body)
                if rest and method == "GET":
                    return self._get(rest, query)
                if rest and method == "DELETE":
                    return self._delete(rest)
            raise HttpFailure(404, "notFound", f"no route for {method} {url.path}")
        except HttpFailure as failure:
            self._error(failure)

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    # -- auth

    def _authorize(self) -> None:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.fake.tokens:
            raise HttpFailure(401, "authError", "Invalid Credentials")

    def _grant(self) -> None:
        token = "ya29." + secrets.token_urlsafe(24)
        with self.fake.lock:
            self.fake.tokens.add(token)
            self.fake.token_grants += 1
        self._json(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})

    def _token(self, body: bytes) -> None:
        form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
        grant = form.get("grant_type")
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            if self._jwt_ok(form.get("assertion", "")):
                return self._grant()
            return self._json(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."})
        if grant == "refresh_token":
            known = self.fake.oauth_clients.get(form.get("client_id", ""))
            if known is None or known[0] != form.get("client_secret"):
                return self._json(401, {"error": "invalid_client", "error_description": "Unauthorized"})
            if known[1] != form.get("refresh_token"):
                return self._json(400, {"error": "invalid_grant", "error_description": "Bad Request"})
            return self._grant()
        self._json(400, {"error": "unsupported_grant_type"})

    def _jwt_ok(self, assertion: str) -> bool:
        try:
            head, payload, signature = assertion.split(".")
            claims = json.loads(_jwt_part(payload))
            public = self.fake.service_accounts[claims["iss"]]
            public.verify(
                _jwt_part(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (ValueError, KeyError, InvalidSignature):
            return False
        # google-auth signs for Google's token endpoint whatever token_uri it posts to; Google checks it
        return bool(claims.get("aud") == "https://oauth2.googleapis.com/token")

    # -- files

    def _list(self, query: dict[str, str]) -> None:
        predicate = _Query(query.get("q", "")).predicate if query.get("q") else (lambda f: True)
        with self.fake.lock:
            self.fake.list_calls += 1
            found = [f for f in self.fake.files.values() if predicate(f)]
        order = query.get("orderBy", "")
        if order not in ("", "createdTime", "createdTime desc"):
            raise HttpFailure(400, "invalidParameter", f"unsupported orderBy {order!r}")
        found.sort(key=lambda f: f.created, reverse=order == "createdTime desc")
        size = min(int(query.get("pageSize", "100")), self.fake.max_page_size)
        start = int(query.get("pageToken") or 0)
        page: dict[str, Any] = {
            "kind": "drive#fileList",
            "files": [f.resource() for f in found[start : start + size]],
        }
        if start + size < len(found):
            page["nextPageToken"] = str(start + size)
        self._json(200, page)

    def _create(self, body: bytes) -> None:
        meta = json.loads(body or b"{}")
        if meta.get("mimeType") != FOLDER_MIME:
            raise HttpFailure(400, "badRequest", "this fake creates only folders without media")
        with self.fake.lock:
            self.fake._check_parents(meta.get("parents", []))
            f = self.fake._new_file(meta["name"], FOLDER_MIME, meta.get("parents", []))
            self.fake.folder_creates.append(meta["name"])
        self._json(200, f.resource())

    def _file(self, file_id: str) -> FakeFile:
        f = self.fake.files.get(file_id)
        if f is None:
            raise HttpFailure(404, "notFound", f"File not found: {file_id}.")
        return f

    def _get(self, file_id: str, query: dict[str, str]) -> None:
        with self.fake.lock:
            f = self._file(file_id)
        if query.get("alt") != "media":
            return self._json(200, f.resource())
        if f.mime_type == FOLDER_MIME:
            raise HttpFailure(403, "fileNotDownloadable", "Only files with binary content can be downloaded.")
        data = f.content
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged is None:
            return self._send(200, data, {"Content-Type": "application/octet-stream"})
        start = int(ranged.group(1))
        end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
        if start >= len(data):
            return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        self._send(
            206,
            data[start : end + 1],
            {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {start}-{end}/{len(data)}"},
        )

    def _delete(self, file_id: str) -> None:
        with self.fake.lock:
            f = self._file(file_id)
            for parent in f.parents:
                if parent in self.fake.read_only_folders:
                    raise HttpFailure(
                        403,
                        "insufficientFilePermissions",
                        "The user does not have sufficient permissions for this file.",
                    )
            self.fake._delete(file_id)
        self._send(204)

    # -- resumable uploads

    def _start_session(self, body: bytes) -> None:
        meta = json.loads(body or b"{}")
        parents = list(meta.get("parents", []))
        with self.fake.lock:
            self.fake._check_parents(parents)
            session = Session(
                secrets.token_hex(8),
                meta["name"],
                parents,
                self.headers.get("X-Upload-Content-Type", "application/octet-stream"),
            )
            self.fake.sessions[session.id] = session
        host = self.headers.get("Host", f"127.0.0.1:{self.fake.port}")
        location = f"http://{host}{UPLOAD_PATH}?uploadType=resumable&upload_id={session.id}"
        self._send(200, b"", {"Location": location})

    def _ack(self, session: Session) -> None:
        headers = {"Range": f"bytes=0-{len(session.received) - 1}"} if session.received else {}
        self._send(308, b"", headers)

    def _drop_connection(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _finish(self, session: Session, *, status_query: bool = False) -> None:
        if session.file_id is None:
            f = self.fake._new_file(session.name, session.mime_type, session.parents, bytes(session.received))
            session.file_id = f.id
        if not status_query and self.fake.lost_completion_answers > 0:
            self.fake.lost_completion_answers -= 1
            return self._drop_connection()
        self._json(200, self.fake.files[session.file_id].resource())

    def _session(self, method: str, upload_id: str, body: bytes) -> None:
        with self.fake.lock:
            session = self.fake.sessions.get(upload_id)
            if session is None:
                raise HttpFailure(404, "notFound", "No such upload session.")
            if method == "DELETE":
                del self.fake.sessions[upload_id]
                self.fake.cancelled_sessions += 1
                return self._send(499)
            header = self.headers.get("Content-Range")
            if header is None:  # the whole (empty) upload in one request
                if session.received or body:
                    raise HttpFailure(400, "badRequest", "Content-Range is required")
                return self._finish(session)
            m = re.fullmatch(r"bytes (\*|(\d+)-(\d+))/(\*|\d+)", header)
            if m is None:
                raise HttpFailure(400, "badRequest", f"bad Content-Range {header!r}")
            total = None if m.group(4) == "*" else int(m.group(4))
            if m.group(1) == "*":
                self.fake.status_queries += 1
                if session.file_id is not None or (total is not None and total == len(session.received)):
                    return self._finish(session, status_query=True)
                return self._ack(session)
            if session.file_id is not None:
                return self._finish(session)
            start, end = int(m.group(2)), int(m.group(3))
            if end - start + 1 != len(body):
                raise HttpFailure(400, "badRequest", "Content-Range does not match the body length")
            if total is None and len(body) % GRANULARITY:
                raise HttpFailure(400, "badRequest", "a non-final chunk must be a multiple of 256 KiB")
            if total is not None and end + 1 != total:
                raise HttpFailure(400, "badRequest", "the final chunk must end at the total size")
            if start > len(session.received):
                raise HttpFailure(400, "badRequest", f"chunk starts at {start}, past the acknowledged bytes")
            self.fake.chunk_puts.append(ChunkPut(start, len(body), m.group(4)))
            overlap = len(session.received) - start
            if body[:overlap] != session.received[start:]:
                raise HttpFailure(400, "badRequest", "a resent chunk differs from the bytes already stored")
            fresh = body[overlap:]
            fault = self.fake.faults.pop(0) if self.fake.faults and fresh else None
            if self.fake.fail_every_chunk:
                fault = Fault("fail")
            if fault is not None:
                session.received += fresh[: fault.keep]
                if fault.kind in ("partial_503", "fail"):
                    raise HttpFailure(503, "backendError", "Backend Error")
                if fault.kind == "short_ack":
                    return self._ack(session)
                return self._drop_connection()
            session.received += fresh
            if total is not None and len(session.received) == total:
                return self._finish(session)
            self._ack(session)
