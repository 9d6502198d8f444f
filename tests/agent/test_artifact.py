"""The RBK1 format: round trips, and every kind of damage detected with a clear message."""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rahatback_agent.artifact import (
    ArtifactDecryptor,
    ArtifactEncryptor,
    ArtifactError,
    read_header,
)

JOB_KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SMALL = 64  # small chunks make multi-chunk artifacts from short inputs


def seal(plaintext: bytes, chunk_size: int = SMALL, key: bytes = JOB_KEY, key_id: str = "k1") -> bytes:
    enc = ArtifactEncryptor(key, key_id, "none", chunk_size)
    parts = [enc.header()]
    chunks = [plaintext[i : i + chunk_size] for i in range(0, len(plaintext), chunk_size)] or [b""]
    for i, chunk in enumerate(chunks):
        parts.append(enc.seal_chunk(chunk, final=i == len(chunks) - 1))
    return b"".join(parts)


def open_all(artifact: bytes, key: bytes = JOB_KEY, step: int | None = None) -> bytes:
    dec = ArtifactDecryptor(key)
    out: list[bytes] = []
    step = step or max(1, len(artifact))
    for i in range(0, len(artifact), step):
        out.extend(dec.feed(artifact[i : i + step]))
    dec.finish()
    return b"".join(out)


def frames(artifact: bytes) -> tuple[bytes, list[bytes]]:
    """Split into (header, framed chunks) following the documented framing."""
    header = read_header(artifact)
    pos = header.size
    out = []
    while pos < len(artifact):
        _, length = struct.unpack_from(">BI", artifact, pos)
        out.append(artifact[pos : pos + 5 + length])
        pos += 5 + length
    return artifact[: header.size], out


@pytest.mark.parametrize("size", [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL, 10 * SMALL + 7])
def test_round_trip_sizes(size: int) -> None:
    data = os.urandom(size)
    artifact = seal(data)
    assert open_all(artifact) == data
    assert open_all(artifact, step=1) == data
    assert open_all(artifact, step=7) == data


def test_empty_input_is_exactly_one_final_empty_chunk() -> None:
    _, chunks = frames(seal(b""))
    assert len(chunks) == 1
    assert chunks[0][0] == 0x01  # final flag
    assert struct.unpack_from(">I", chunks[0], 1)[0] == 16  # just the GCM tag


def test_round_trip_several_megabytes_default_chunk() -> None:
    data = os.urandom(3 << 20) + b"SELECT 1;\n" * 300_000
    artifact = seal(data, chunk_size=1 << 20)
    assert open_all(artifact, step=300_001) == data
    assert len(frames(artifact)[1]) == (len(data) + (1 << 20) - 1) // (1 << 20)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=700), chunk_size=st.integers(1, 100), step=st.integers(1, 900))
def test_round_trip_property(data: bytes, chunk_size: int, step: int) -> None:
    assert open_all(seal(data, chunk_size=chunk_size), step=step) == data


def test_header_exposes_key_id_and_compression_without_key() -> None:
    enc = ArtifactEncryptor(JOB_KEY, "job-42/v3", "zstd", 4096)
    header = read_header(enc.header() + b"more bytes")
    assert header.key_id == "job-42/v3"
    assert header.compression == "zstd"
    assert header.chunk_size == 4096
    assert header.version == 1


def test_each_artifact_has_a_fresh_data_key_and_nonce_prefix() -> None:
    a, b = seal(b"same"), seal(b"same")
    assert read_header(a).wrapped_data_key != read_header(b).wrapped_data_key
    assert read_header(a).nonce_prefix != read_header(b).nonce_prefix
    assert a != b


def test_wrong_key_is_named_as_such() -> None:
    with pytest.raises(ArtifactError, match=r"wrong key: .* key id 'k1'"):
        open_all(seal(b"secret dump"), key=OTHER_KEY)


def test_key_lookup_by_key_id() -> None:
    artifact = seal(b"data", key=OTHER_KEY, key_id="rotated-2")
    keys = {"k1": JOB_KEY, "rotated-2": OTHER_KEY}
    dec = ArtifactDecryptor(keys.__getitem__)
    assert b"".join(dec.feed(artifact)) == b"data"
    dec.finish()
    with pytest.raises(ArtifactError, match="no key available for key id 'nope'"):
        no_keys: dict[str, bytes] = {}
        ArtifactDecryptor(no_keys.__getitem__).feed(seal(b"x", key_id="nope"))


def test_every_single_bit_flip_is_detected() -> None:
    artifact = seal(os.urandom(3 * SMALL + 5))
    for byte in range(len(artifact)):
        for bit in (0, 7):
            damaged = bytearray(artifact)
            damaged[byte] ^= 1 << bit
            with pytest.raises(ArtifactError):
                open_all(bytes(damaged))


def test_flip_in_chunk_body_names_the_chunk() -> None:
    artifact = seal(os.urandom(5 * SMALL))
    header, chunks = frames(artifact)
    damaged = bytearray(chunks[3])
    damaged[10] ^= 0x40
    tampered = header + b"".join(chunks[:3]) + bytes(damaged) + b"".join(chunks[4:])
    with pytest.raises(ArtifactError, match="artifact chunk 3 failed authentication: tampered or wrong key"):
        open_all(tampered)


def test_flip_in_tag_is_detected() -> None:
    artifact = bytearray(seal(os.urandom(2 * SMALL)))
    artifact[-1] ^= 1
    with pytest.raises(ArtifactError, match="chunk 1 failed authentication"):
        open_all(bytes(artifact))


def test_header_edit_is_detected_even_when_the_key_still_unwraps() -> None:
    artifact = seal(b"payload")
    header = read_header(artifact)
    edited = bytearray(artifact)
    offset = 4 + 1 + 2 + 1 + 1  # magic, version, header length, cipher, key wrap
    edited[offset : offset + 4] = struct.pack(">I", header.chunk_size + 1)
    with pytest.raises(ArtifactError, match="chunk 0 failed authentication"):
        open_all(bytes(edited))


def test_truncation_at_every_position_is_detected() -> None:
    artifact = seal(os.urandom(4 * SMALL + 3))
    for cut in range(len(artifact)):
        with pytest.raises(ArtifactError, match="truncated"):
            open_all(artifact[:cut])


def test_truncation_at_chunk_boundary_message() -> None:
    header, chunks = frames(seal(os.urandom(4 * SMALL)))
    missing_final = r"artifact is truncated: the final chunk is missing after chunk 1"
    with pytest.raises(ArtifactError, match=missing_final):
        open_all(header + chunks[0] + chunks[1])
    with pytest.raises(ArtifactError, match="artifact is truncated: no chunk follows the header"):
        open_all(header)


def test_dropping_the_final_chunk_cannot_be_hidden_by_relabelling() -> None:
    header, chunks = frames(seal(os.urandom(4 * SMALL)))
    relabelled = bytes([0x01]) + chunks[2][1:]  # claim the non-final chunk 2 is final
    with pytest.raises(ArtifactError, match="chunk 2 failed authentication"):
        open_all(header + chunks[0] + chunks[1] + relabelled)


def test_reordered_chunks_are_detected() -> None:
    header, chunks = frames(seal(os.urandom(4 * SMALL)))
    swapped = [chunks[0], chunks[2], chunks[1], chunks[3]]
    with pytest.raises(ArtifactError, match="chunk 1 failed authentication"):
        open_all(header + b"".join(swapped))


def test_splicing_from_another_artifact_with_the_same_key_is_detected() -> None:
    header_a, chunks_a = frames(seal(os.urandom(3 * SMALL)))
    _, chunks_b = frames(seal(os.urandom(3 * SMALL)))
    with pytest.raises(ArtifactError, match="chunk 1 failed authentication"):
        open_all(header_a + chunks_a[0] + chunks_b[1] + chunks_a[2])


def test_trailing_garbage_after_final_chunk_is_detected() -> None:
    artifact = seal(os.urandom(2 * SMALL))
    with pytest.raises(ArtifactError, match="3 unexpected bytes after the final chunk"):
        open_all(artifact + b"abc")
    dec = ArtifactDecryptor(JOB_KEY)
    dec.feed(artifact)
    with pytest.raises(ArtifactError, match="unexpected bytes after the final chunk"):
        dec.feed(b"x")


def test_foreign_file_is_rejected() -> None:
    with pytest.raises(ArtifactError, match="bad magic"):
        open_all(b"-- PostgreSQL database dump\n")


def test_encryptor_refuses_misuse() -> None:
    with pytest.raises(ArtifactError, match="exactly 32 bytes"):
        ArtifactEncryptor(b"short", "k", "zstd")
    enc = ArtifactEncryptor(JOB_KEY, "k", "zstd", 16)
    with pytest.raises(ValueError, match="exceeds chunk size"):
        enc.seal_chunk(b"x" * 17, final=False)
    enc.seal_chunk(b"", final=True)
    with pytest.raises(ArtifactError, match="already sealed"):
        enc.seal_chunk(b"", final=True)


# ---------------------------------------------------------------- the documented test vector

VECTOR_JOB_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
VECTOR_DATA_KEY = bytes.fromhex("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")
VECTOR_NONCE_PREFIX = bytes.fromhex("a0a1a2a3a4a5a6")
VECTOR_WRAP_NONCE = bytes.fromhex("b0b1b2b3b4b5b6b7b8b9babb")
VECTOR_PLAINTEXT = b"SELECT 'RahatBack';\n"


def vector_artifact() -> bytes:
    enc = ArtifactEncryptor(
        VECTOR_JOB_KEY,
        "test-key",
        "none",
        16,
        _data_key=VECTOR_DATA_KEY,
        _nonce_prefix=VECTOR_NONCE_PREFIX,
        _wrap_nonce=VECTOR_WRAP_NONCE,
    )
    first = enc.seal_chunk(VECTOR_PLAINTEXT[:16], final=False)
    return enc.header() + first + enc.seal_chunk(VECTOR_PLAINTEXT[16:], final=True)


def test_vector_in_docs_matches_the_code() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "backup-format.md").read_text()
    block = re.search(r"<!-- vector:artifact -->\s*```\n(.*?)```", doc, re.S)
    assert block, "docs/backup-format.md lost its test vector block"
    documented = bytes.fromhex("".join(block.group(1).split()))
    assert documented == vector_artifact()
    assert open_all(documented, key=VECTOR_JOB_KEY) == VECTOR_PLAINTEXT


def test_vector_decrypts_with_plain_aes_gcm_following_the_spec() -> None:
    """An independent reading of the documented layout, without ArtifactDecryptor."""
    import hashlib

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = vector_artifact()
    header_len = struct.unpack_from(">H", blob, 5)[0]
    header = blob[:header_len]
    prefix = header[13:20]
    data_key = AESGCM(VECTOR_JOB_KEY).decrypt(header[-60:-48], header[-48:], b"rahatback/rbk1/data-key-wrap")
    assert data_key == VECTOR_DATA_KEY
    aad = hashlib.sha256(header).digest()
    pos, counter, plain = header_len, 0, b""
    while pos < len(blob):
        flag, length = struct.unpack_from(">BI", blob, pos)
        nonce = prefix + counter.to_bytes(4, "big") + bytes([flag])
        plain += AESGCM(data_key).decrypt(nonce, blob[pos + 5 : pos + 5 + length], aad)
        pos, counter = pos + 5 + length, counter + 1
    assert plain == VECTOR_PLAINTEXT
    assert counter == 2
