"""A Google Drive folder as backup storage (google-api-python-client + google-auth).

Keys `<prefix>/<database>/<YYYY>/<MM>/<DD>/<file>` become sub-folders of the configured root
folder (found or created on demand, cached per storage instance) and a file named after the last
segment. Drive allows several files with one name in a folder: a commit removes the older ones,
and a read takes the newest, so a key names one object as on the other storages.

Which library calls go where:
- the discovery-built `drive` service (static discovery document, `api_endpoint` when set) builds
  every request: files.list / get / create (folders) / delete, and files.create with our
  `_StreamedMedia` as a resumable media body;
- the library's `HttpRequest.next_chunk` speaks the resumable protocol (session start, chunk PUTs
  with `Content-Range`, 308 + `Range` acknowledgements, `bytes */*` status queries after an
  error); we call it once per chunk, feed it bytes from the stream, and decide when to retry;
- `MediaIoBaseDownload` downloads in ranged chunks;
- the session URL is cancelled with a plain DELETE through the same authorized HTTP.

All of it is synchronous (httplib2): every call runs in a worker thread, with an httplib2.Http
from a small pool, because an httplib2.Http must not be shared between threads.

Upload memory is bounded to about one chunk: only bytes the server has not acknowledged are
kept. A chunk is sent only once more than a chunk is buffered, so the final chunk (which carries
the total size) is never empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import http.client
import json
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import google.auth.exceptions
import google_auth_httplib2  # type: ignore[import-untyped]  # untyped; AuthorizedHttp only
import httplib2  # type: ignore[import-untyped]  # untyped; Http and HttpLib2Error only
import structlog
from google.auth.credentials import Credentials
from google.oauth2 import credentials as oauth_credentials
from google.oauth2 import service_account
from googleapiclient.discovery import build  # type: ignore[import-untyped]  # untyped library
from googleapiclient.errors import HttpError  # type: ignore[import-untyped]  # untyped library
from googleapiclient.http import (  # type: ignore[import-untyped]  # untyped library
    MediaIoBaseDownload,
    MediaUpload,
    build_http,
)

from rahatback_agent.storages.base import StorageError

__all__ = ["GDriveStorage", "GDriveWriter", "RetryPolicy"]

log = structlog.get_logger(__name__)

FOLDER_MIME = "application/vnd.google-apps.folder"
DRIVE_SCOPE = "https://www.googleapis.com/auth/drive"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a password
UPLOAD_GRANULARITY = 256 * 1024  # Drive's rule for every chunk but the last
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
MAX_CHUNK_SIZE = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 120.0
API_RETRIES = 4  # the library's own retries of metadata calls and download chunks (5xx, 429, resets)
PAGE_SIZE = 1000
PARENTS_PER_QUERY = 40  # folders listed per files.list query (`'a' in parents or 'b' in parents ...`)
PROBE_PREFIX = ".rahatback-probe-"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})

_T = TypeVar("_T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often one chunk is retried (the count restarts whenever the server acknowledges more)."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 16.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


# ---------------------------------------------------------------- errors


def _http_details(exc: Any) -> tuple[int, str, str]:
    """(status, Google's reason code, Google's message) of an HttpError."""
    status = int(exc.resp.status)
    reason = ""
    message = str(getattr(exc, "reason", "") or "")
    try:
        error = json.loads(exc.content.decode("utf-8"))["error"]
        message = str(error.get("message") or message)
        reason = str(error["errors"][0]["reason"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        pass
    return status, reason, message[:300]


def _transport_errors() -> tuple[type[BaseException], ...]:
    return (
        httplib2.HttpLib2Error,
        OSError,  # ConnectionError, TimeoutError, socket errors
        http.client.HTTPException,
        google.auth.exceptions.TransportError,
    )


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, HttpError):
        status, reason, _ = _http_details(exc)
        return status in RETRYABLE_STATUS or (status == 403 and reason in RATE_LIMIT_REASONS)
    if isinstance(exc, google.auth.exceptions.RefreshError):
        return False  # refused credentials: retrying will not help
    return isinstance(exc, _transport_errors())


def _describe_transport(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, httplib2.HttpLib2Error | google.auth.exceptions.TransportError) and str(exc):
        return str(exc)[:200]
    return type(exc).__name__


def _storage_error(exc: BaseException, doing: str) -> StorageError:
    """A StorageError that says what failed, never quoting a credential."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, google.auth.exceptions.RefreshError):
        # args[0] is Google's "error: error_description"; the assertion / refresh token is never in it
        detail = str(exc.args[0])[:200] if exc.args else "refused"
        return StorageError("auth_failed", f"Google refused the credentials while {doing}: {detail}")
    if isinstance(exc, HttpError):
        status, reason, message = _http_details(exc)
        answer = " ".join(part for part in (str(status), reason, f"({message})" if message else "") if part)
        text = f"{doing} failed: Google Drive answered {answer}"
        if status == 401:
            return StorageError("auth_failed", text)
        if status == 403 and reason in ("storageQuotaExceeded", "quotaExceeded"):
            return StorageError(
                "quota_exceeded",
                text + "; service accounts have no storage of their own: use a folder in a shared drive",
            )
        if (status == 403 and reason in RATE_LIMIT_REASONS) or status == 429:
            return StorageError("rate_limited", text)
        if status == 403:
            return StorageError("permission_denied", text)
        if status == 404:
            return StorageError("not_found", text)
        if status >= 500:
            return StorageError("server_error", text)
        return StorageError("drive_error", text)
    if isinstance(exc, _transport_errors()):
        return StorageError("unreachable", f"{doing} failed: cannot reach Google: {_describe_transport(exc)}")
    return StorageError("drive_error", f"{doing} failed: {type(exc).__name__}")


# ---------------------------------------------------------------- keys and queries


def _split_key(key: str) -> tuple[tuple[str, ...], str]:
    if not key or "\x00" in key or "\\" in key or key.startswith("/"):
        raise StorageError("bad_key", f"invalid storage key {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise StorageError("bad_key", f"storage key {key!r} has an empty, '.' or '..' segment")
    return tuple(parts[:-1]), parts[-1]


def _quote(value: str) -> str:
    """A string literal of Drive's query language."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _in_parents(parent_ids: list[str]) -> str:
    clause = " or ".join(f"{_quote(p)} in parents" for p in parent_ids)
    return f"({clause})" if len(parent_ids) > 1 else clause


# ---------------------------------------------------------------- threads and HTTP


async def _in_thread(fn: Callable[..., _T], *args: object, stop: threading.Event | None = None) -> _T:
    """Run a blocking call in a worker thread. If we are cancelled, ask it to stop and still
    wait for it, so no thread keeps using a connection or the upload state after we returned."""
    fut = asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if stop is not None:
            stop.set()
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved, so asyncio does not report it as never retrieved
        raise


class _HttpPool:
    """Authorized httplib2 connections, one per concurrent call (httplib2 is not thread-safe)."""

    def __init__(self, credentials: Credentials, timeout: float) -> None:
        self._credentials = credentials
        self._timeout = timeout
        self._idle: list[Any] = []
        self._lock = threading.Lock()

    def _make(self) -> Any:
        http = build_http()  # the library's own: it keeps httplib2 from following Drive's 308s
        http.timeout = self._timeout
        return google_auth_httplib2.AuthorizedHttp(self._credentials, http=http)

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        with self._lock:
            http = self._idle.pop() if self._idle else self._make()
        try:
            yield http
        finally:
            with self._lock:
                self._idle.append(http)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


# ---------------------------------------------------------------- upload


class _NeedMoreData(Exception):
    """The server acknowledged more than we thought; wait for more bytes before the next chunk."""


class _StreamedMedia(MediaUpload):  # type: ignore[misc]  # the library's base class is untyped
    """A resumable media body fed from a stream: it holds only the bytes from the server's
    acknowledged offset on. Its size is unknown until commit, when the final chunk carries it."""

    def __init__(self, chunk_size: int) -> None:
        self._chunk = chunk_size
        self._buffer = bytearray()
        self._base = 0  # stream offset of _buffer[0]
        self.total: int | None = None
        self.peak = 0

    # MediaUpload's interface, called by HttpRequest.next_chunk
    def chunksize(self) -> int:
        return self._chunk

    def mimetype(self) -> str:
        return "application/octet-stream"

    def size(self) -> int | None:
        return self.total

    def resumable(self) -> bool:
        return True

    def has_stream(self) -> bool:
        return False

    def getbytes(self, begin: int, length: int) -> bytes:
        if begin < self._base:
            raise StorageError(
                "upload_failed",
                f"Google Drive lost bytes it had acknowledged (resume from {begin}, kept from {self._base})",
            )
        if begin > self.end:
            raise StorageError("upload_failed", "Google Drive acknowledged bytes that were never sent")
        data = bytes(self._buffer[begin - self._base : begin - self._base + length])
        if self.total is None and len(data) < length:
            # next_chunk would take a short read for the end of the upload and finalise it
            raise _NeedMoreData
        return data

    # ours
    @property
    def end(self) -> int:
        return self._base + len(self._buffer)

    def pending(self, acknowledged: int) -> int:
        return self.end - acknowledged

    def append(self, data: bytes) -> None:
        self._buffer += data
        self.peak = max(self.peak, len(self._buffer))

    def acknowledge(self, offset: int) -> None:
        offset = min(offset, self.end)
        if offset > self._base:
            del self._buffer[: offset - self._base]
            self._base = offset


class GDriveWriter:
    def __init__(
        self, storage: GDriveStorage, request: Any, media: _StreamedMedia, key: str, parent: str
    ) -> None:
        self._storage = storage
        self._parent = parent
        self._request = request
        self._media = media
        self._key = key
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._written = 0
        self._lock = threading.Lock()  # one thread at a time touches the session
        self._stop = threading.Event()
        self._file_id: str | None = None
        self._state = "open"

    @property
    def buffered_peak(self) -> int:
        """The most bytes this writer held at once (the memory bound the tests check)."""
        return self._media.peak

    def _ensure_open(self) -> None:
        if self._state != "open":
            raise StorageError("closed", f"the writer for {self._key!r} is already {self._state}")

    # -- in worker threads

    def _send(self, final: bool) -> dict[str, Any] | None:
        """Send chunks while more than a chunk is buffered (or, if final, everything). Failed
        chunks are resumed from the server's acknowledged offset; returns the file when done."""
        retry = self._storage.retry
        chunk = self._media.chunksize()
        attempt = 0
        while final or self._media.pending(self._request.resumable_progress) > chunk:
            if self._stop.is_set():
                raise StorageError("cancelled", f"the upload of {self._key!r} was cancelled")
            before = self._request.resumable_progress
            try:
                with self._storage.pool.borrow() as http:
                    _, body = self._request.next_chunk(http=http, num_retries=0)
            except _NeedMoreData:
                return None
            except Exception as exc:
                if not _retryable(exc):
                    raise _storage_error(exc, f"uploading {self._key!r}") from exc
                attempt += 1
                if attempt >= retry.attempts:
                    raise StorageError(
                        "upload_failed",
                        f"uploading {self._key!r} failed {attempt} times in a row, giving up: "
                        f"{_storage_error(exc, 'the last attempt').message}",
                    ) from exc
                # next_chunk is now in its error state: the next call asks the session how much
                # it holds (Content-Range: bytes */*) and resumes from there
                log.info("gdrive chunk failed, resuming", key=self._key, attempt=attempt)
                self._stop.wait(retry.delay(attempt))
                continue
            finally:
                self._media.acknowledge(self._request.resumable_progress)
            if body is not None:
                return cast(dict[str, Any], body)
            if self._request.resumable_progress > before:
                attempt = 0
            else:  # a 308 that acknowledged nothing new: back off rather than spin
                attempt += 1
                if attempt >= retry.attempts:
                    raise StorageError("upload_failed", f"Google Drive stopped accepting {self._key!r}")
                self._stop.wait(retry.delay(attempt))
        return None

    def _write(self, data: bytes) -> None:
        with self._lock:
            self._md5.update(data)
            self._written += len(data)
            self._media.append(data)
            self._send(final=False)

    def _commit(self) -> None:
        with self._lock:
            self._media.total = self._written
            body = self._send(final=True)
            if body is None or "id" not in body:
                raise StorageError("upload_failed", f"Google Drive did not confirm {self._key!r}")
            self._file_id = str(body["id"])
            size = body.get("size")
            if size is not None and int(size) != self._written:
                raise StorageError(
                    "upload_corrupt",
                    f"Google Drive stored {size} bytes of {self._key!r}, {self._written} sent",
                )
            md5 = body.get("md5Checksum")
            if md5 is not None and md5 != self._md5.hexdigest():
                raise StorageError("upload_corrupt", f"Google Drive stored different bytes for {self._key!r}")

    def _abort(self) -> None:
        with self._lock:
            pool = self._storage.pool
            uri = self._request.resumable_uri
            if self._file_id is None and uri is not None and self._media.total is not None:
                # the final chunk was sent: the upload may have completed though its answer was lost
                with pool.borrow() as http:
                    resp, content = http.request(
                        uri, "PUT", headers={"Content-Range": f"bytes */{self._media.total}"}
                    )
                if resp.status in (200, 201):
                    self._file_id = str(json.loads(content)["id"])
            if self._file_id is not None:
                self._storage.delete_file_ids([self._file_id], f"removing the aborted {self._key!r}")
            elif uri is not None:
                with pool.borrow() as http:
                    http.request(uri, "DELETE")  # cancels the session: 499, or 404 if it is gone

    # -- the ArtifactWriter interface

    async def write(self, data: bytes) -> None:
        self._ensure_open()
        if not data:
            return
        try:
            await _in_thread(self._write, data, stop=self._stop)
        except BaseException:
            self._state = "failed"
            raise

    async def commit(self) -> None:
        self._ensure_open()
        try:
            await _in_thread(self._commit, stop=self._stop)
        except BaseException:
            self._state = "failed"
            await asyncio.shield(self.abort())
            raise
        self._state = "committed"
        await self._storage.remove_older_copies(self._key, self._parent, keep=self._file_id)

    async def abort(self) -> None:
        """Cancel the session and delete the file if it was completed. Best effort, never raises:
        a failing abort must not hide the error that caused it."""
        if self._state in ("committed", "aborted"):
            return
        self._state = "aborted"
        self._stop.set()  # an in-flight chunk retry loop gives up at its next step
        try:
            await _in_thread(self._abort)
        except Exception as exc:
            log.warning(
                "gdrive abort incomplete",
                key=self._key,
                error=_storage_error(exc, "cancelling the upload").message,
            )


# ---------------------------------------------------------------- the storage


class _Sink:
    """MediaIoBaseDownload writes each downloaded chunk here; `take` hands it on."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(data)
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _credentials_from(settings: dict[str, Any], secrets: dict[str, Any]) -> Credentials:
    mode = settings.get("auth_mode", "service_account")
    if mode == "service_account":
        raw = secrets.get("service_account_json")
        if not raw:
            raise StorageError("bad_settings", "Google Drive service-account mode needs service_account_json")
        try:
            info = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (ValueError, TypeError):
            raise StorageError("bad_settings", "service_account_json is not valid JSON") from None
        if not isinstance(info, dict) or info.get("type") != "service_account":
            raise StorageError("bad_settings", 'service_account_json is not a "service_account" key file')
        missing = [f for f in ("client_email", "private_key", "token_uri") if not info.get(f)]
        if missing:
            raise StorageError("bad_settings", f"service_account_json lacks {', '.join(missing)}")
        try:
            # google-auth leaves this classmethod unannotated
            sa: Credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[DRIVE_SCOPE]
            )
        except (ValueError, TypeError):
            # never the library's message: it may quote part of the key
            raise StorageError("bad_settings", "service_account_json has an unreadable private key") from None
        return sa
    if mode == "oauth":
        client_id = settings.get("client_id")
        client_secret = secrets.get("client_secret")
        refresh_token = secrets.get("refresh_token")
        if not (client_id and client_secret and refresh_token):
            raise StorageError(
                "bad_settings", "Google Drive OAuth mode needs client_id, client_secret and refresh_token"
            )
        return oauth_credentials.Credentials(  # type: ignore[no-untyped-call]  # unannotated __init__
            token=None,
            refresh_token=str(refresh_token),
            client_id=str(client_id),
            client_secret=str(client_secret),
            token_uri=str(settings.get("token_uri") or GOOGLE_TOKEN_URI),
        )
    raise StorageError("bad_settings", f"unknown Google Drive auth_mode {mode!r} (service_account or oauth)")


def _check_chunk_size(chunk_size: object) -> None:
    if (
        not isinstance(chunk_size, int)
        or chunk_size <= 0
        or chunk_size % UPLOAD_GRANULARITY
        or chunk_size > MAX_CHUNK_SIZE
    ):
        raise StorageError(
            "bad_settings", "Google Drive chunk_size must be a multiple of 256 KiB, at most 256 MiB"
        )


class GDriveStorage:
    kind = "gdrive"

    def __init__(
        self,
        *,
        folder_id: str,
        credentials: Credentials,
        api_endpoint: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        _check_chunk_size(chunk_size)
        if api_endpoint is not None:
            parsed = urlsplit(api_endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise StorageError("bad_settings", f"Google Drive api_endpoint {api_endpoint!r} is not a URL")
        self.folder_id = folder_id
        self.api_endpoint = api_endpoint
        self.chunk_size = chunk_size
        self.retry = retry or RetryPolicy()
        self.api_retries = API_RETRIES
        self._credentials = credentials
        self.pool = _HttpPool(credentials, timeout)
        weakref.finalize(self, self.pool.close)  # close idle connections with the storage
        self._service: Any = None
        self._service_lock = threading.Lock()
        self._folders: dict[tuple[str, ...], str] = {}  # write folders by path
        self._folders_lock = threading.Lock()
        self._root_checked = False

    @classmethod
    def from_settings(cls, settings: dict[str, Any], secrets: dict[str, Any]) -> GDriveStorage:
        folder_id = settings.get("folder_id")
        if not isinstance(folder_id, str) or not folder_id:
            raise StorageError("bad_settings", "Google Drive storage needs settings.folder_id")
        chunk_size = settings.get("chunk_size") or DEFAULT_CHUNK_SIZE
        _check_chunk_size(chunk_size)
        api_endpoint = settings.get("api_endpoint") or None
        if api_endpoint is not None and not isinstance(api_endpoint, str):
            raise StorageError("bad_settings", "Google Drive api_endpoint must be a URL")
        return cls(
            folder_id=folder_id,
            credentials=_credentials_from(settings, secrets),
            api_endpoint=api_endpoint,
            chunk_size=chunk_size,
        )

    @property
    def principal(self) -> str:
        """Who must be able to write to the folder, for error messages (an e-mail, never a secret)."""
        email = getattr(self._credentials, "service_account_email", None)
        return f"the service account {email}" if email else "the Google account of the refresh token"

    # -- synchronous helpers, run in worker threads

    def _drive(self) -> Any:
        with self._service_lock:
            if self._service is None:
                options = {"api_endpoint": self.api_endpoint} if self.api_endpoint else None
                self._service = build(
                    "drive",
                    "v3",
                    credentials=self._credentials,
                    static_discovery=True,  # the discovery document ships with the library
                    cache_discovery=False,
                    client_options=options,
                )
            return self._service

    def _files(self) -> Any:
        return self._drive().files()

    def _execute(self, request: Any, doing: str) -> Any:
        try:
            with self.pool.borrow() as http:
                return request.execute(http=http, num_retries=self.api_retries)
        except Exception as exc:
            raise _storage_error(exc, doing) from exc

    def _list_all(
        self, q: str, doing: str, fields: str = "id, name, mimeType, parents, createdTime"
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self._execute(
                self._files().list(
                    q=q,
                    fields=f"nextPageToken, files({fields})",
                    pageSize=PAGE_SIZE,
                    pageToken=token,
                    spaces="drive",
                    supportsAllDrives=True,
                    includeItemsFromAllDrives=True,
                ),
                doing,
            )
            found.extend(cast(list[dict[str, Any]], page.get("files", [])))
            token = page.get("nextPageToken")
            if not token:
                return found

    def _check_root(self) -> None:
        if self._root_checked:
            return
        try:
            meta = self._execute(
                self._files().get(
                    fileId=self.folder_id, fields="id, name, mimeType, trashed", supportsAllDrives=True
                ),
                f"opening the Google Drive folder {self.folder_id!r}",
            )
        except StorageError as exc:
            if exc.code == "not_found":
                raise StorageError(
                    "folder_missing",
                    f"the Google Drive folder {self.folder_id!r} does not exist or is not shared with"
                    f" {self.principal}",
                ) from exc
            raise
        if meta.get("mimeType") != FOLDER_MIME:
            raise StorageError("not_a_folder", f"Google Drive item {self.folder_id!r} is not a folder")
        if meta.get("trashed"):
            raise StorageError(
                "folder_missing", f"the Google Drive folder {self.folder_id!r} is in the trash"
            )
        self._root_checked = True

    def _children_named(
        self, parents: list[str], name: str, folders: bool, doing: str
    ) -> list[dict[str, Any]]:
        """Children of any of `parents` called `name` (folders or files), oldest first."""
        kind = "=" if folders else "!="
        found: list[dict[str, Any]] = []
        for i in range(0, len(parents), PARENTS_PER_QUERY):
            q = (
                f"name = {_quote(name)} and {_in_parents(parents[i : i + PARENTS_PER_QUERY])}"
                f" and mimeType {kind} '{FOLDER_MIME}' and trashed = false"
            )
            found.extend(self._list_all(q, doing))
        return sorted(found, key=lambda f: str(f.get("createdTime", "")))

    def _folder_for_write(self, path: tuple[str, ...]) -> str:
        """The folder new files of `path` go to: at each level the oldest folder of that name,
        created if there is none; cached for this storage instance."""
        with self._folders_lock:  # one resolution at a time: concurrent writers create a folder once
            self._check_root()
            folder = self.folder_id
            for depth in range(1, len(path) + 1):
                sub = path[:depth]
                known = self._folders.get(sub)
                if known is None:
                    doing = f"looking up the folder {'/'.join(sub)!r}"
                    found = self._children_named([folder], sub[-1], True, doing)
                    if not found:
                        self._execute(
                            self._files().create(
                                body={"name": sub[-1], "mimeType": FOLDER_MIME, "parents": [folder]},
                                fields="id",
                                supportsAllDrives=True,
                            ),
                            f"creating the folder {'/'.join(sub)!r}",
                        )
                        # Another agent may have created one at the same moment: all writers settle
                        # on the oldest. Duplicates are never deleted (one may already hold a
                        # backup); reads and lists look in all of them.
                        found = self._children_named([folder], sub[-1], True, doing)
                    if not found:
                        raise StorageError("drive_error", f"the new folder {'/'.join(sub)!r} is not listed")
                    known = self._folders[sub] = str(found[0]["id"])
                folder = known
            return folder

    def _folders_at(self, path: tuple[str, ...]) -> list[str]:
        """Every folder whose path under the root is `path` (several if duplicates exist)."""
        folders = [self.folder_id]
        for depth in range(1, len(path) + 1):
            doing = f"looking up the folder {'/'.join(path[:depth])!r}"
            folders = [str(f["id"]) for f in self._children_named(folders, path[depth - 1], True, doing)]
            if not folders:
                return []
        return folders

    def _files_named(self, folders: tuple[str, ...], name: str, doing: str) -> list[dict[str, Any]]:
        """The files stored under one key, newest first (Drive allows duplicate names)."""
        parents = self._folders_at(folders)
        return self._children_named(parents, name, False, doing)[::-1] if parents else []

    def delete_file_ids(self, file_ids: list[str], doing: str) -> None:
        for file_id in file_ids:
            try:
                self._execute(self._files().delete(fileId=file_id, supportsAllDrives=True), doing)
            except StorageError as exc:
                if exc.code != "not_found":  # already gone: deleting is idempotent
                    raise

    def _open_upload(self, key: str) -> tuple[Any, _StreamedMedia, str]:
        folders, name = _split_key(key)
        parent = self._folder_for_write(folders)
        media = _StreamedMedia(self.chunk_size)
        request = self._files().create(
            body={"name": name, "parents": [parent]},
            media_body=media,
            fields="id, size, md5Checksum",
            supportsAllDrives=True,
        )
        # The library keeps the discovery document's https:// for the upload URL when api_endpoint
        # replaces the host; follow the endpoint's scheme (a plain-HTTP endpoint is a test server).
        if self.api_endpoint and urlsplit(self.api_endpoint).scheme == "http":
            request.uri = "http://" + request.uri.split("://", 1)[1]
        return request, media, parent

    # -- the Storage interface

    async def open_writer(self, key: str) -> GDriveWriter:
        _split_key(key)
        request, media, parent = await _in_thread(self._open_upload, key)
        return GDriveWriter(self, request, media, key, parent)

    async def remove_older_copies(self, key: str, parent: str, keep: str | None) -> None:
        """After a commit: the key's older files in the same folder go, so the key names one object
        again. A failure here loses nothing (reads take the newest), so it is logged, not raised."""
        _, name = _split_key(key)

        def remove() -> None:
            older = self._children_named([parent], name, False, f"listing copies of {key!r}")
            self.delete_file_ids([str(f["id"]) for f in older if f["id"] != keep], f"replacing {key!r}")

        try:
            await _in_thread(remove)
        except StorageError as exc:
            log.warning("gdrive could not remove an older copy", key=key, error=exc.message)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        folders, name = _split_key(key)
        sink = _Sink()

        def start() -> tuple[Any, Any]:
            found = self._files_named(folders, name, f"looking up {key!r}")
            if not found:
                raise StorageError("not_found", f"{key!r} does not exist in the Google Drive folder")
            request = self._files().get_media(fileId=str(found[0]["id"]), supportsAllDrives=True)
            return request, MediaIoBaseDownload(sink, request, chunksize=self.chunk_size)

        request, downloader = await _in_thread(start)

        def next_chunk() -> bool:
            try:
                with self.pool.borrow() as http:
                    request.http = http  # MediaIoBaseDownload sends through the request's http
                    _, done = downloader.next_chunk(num_retries=self.api_retries)
                    return bool(done)
            except Exception as exc:
                error = _storage_error(exc, f"reading {key!r}")
                if error.code == "not_found":
                    error = StorageError("not_found", f"{key!r} was deleted while it was being read")
                raise error from exc

        done = False
        while not done:
            done = await _in_thread(next_chunk)
            data = sink.take()
            if data:
                yield data

    async def put_bytes(self, key: str, data: bytes) -> None:
        writer = await self.open_writer(key)
        try:
            await writer.write(data)
            await writer.commit()
        except BaseException:
            await writer.abort()
            raise

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def delete(self, key: str) -> None:
        """Remove every file stored under the key; one that is already gone is not an error."""
        folders, name = _split_key(key)

        def delete() -> None:
            found = self._files_named(folders, name, f"looking up {key!r}")
            self.delete_file_ids([str(f["id"]) for f in found], f"deleting {key!r}")

        await _in_thread(delete)

    async def list(self, prefix: str) -> AsyncIterator[str]:
        """Every key starting with `prefix` (like an S3 prefix: it may end mid-segment), sorted.

        Folders are walked level by level, many folders per files.list query, so a database with
        years of daily folders takes a few dozen calls, not one per folder; the keys are sorted
        once collected (only names are held, not contents)."""
        *folders, partial = prefix.split("/")
        if any(part in ("", ".", "..") for part in folders):
            raise StorageError("bad_key", f"list prefix {prefix!r} has an empty, '.' or '..' segment")

        def walk() -> list[str]:
            keys: list[str] = []
            # folder id -> its key path (a path appears more than once if folders are duplicated)
            level = dict.fromkeys(self._folders_at(tuple(folders)), "/".join(folders))
            first = True
            while level:
                below: dict[str, str] = {}
                ids = list(level)
                for i in range(0, len(ids), PARENTS_PER_QUERY):
                    batch = ids[i : i + PARENTS_PER_QUERY]
                    for item in self._list_all(
                        f"{_in_parents(batch)} and trashed = false",
                        f"listing {prefix!r}",
                        fields="id, name, mimeType, parents",
                    ):
                        name = str(item["name"])
                        if "/" in name or (first and not name.startswith(partial)):
                            continue  # not a key this storage could have written
                        parent_ids = [p for p in item.get("parents", []) if p in level] or batch[:1]
                        path = f"{level[parent_ids[0]]}/{name}".lstrip("/")
                        if item.get("mimeType") == FOLDER_MIME:
                            below[str(item["id"])] = path
                        else:
                            keys.append(path)
                level, first = below, False
            return sorted(set(keys))

        for key in await _in_thread(walk):
            yield key

    async def probe(self) -> None:
        await _in_thread(self._check_root)
        key = f"{PROBE_PREFIX}{os.urandom(8).hex()}"
        payload = os.urandom(64)
        where = f"the Google Drive folder {self.folder_id!r}"
        try:
            await self.put_bytes(key, payload)
        except StorageError as exc:
            raise StorageError(
                exc.code, f"cannot create a test file in {where} as {self.principal}: {exc.message}"
            ) from exc
        try:
            try:
                back = await self.get_bytes(key)
            except StorageError as exc:
                raise StorageError(
                    exc.code, f"cannot read back the test file in {where}: {exc.message}"
                ) from exc
            if back != payload:
                raise StorageError(
                    "read_mismatch", f"a test file written to {where} read back different bytes"
                )
        finally:
            try:
                await self.delete(key)
            except StorageError as exc:
                raise StorageError(
                    exc.code, f"cannot delete the test file in {where} as {self.principal}: {exc.message}"
                ) from exc
