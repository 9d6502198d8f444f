"""The RBK1 encrypted artifact format: chunked AES-256-GCM (STREAM) under a per-artifact data key.

Pure functions and classes, no I/O, so the pipeline, the verifier and the offline `decrypt`
command share exactly one implementation. The byte layout is specified in docs/backup-format.md,
and a test vector there is asserted by tests/agent/test_artifact.py.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CIPHER_AES_256_GCM_STREAM",
    "COMPRESSIONS",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "KEY_WRAP_AAD",
    "KEY_WRAP_AES_256_GCM",
    "MAGIC",
    "ArtifactDecryptor",
    "ArtifactEncryptor",
    "ArtifactError",
    "ArtifactHeader",
    "is_encrypted_artifact",
    "read_header",
]

MAGIC = b"RBK1"
FORMAT_VERSION = 1
CIPHER_AES_256_GCM_STREAM = 1
KEY_WRAP_AES_256_GCM = 1
KEY_WRAP_AAD = b"rahatback/rbk1/data-key-wrap"
DEFAULT_CHUNK_SIZE = 1 << 20
# A cap keeps a forged header from making a reader allocate gigabytes for one chunk.
MAX_CHUNK_SIZE = 64 << 20
COMPRESSIONS = ("zstd", "gzip", "none")

KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
WRAP_NONCE_SIZE = 12
WRAPPED_KEY_SIZE = KEY_SIZE + TAG_SIZE
FRAME_HEADER_SIZE = 5  # flag (1) + ciphertext length (4)
FLAG_MORE = 0x00
FLAG_FINAL = 0x01
MAX_COUNTER = 0xFFFFFFFF

# magic(4) version(1) header_len(2): enough to know how many header bytes to wait for.
_PREAMBLE = struct.Struct(">4sBH")
_FIXED = struct.Struct(">BBI7s")  # cipher, key wrap, chunk size, nonce prefix
_FRAME = struct.Struct(">BI")


class ArtifactError(Exception):
    """The artifact cannot be trusted or read; the message says why (never contains key material)."""


@dataclass(frozen=True)
class ArtifactHeader:
    version: int
    cipher: int
    key_wrap: int
    chunk_size: int
    nonce_prefix: bytes
    key_id: str
    compression: str
    wrap_nonce: bytes
    wrapped_data_key: bytes
    raw: bytes  # the exact header bytes; their SHA-256 is every chunk's AAD

    @property
    def size(self) -> int:
        return len(self.raw)


def is_encrypted_artifact(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def _encode_header(
    *,
    chunk_size: int,
    nonce_prefix: bytes,
    key_id: str,
    compression: str,
    wrap_nonce: bytes,
    wrapped_data_key: bytes,
) -> bytes:
    key_id_bytes = key_id.encode()
    compression_bytes = compression.encode()
    body = (
        _FIXED.pack(CIPHER_AES_256_GCM_STREAM, KEY_WRAP_AES_256_GCM, chunk_size, nonce_prefix)
        + bytes([len(key_id_bytes)])
        + key_id_bytes
        + bytes([len(compression_bytes)])
        + compression_bytes
        + wrap_nonce
        + wrapped_data_key
    )
    return _PREAMBLE.pack(MAGIC, FORMAT_VERSION, _PREAMBLE.size + len(body)) + body


def _header_length(data: bytes | bytearray | memoryview) -> int | None:
    """Total header length once the preamble is available, else None. Raises on a foreign file."""
    if len(data) < _PREAMBLE.size:
        if bytes(data[: len(MAGIC)]) != MAGIC[: len(data[: len(MAGIC)])]:
            raise ArtifactError("not a RahatBack encrypted artifact: bad magic (expected 'RBK1')")
        return None
    magic, version, length = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise ArtifactError("not a RahatBack encrypted artifact: bad magic (expected 'RBK1')")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"unsupported artifact format version {version} (this agent reads version 1)")
    minimum = _PREAMBLE.size + _FIXED.size + 2 + WRAP_NONCE_SIZE + WRAPPED_KEY_SIZE
    if length < minimum:
        raise ArtifactError(f"artifact header is damaged: length {length} is below the minimum {minimum}")
    return int(length)


def _parse_header(raw: bytes) -> ArtifactHeader:
    _, version, _ = _PREAMBLE.unpack_from(raw)
    pos = _PREAMBLE.size
    cipher, key_wrap, chunk_size, nonce_prefix = _FIXED.unpack_from(raw, pos)
    pos += _FIXED.size
    if cipher != CIPHER_AES_256_GCM_STREAM:
        raise ArtifactError(f"unsupported artifact cipher id {cipher}")
    if key_wrap != KEY_WRAP_AES_256_GCM:
        raise ArtifactError(f"unsupported artifact key wrap id {key_wrap}")
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ArtifactError(f"artifact header is damaged: chunk size {chunk_size} out of range")
    try:
        key_id_len = raw[pos]
        key_id = raw[pos + 1 : pos + 1 + key_id_len].decode()
        pos += 1 + key_id_len
        compression_len = raw[pos]
        compression = raw[pos + 1 : pos + 1 + compression_len].decode()
        pos += 1 + compression_len
    except (IndexError, UnicodeDecodeError) as exc:
        raise ArtifactError("artifact header is damaged: unreadable key id or compression") from exc
    wrap_nonce = raw[pos : pos + WRAP_NONCE_SIZE]
    pos += WRAP_NONCE_SIZE
    wrapped = raw[pos : pos + WRAPPED_KEY_SIZE]
    pos += WRAPPED_KEY_SIZE
    if pos != len(raw):
        raise ArtifactError("artifact header is damaged: field lengths do not add up to the header length")
    if compression not in COMPRESSIONS:
        raise ArtifactError(f"artifact header names an unknown compression {compression!r}")
    return ArtifactHeader(
        version=version,
        cipher=cipher,
        key_wrap=key_wrap,
        chunk_size=chunk_size,
        nonce_prefix=nonce_prefix,
        key_id=key_id,
        compression=compression,
        wrap_nonce=wrap_nonce,
        wrapped_data_key=wrapped,
        raw=raw,
    )


def read_header(data: bytes) -> ArtifactHeader:
    """Parse the header at the start of `data` (which may hold more bytes), without any key.

    Lets tools learn the key id and compression before they ask for a key.
    """
    length = _header_length(data)
    if length is None or len(data) < length:
        raise ArtifactError(f"artifact is truncated: the header is incomplete ({len(data)} bytes)")
    return _parse_header(bytes(data[:length]))


def _nonce(prefix: bytes, counter: int, final: bool) -> bytes:
    return prefix + counter.to_bytes(4, "big") + (b"\x01" if final else b"\x00")


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise ArtifactError(f"the {what} must be exactly {KEY_SIZE} bytes, got {len(key)}")


class ArtifactEncryptor:
    """Seals one artifact. Call `header()` once, then `seal_chunk` for each chunk, the last one
    with `final=True`. `_data_key` and `_nonce_prefix` exist only to reproduce test vectors."""

    def __init__(
        self,
        job_key: bytes,
        key_id: str,
        compression: str,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        _data_key: bytes | None = None,
        _nonce_prefix: bytes | None = None,
        _wrap_nonce: bytes | None = None,
    ) -> None:
        _check_key(job_key, "job key")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}")
        if not 0 < len(key_id.encode()) <= 255:
            raise ValueError("key_id must be 1..255 bytes of UTF-8")
        data_key = os.urandom(KEY_SIZE) if _data_key is None else _data_key
        _check_key(data_key, "data key")
        self._nonce_prefix = os.urandom(NONCE_PREFIX_SIZE) if _nonce_prefix is None else _nonce_prefix
        if len(self._nonce_prefix) != NONCE_PREFIX_SIZE:
            raise ValueError(f"nonce prefix must be {NONCE_PREFIX_SIZE} bytes")
        wrap_nonce = os.urandom(WRAP_NONCE_SIZE) if _wrap_nonce is None else _wrap_nonce
        wrapped = AESGCM(job_key).encrypt(wrap_nonce, data_key, KEY_WRAP_AAD)
        self._header = _encode_header(
            chunk_size=chunk_size,
            nonce_prefix=self._nonce_prefix,
            key_id=key_id,
            compression=compression,
            wrap_nonce=wrap_nonce,
            wrapped_data_key=wrapped,
        )
        self._aad = hashlib.sha256(self._header).digest()
        self._aead = AESGCM(data_key)
        self.chunk_size = chunk_size
        self._counter = 0
        self._finished = False

    def header(self) -> bytes:
        return self._header

    def seal_chunk(self, plaintext: bytes, final: bool) -> bytes:
        """Return the framed chunk: flag byte, 4-byte ciphertext length, ciphertext with tag."""
        if self._finished:
            raise ArtifactError("the final chunk was already sealed")
        if len(plaintext) > self.chunk_size:
            raise ValueError(f"chunk of {len(plaintext)} bytes exceeds chunk size {self.chunk_size}")
        if self._counter > MAX_COUNTER:
            raise ArtifactError("artifact too large: chunk counter exhausted")
        ciphertext = self._aead.encrypt(
            _nonce(self._nonce_prefix, self._counter, final), plaintext, self._aad
        )
        self._counter += 1
        self._finished = final
        return _FRAME.pack(FLAG_FINAL if final else FLAG_MORE, len(ciphertext)) + ciphertext


class ArtifactDecryptor:
    """Incremental reader: `feed` arbitrary slices, get plaintext chunks back as each one
    authenticates; `finish` raises unless the final chunk was seen with nothing after it."""

    def __init__(self, job_key_lookup: Callable[[str], bytes] | bytes) -> None:
        self._lookup = job_key_lookup
        self._buf = bytearray()
        self.header: ArtifactHeader | None = None
        self._aead: AESGCM | None = None
        self._aad = b""
        self._counter = 0
        self._done = False
        self.bytes_in = 0

    def _job_key(self, key_id: str) -> bytes:
        if isinstance(self._lookup, bytes):
            return self._lookup
        try:
            return self._lookup(key_id)
        except KeyError as exc:
            raise ArtifactError(f"no key available for key id {key_id!r}") from exc

    def _open_header(self) -> bool:
        length = _header_length(self._buf)
        if length is None or len(self._buf) < length:
            return False
        header = _parse_header(bytes(self._buf[:length]))
        job_key = self._job_key(header.key_id)
        _check_key(job_key, "job key")
        try:
            data_key = AESGCM(job_key).decrypt(header.wrap_nonce, header.wrapped_data_key, KEY_WRAP_AAD)
        except InvalidTag:
            raise ArtifactError(
                f"wrong key: the data key could not be unwrapped with key id {header.key_id!r}"
                " (wrong job key, or the header is damaged)"
            ) from None
        self.header = header
        self._aead = AESGCM(data_key)
        self._aad = hashlib.sha256(header.raw).digest()
        del self._buf[:length]
        return True

    def feed(self, data: bytes) -> list[bytes]:
        self.bytes_in += len(data)
        if self._done:
            if data:
                raise ArtifactError(f"artifact has {len(data)} unexpected bytes after the final chunk")
            return []
        self._buf += data
        if self.header is None and not self._open_header():
            return []
        assert self.header is not None and self._aead is not None
        out: list[bytes] = []
        pos = 0
        buf = self._buf
        limit = self.header.chunk_size + TAG_SIZE
        while len(buf) - pos >= FRAME_HEADER_SIZE:
            flag, length = _FRAME.unpack_from(buf, pos)
            if flag not in (FLAG_MORE, FLAG_FINAL):
                raise ArtifactError(f"artifact chunk {self._counter} is damaged: bad flag byte {flag:#04x}")
            if not TAG_SIZE <= length <= limit:
                raise ArtifactError(f"artifact chunk {self._counter} is damaged: impossible length {length}")
            end = pos + FRAME_HEADER_SIZE + length
            if len(buf) < end:
                break
            final = flag == FLAG_FINAL
            nonce = _nonce(self.header.nonce_prefix, self._counter, final)
            try:
                plain = self._aead.decrypt(nonce, bytes(buf[pos + FRAME_HEADER_SIZE : end]), self._aad)
            except InvalidTag:
                raise ArtifactError(
                    f"artifact chunk {self._counter} failed authentication: tampered or wrong key"
                ) from None
            out.append(plain)
            self._counter += 1
            pos = end
            if final:
                self._done = True
                if len(buf) > pos:
                    raise ArtifactError(
                        f"artifact has {len(buf) - pos} unexpected bytes after the final chunk"
                    )
                break
        del buf[:pos]
        return out

    def finish(self) -> None:
        if self._done:
            return
        if self.header is None:
            raise ArtifactError(f"artifact is truncated: the header is incomplete ({len(self._buf)} bytes)")
        detail = f"{len(self._buf)} bytes of an incomplete chunk" if self._buf else "no more data"
        raise ArtifactError(
            f"artifact is truncated: the final chunk is missing after chunk {self._counter - 1} ({detail})"
            if self._counter
            else f"artifact is truncated: no chunk follows the header ({detail})"
        )
