"""Amazon S3 and S3-compatible object storage (MinIO, Cloudflare R2, Wasabi, Backblaze B2) as backup storage.

Uploads stream as multipart uploads: bytes are buffered up to one part, and a few parts upload at
once, so memory stays bounded whatever the artifact size and a slow bucket slows the dump down.
Part n (1-based) is `part_size * 2**((n - 1) // 1000)` bytes, capped at S3's 5 GiB. The default
6 MiB is the smallest whole number of MiB for which 10,000 parts (5.85 TiB) exceed S3's own 5 TiB
object limit, so every object S3 accepts fits although the artifact's size is unknown until the
dump ends: the first 1,000 parts are 6 MiB (5.9 GiB), the next 1,000 are 12 MiB (to 17.6 GiB),
then 24 MiB (to 41 GiB), 48 MiB (to 88 GiB), and so on; small backups keep small parts.
Parts in flight are limited to `max_in_flight` (2) and, together, to `in_flight_bytes` (32 MiB, but
always at least one part), so the writer holds one filling part plus the parts in flight: 18 MiB
while parts are 6 MiB, 36 MiB at 12 MiB, 48 MiB at 24 MiB (artifacts beyond 17.6 GiB), 96 MiB at
48 MiB (beyond 41 GiB), 192 MiB at 96 MiB (beyond 88 GiB).

An artifact under one part goes up with a single PutObject. Nothing is visible under the key until
`commit()`; any failure or cancellation aborts the multipart upload (and checks no part is left),
and an abort that comes after an interrupted commit removes the object if the commit went through.

Downloads are ranged GETs pinned to the object's ETag, read in bounded chunks; a connection that
breaks mid-range is re-requested from the byte where it broke.

Keys are used exactly as given, relative to the bucket: the job has already put the storage's
`prefix` setting in front of them (jobs.build_storage_key); the prefix is used here for the probe
object only, so a policy limited to the prefix is what the probe tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any, Literal
from urllib.parse import urlsplit

import aioboto3  # type: ignore[import-untyped]  # aioboto3 ships no type information
import aiohttp
import structlog
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]  # no type information
from botocore.exceptions import (  # type: ignore[import-untyped]  # botocore ships no type information
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from rahatback_agent.storages.base import StorageError

__all__ = [
    "DEFAULT_PART_SIZE",
    "MAX_PARTS",
    "S3Storage",
    "S3Writer",
    "max_object_size",
    "part_size_for",
]

log = structlog.get_logger("rahatback_agent.storages.s3")

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PART_SIZE = 5 * 1024 * MiB  # S3's maximum part size
MAX_PARTS = 10_000
DEFAULT_PART_SIZE = 6 * MiB
PARTS_PER_STEP = 1_000
DEFAULT_MAX_IN_FLIGHT = 2
DEFAULT_IN_FLIGHT_BYTES = 32 * MiB
DEFAULT_RANGE_SIZE = 16 * MiB
READ_CHUNK = 1 << 20
READ_ATTEMPTS = 3  # per range: a connection that breaks mid-body is retried from where it broke
ABORT_ATTEMPTS = 3
MAX_KEY_BYTES = 1024
PROBE_PREFIX = ".rahatback-probe-"

Operation = Literal["put", "get", "delete", "list", "abort"]
SSE = Literal["AES256", "aws:kms"]

# what a user must grant for each operation (named in permission errors)
_IAM_ACTION: dict[Operation, str] = {
    "put": "s3:PutObject",
    "get": "s3:GetObject",
    "delete": "s3:DeleteObject",
    "list": "s3:ListBucket",
    "abort": "s3:AbortMultipartUpload",
}
_VERB: dict[Operation, str] = {
    "put": "write",
    "get": "read",
    "delete": "delete",
    "list": "list",
    "abort": "abort the multipart upload of",
}
_FAILED_CODE: dict[Operation, str] = {
    "put": "write_failed",
    "get": "read_failed",
    "delete": "delete_failed",
    "list": "list_failed",
    "abort": "abort_failed",
}
_AUTH_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to the storage",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token has expired",
    "InvalidClientTokenId": "the access key id is not known to the storage",
}
_REGION_CODES = {"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "403"}
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ConnectionClosedError,
    ReadTimeoutError,
    aiohttp.ClientConnectionError,
    OSError,
)
# a body that breaks mid-read: worth asking again for the rest
_STREAM_ERRORS = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    ConnectionError,
    TimeoutError,
)
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def part_size_for(
    part_number: int, base: int = DEFAULT_PART_SIZE, parts_per_step: int = PARTS_PER_STEP
) -> int:
    """Nominal size of part `part_number` (1-based): doubles every `parts_per_step` parts."""
    return min(base << ((part_number - 1) // parts_per_step), MAX_PART_SIZE)


def max_object_size(base: int = DEFAULT_PART_SIZE, parts_per_step: int = PARTS_PER_STEP) -> int:
    """Largest artifact that fits in MAX_PARTS parts under the rule above (before S3's 5 TiB limit)."""
    total = 0
    for first in range(1, MAX_PARTS + 1, parts_per_step):
        count = min(parts_per_step, MAX_PARTS - first + 1)
        total += count * part_size_for(first, base, parts_per_step)
    return total


@functools.cache
def _shared_session() -> Any:
    """One credential-less session per process, made on first use: building a session's first S3
    client parses botocore's service model (~0.6 s of CPU); later clients from it take ~50 ms."""
    return aioboto3.Session()


def _endpoint_host(endpoint_url: str) -> str:
    return urlsplit(endpoint_url).netloc or endpoint_url


class _Errors:
    """Turns botocore/aiohttp errors into StorageErrors that say what to change. Messages name the
    bucket, key, endpoint and S3 error code, never a credential (none of those contain one)."""

    def __init__(self, bucket: str, where: str) -> None:
        self.bucket = bucket
        self.where = where

    def _target(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket!r}"

    def translate(self, exc: Exception, op: Operation, key: str | None) -> StorageError:
        target = self._target(key)
        verb = _VERB[op]
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {}) if isinstance(exc.response, dict) else {}
            code = str(error.get("Code") or "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _AUTH_CODES:
                return StorageError(
                    "auth_failed",
                    f"{self.where} refused the credentials ({code}): {_AUTH_CODES[code]};"
                    " check the access key id, secret access key and session token",
                )
            if code == "NoSuchBucket":
                return StorageError(
                    "bucket_missing", f"bucket {self.bucket!r} does not exist at {self.where}"
                )
            if code in _DENIED_CODES or (not code and status == 403):
                return StorageError(
                    "permission_denied",
                    f"permission denied: these credentials may not {verb} {target} (grant {_IAM_ACTION[op]})",
                )
            if code in ("NoSuchKey", "404") and op == "get":
                return StorageError("not_found", f"{key!r} does not exist in bucket {self.bucket!r}")
            if code in _REGION_CODES:
                return StorageError(
                    "wrong_region",
                    f"bucket {self.bucket!r} is not in the configured region ({code}): set its region",
                )
            if code == "InvalidBucketName":
                return StorageError("bad_settings", f"{self.bucket!r} is not a valid bucket name")
            detail = str(error.get("Message") or "")[:300]
            return StorageError(
                _FAILED_CODE[op],
                f"cannot {verb} {target}: {code or status or 'error'}" + (f" ({detail})" if detail else ""),
            )
        if isinstance(exc, NoCredentialsError):
            return StorageError("bad_settings", "the S3 storage has no access key id and secret access key")
        if isinstance(exc, ParamValidationError):
            return StorageError("bad_settings", f"cannot {verb} {target}: the request is invalid ({exc})")
        if isinstance(exc, _CONNECTION_ERRORS):
            return StorageError(
                "unreachable", f"cannot reach {self.where} to {verb} {target}: {type(exc).__name__}"
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(_FAILED_CODE[op], f"cannot {verb} {target}: {exc}")
        return StorageError(_FAILED_CODE[op], f"cannot {verb} {target}: unexpected {type(exc).__name__}")

    @contextlib.contextmanager
    def mapped(self, op: Operation, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except (BotoCoreError, ClientError, aiohttp.ClientError, OSError) as exc:
            raise self.translate(exc, op, key) from exc


class S3Writer:
    """One artifact being uploaded. Owns its S3 client until commit() or abort() closes it."""

    def __init__(self, storage: S3Storage, key: str, client: Any, stack: AsyncExitStack) -> None:
        self._storage = storage
        self._key = key
        self._s3 = client
        self._stack = stack
        self._errors = storage.errors
        # The part being filled. Blocks are copied into it once; the same buffer is then the request
        # body (aiohttp streams a BytesIO in chunks without copying it; bytes would be copied again).
        self._part = io.BytesIO()
        self._next_part = 1
        self._create: asyncio.Task[str] | None = None
        self._upload_id: str | None = None
        self._uploads: set[asyncio.Task[None]] = set()
        self._etags: dict[int, str] = {}
        self._finalize: asyncio.Task[None] | None = None
        self._abort_task: asyncio.Task[None] | None = None
        self._state: Literal["open", "committing", "committed", "aborted"] = "open"
        self.parts_started = 0
        self.peak_in_flight = 0

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def _ensure_open(self) -> None:
        if self._state != "open":
            raise StorageError("closed", f"the writer for {self._key!r} is already {self._state}")

    def _part_target(self) -> int:
        return part_size_for(self._next_part, self._storage.part_size, self._storage.parts_per_step)

    def _allowed_in_flight(self, part_len: int) -> int:
        return max(1, min(self._storage.max_in_flight, self._storage.in_flight_bytes // max(part_len, 1)))

    async def write(self, data: bytes) -> None:
        self._ensure_open()
        try:
            view = memoryview(data)
            while len(view):
                room = self._part_target() - self._part.tell()
                self._part.write(view[:room])
                view = view[room:]
                if self._part.tell() >= self._part_target():
                    await self._ship(self._take_part())
        except BaseException:
            await self.abort()
            raise

    def _take_part(self) -> io.BytesIO:
        part, self._part = self._part, io.BytesIO()
        part.seek(0)
        return part

    async def _ship(self, part: io.BytesIO) -> None:
        """Start uploading one part, first waiting (backpressure) until there is room in flight."""
        size = len(part.getbuffer())  # the view is released at once: nothing is copied
        self._reap()
        if self._next_part > MAX_PARTS:
            raise StorageError(
                "too_large", f"{self._key!r} needs more than {MAX_PARTS} parts: larger than S3 accepts"
            )
        upload_id = await self._ensure_upload()
        while len(self._uploads) >= self._allowed_in_flight(size):
            await self._wait_for_one()
        number = self._next_part
        self._next_part += 1
        self._uploads.add(asyncio.ensure_future(self._upload_part(upload_id, number, part)))
        self.parts_started += 1
        self.peak_in_flight = max(self.peak_in_flight, len(self._uploads))

    def _reap(self) -> None:
        """Raise a failed part's error now rather than after the next part is buffered."""
        self._collect({t for t in self._uploads if t.done()})

    async def _wait_for_one(self) -> None:
        done, _ = await asyncio.wait(self._uploads, return_when=asyncio.FIRST_COMPLETED)
        self._collect(done)

    def _collect(self, done: set[asyncio.Task[None]]) -> None:
        self._uploads -= done
        # every failure is retrieved (asyncio would log the others as never retrieved); the first is raised
        errors = [t.exception() for t in done]
        for error in errors:
            if error is not None:
                raise error

    async def _ensure_upload(self) -> str:
        if self._upload_id is None:
            if self._create is None:
                self._create = asyncio.ensure_future(self._create_upload())
            # shielded: cancelled mid-request, the upload may exist; abort() waits for its id
            self._upload_id = await asyncio.shield(self._create)
        return self._upload_id

    async def _create_upload(self) -> str:
        with self._errors.mapped("put", self._key):
            response = await self._s3.create_multipart_upload(
                Bucket=self._storage.bucket, Key=self._key, **self._storage.object_options()
            )
        return str(response["UploadId"])

    async def _upload_part(self, upload_id: str, number: int, body: io.BytesIO) -> None:
        with self._errors.mapped("put", self._key):
            response = await self._s3.upload_part(
                Bucket=self._storage.bucket,
                Key=self._key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,  # seekable: botocore rewinds it to retry
            )
        self._etags[number] = str(response["ETag"])

    async def _put_single(self, body: io.BytesIO) -> None:
        with self._errors.mapped("put", self._key):
            await self._s3.put_object(
                Bucket=self._storage.bucket,
                Key=self._key,
                Body=body,
                **self._storage.object_options(),
            )

    async def _complete(self, upload_id: str) -> None:
        parts = [{"PartNumber": n, "ETag": self._etags[n]} for n in sorted(self._etags)]
        with self._errors.mapped("put", self._key):
            await self._s3.complete_multipart_upload(
                Bucket=self._storage.bucket,
                Key=self._key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

    async def commit(self) -> None:
        self._ensure_open()
        self._state = "committing"
        try:
            if self._create is None:
                self._finalize = asyncio.ensure_future(self._put_single(self._take_part()))
            else:
                if self._part.tell():
                    await self._ship(self._take_part())
                while self._uploads:
                    await self._wait_for_one()
                self._finalize = asyncio.ensure_future(self._complete(await self._ensure_upload()))
            # shielded: if we are cancelled now, abort() learns whether the object was made and removes it
            await asyncio.shield(self._finalize)
        except BaseException:
            await self.abort()
            raise
        self._state = "committed"
        await self._stack.aclose()

    async def abort(self) -> None:
        """Idempotent; never raises (a failure to clean up is logged), so it cannot hide the
        error that made the caller abort."""
        if self._state == "committed":
            return
        self._state = "aborted"
        if self._abort_task is None:
            self._abort_task = asyncio.ensure_future(self._abort())
        # shielded: a second cancellation must not stop the clean-up half way
        await asyncio.shield(self._abort_task)

    async def _abort(self) -> None:
        try:
            for task in self._uploads:
                task.cancel()
            await asyncio.gather(*self._uploads, return_exceptions=True)
            self._uploads.clear()
            if self._finalize is not None:
                await asyncio.gather(self._finalize, return_exceptions=True)
                if not self._finalize.cancelled() and self._finalize.exception() is None:
                    # the commit went through after all: the caller is failing the backup, so remove it
                    await self._delete_quietly()
            upload_id = self._upload_id
            if upload_id is None and self._create is not None:
                (created,) = await asyncio.gather(self._create, return_exceptions=True)
                upload_id = created if isinstance(created, str) else None
            if upload_id is not None:
                await self._abort_upload(upload_id)
        except Exception as exc:
            error = exc if isinstance(exc, StorageError) else self._errors.translate(exc, "abort", self._key)
            log.warning("s3 abort failed", key=self._key, error=error.message)
        finally:
            self._part = io.BytesIO()
            await self._stack.aclose()

    async def _delete_quietly(self) -> None:
        try:
            with self._errors.mapped("delete", self._key):
                await self._s3.delete_object(Bucket=self._storage.bucket, Key=self._key)
        except StorageError as exc:
            log.warning("s3 abort could not remove a completed object", key=self._key, error=exc.message)

    async def _abort_upload(self, upload_id: str) -> None:
        """AbortMultipartUpload, then ListParts to be sure: S3 documents that a part upload racing
        the abort may still land, and that aborting again frees it."""
        bucket = self._storage.bucket
        for _ in range(ABORT_ATTEMPTS):
            try:
                with self._errors.mapped("abort", self._key):
                    await self._s3.abort_multipart_upload(Bucket=bucket, Key=self._key, UploadId=upload_id)
            except StorageError as exc:
                if not isinstance(exc.__cause__, ClientError) or _error_code(exc.__cause__) != "NoSuchUpload":
                    log.warning("s3 multipart upload not aborted", key=self._key, error=exc.message)
                    return
            try:
                listed = await self._s3.list_parts(Bucket=bucket, Key=self._key, UploadId=upload_id)
            except ClientError:
                # NoSuchUpload: gone, as it should be; anything else (say, no
                # s3:ListMultipartUploadParts): the abort itself succeeded, trust it
                return
            if not listed.get("Parts"):
                return
        log.warning("s3 multipart upload still has parts after aborting", key=self._key)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


class S3Storage:
    kind = "s3"

    def __init__(
        self,
        *,
        bucket: str,
        access_key_id: str,
        secret_access_key: str,
        session_token: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        path_style: bool = False,
        prefix: str = "",
        storage_class: str | None = None,
        sse: SSE | None = None,
        kms_key_id: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        parts_per_step: int = PARTS_PER_STEP,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        in_flight_bytes: int = DEFAULT_IN_FLIGHT_BYTES,
        range_size: int = DEFAULT_RANGE_SIZE,
        max_attempts: int = 4,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not bucket:
            raise StorageError("bad_settings", "S3 storage needs settings.bucket")
        if not access_key_id or not secret_access_key:
            raise StorageError("bad_settings", "S3 storage needs an access key id and a secret access key")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise StorageError("bad_settings", f"part size must be 5 MiB to 5 GiB, got {part_size}")
        if parts_per_step < 1 or max_in_flight < 1 or range_size < 1:
            raise StorageError(
                "bad_settings", "parts_per_step, max_in_flight and range_size must be positive"
            )
        if sse == "aws:kms" and not kms_key_id:
            kms_key_id = None  # S3 then uses the account's default aws/s3 key
        elif kms_key_id and sse != "aws:kms":
            raise StorageError("bad_settings", "kms_key_id is only used with sse 'aws:kms'")
        self.bucket = bucket
        self.prefix = "/".join(p for p in prefix.split("/") if p)
        self.region = region or "us-east-1"
        self.endpoint_url = endpoint_url or None
        self.storage_class = storage_class or None
        self.sse = sse
        self.kms_key_id = kms_key_id
        self.part_size = part_size
        self.parts_per_step = parts_per_step
        self.max_in_flight = max_in_flight
        self.in_flight_bytes = in_flight_bytes
        self.range_size = range_size
        where = _endpoint_host(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"
        self.errors = _Errors(bucket, where)
        # Clients (connection pools) are opened per operation and always closed: the Storage
        # interface has no close(), so a long-lived client would leak. The credentials go to each
        # client, never into the process-wide session (see _shared_session).
        self._credentials = {
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
            "aws_session_token": session_token or None,
        }
        self._config = AioConfig(
            region_name=self.region,
            signature_version="s3v4",
            s3={"addressing_style": "path" if path_style else "auto"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max_in_flight + 2,
            # Many S3-compatibles reject botocore's default CRC trailers (aws-chunked); the
            # artifact's SHA-256 in the manifest and RBK1's per-chunk tags catch corruption anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )

    def __repr__(self) -> str:
        return f"S3Storage(bucket={self.bucket!r}, endpoint={self.errors.where!r})"

    @classmethod
    def from_settings(cls, settings: dict[str, Any], secrets: dict[str, Any]) -> S3Storage:
        def text(source: dict[str, Any], name: str) -> str | None:
            value = source.get(name)
            if value is None or value == "":
                return None
            if not isinstance(value, str):
                raise StorageError("bad_settings", f"S3 setting {name!r} must be a string")
            return value

        sse = text(settings, "sse")
        if sse in (None, "none"):
            sse = None
        elif sse not in ("AES256", "aws:kms"):
            raise StorageError("bad_settings", f"S3 sse must be 'none', 'AES256' or 'aws:kms', got {sse!r}")
        # the access key id is not secret (the API shows it); accept it from either place
        access_key_id = text(settings, "access_key_id") or text(secrets, "access_key_id")
        return cls(
            bucket=text(settings, "bucket") or "",
            access_key_id=access_key_id or "",
            secret_access_key=text(secrets, "secret_access_key") or "",
            session_token=text(secrets, "session_token"),
            region=text(settings, "region"),
            endpoint_url=text(settings, "endpoint_url"),
            path_style=bool(settings.get("path_style", False)),
            prefix=text(settings, "prefix") or "",
            storage_class=text(settings, "storage_class"),
            sse=sse,  # type: ignore[arg-type]  # checked against the two values just above
            kms_key_id=text(settings, "kms_key_id"),
        )

    def object_options(self) -> dict[str, str]:
        """Storage class and server-side encryption, for PutObject and CreateMultipartUpload."""
        options: dict[str, str] = {}
        if self.storage_class:
            options["StorageClass"] = self.storage_class
        if self.sse:
            options["ServerSideEncryption"] = self.sse
        if self.kms_key_id:
            options["SSEKMSKeyId"] = self.kms_key_id
        return options

    def _client(self) -> Any:
        return _shared_session().client(
            "s3", endpoint_url=self.endpoint_url, config=self._config, **self._credentials
        )

    @staticmethod
    def _check_key(key: str) -> None:
        # '.'/'..' segments are refused because HTTP clients normalise them away, silently
        # writing somewhere else; the rest are S3's own limits
        if not key or key.startswith("/") or "\x00" in key or len(key.encode()) > MAX_KEY_BYTES:
            raise StorageError("bad_key", f"invalid storage key {key!r}")
        if any(part in (".", "..") for part in key.split("/")):
            raise StorageError("bad_key", f"storage key {key!r} has a '.' or '..' segment")

    async def open_writer(self, key: str) -> S3Writer:
        self._check_key(key)
        stack = AsyncExitStack()
        client = await stack.enter_async_context(self._client())
        return S3Writer(self, key, client, stack)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        self._check_key(key)
        errors = self.errors
        async with self._client() as s3:
            offset = 0
            size: int | None = None
            etag: str | None = None
            failures = 0
            while size is None or offset < size:
                end = (
                    offset + self.range_size - 1 if size is None else min(offset + self.range_size, size) - 1
                )
                pinned = {"IfMatch": etag} if etag else {}
                try:
                    with errors.mapped("get", key):
                        response = await s3.get_object(
                            Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{end}", **pinned
                        )
                except StorageError as exc:
                    cause = exc.__cause__
                    code = _error_code(cause) if isinstance(cause, ClientError) else ""
                    if code == "InvalidRange" and offset == 0:
                        return  # an empty object: no range of it exists
                    if code == "PreconditionFailed":
                        raise StorageError(
                            "changed", f"{key!r} was replaced while it was being read; read it again"
                        ) from exc
                    raise
                if size is None:
                    size, etag = self._object_size(response), str(response.get("ETag") or "") or None
                body = response["Body"]
                try:
                    pieces: list[bytes] = []
                    pending = 0
                    while True:
                        try:
                            piece = await body.read(READ_CHUNK - pending)
                        except _STREAM_ERRORS as exc:
                            failures += 1
                            if failures >= READ_ATTEMPTS:
                                raise errors.translate(exc, "get", key) from exc
                            log.info("s3 read interrupted, resuming", key=key, offset=offset + pending)
                            break
                        if piece:
                            pieces.append(piece)
                            pending += len(piece)
                        if pieces and (pending >= READ_CHUNK or not piece):
                            offset += pending
                            yield b"".join(pieces)
                            pieces, pending = [], 0
                        if not piece:
                            failures = 0
                            break
                    if pieces:  # bytes that arrived before a broken connection are good
                        offset += pending
                        yield b"".join(pieces)
                finally:
                    body.close()

    @staticmethod
    def _object_size(response: dict[str, Any]) -> int:
        match = _CONTENT_RANGE.fullmatch(str(response.get("ContentRange") or ""))
        if match:
            return int(match.group(3))
        # a server that ignores Range sends the whole object
        return int(response.get("ContentLength") or 0)

    async def put_bytes(self, key: str, data: bytes) -> None:
        self._check_key(key)
        if len(data) >= self.part_size:
            writer = await self.open_writer(key)
            try:
                await writer.write(data)
                await writer.commit()
            except BaseException:
                await writer.abort()
                raise
            return
        async with self._client() as s3:
            with self.errors.mapped("put", key):
                await s3.put_object(
                    Bucket=self.bucket, Key=key, Body=io.BytesIO(data), **self.object_options()
                )

    async def get_bytes(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in self.read(key)])

    async def delete(self, key: str) -> None:
        """Remove an object; deleting one that is already gone is not an error (S3 says 204)."""
        self._check_key(key)
        async with self._client() as s3:
            with self.errors.mapped("delete", key):
                await s3.delete_object(Bucket=self.bucket, Key=key)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async with self._client() as s3:
            paginator = s3.get_paginator("list_objects_v2")
            with self.errors.mapped("list", prefix or None):
                async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                    for item in page.get("Contents", []):
                        yield str(item["Key"])

    async def probe(self) -> None:
        """Write, read back and delete a small object under the prefix, then start and abort a
        multipart upload (a backup that fails must be able to clean up its parts)."""
        name = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
        key = f"{self.prefix}/{name}" if self.prefix else name
        payload = secrets.token_bytes(64)
        await self.put_bytes(key, payload)
        try:
            back = await self.get_bytes(key)
        except BaseException:
            with contextlib.suppress(StorageError):  # the read failure is the news, not the clean-up
                await self.delete(key)
            raise
        await self.delete(key)
        if back != payload:
            raise StorageError(
                "read_mismatch",
                f"a test object written to s3://{self.bucket}/{key} read back different bytes",
            )
        async with self._client() as s3:
            with self.errors.mapped("put", key):
                created = await s3.create_multipart_upload(
                    Bucket=self.bucket, Key=key, **self.object_options()
                )
            with self.errors.mapped("abort", key):
                await s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=created["UploadId"])
