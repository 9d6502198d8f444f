"""`rahatback-agent decrypt`: turn an artifact back into the plain dump with only the file and the key.

Works offline, without the control plane or NATS, so a customer can always recover their data.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import secrets
import sys
from pathlib import Path
from typing import IO

from rahatback_agent.artifact import MAGIC, ArtifactError, read_header
from rahatback_agent.keyring import KeyringError, parse_key_text
from rahatback_agent.pipeline import Compression, Manifest, RestoreDecoder

__all__ = ["decrypt_main"]

READ_CHUNK = 1 << 20
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC = b"\x1f\x8b"


class _UsageError(Exception):
    pass


def _load_key(spec: str, head: bytes) -> bytes:
    """The key from bare base64, or from a key file in either export format (managed:
    `POST /v1/backups/keys/{id}/export` saved as JSON; customer: `rahatback-agent keys export`) or a
    whole agent keyring — picked by the artifact's key id, which must match the file's."""
    if spec.startswith("@"):
        where = f"the key file {spec[1:]!r}"
        try:
            text = Path(spec[1:]).read_text().strip()
        except OSError as exc:
            raise _UsageError(f"cannot read the key file {spec[1:]!r}: {exc.strerror}") from exc
    else:
        where, text = "the key", spec.strip()
    if not text.startswith("{"):
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            # The bad value is not echoed: it may be a mistyped real key.
            raise _UsageError("the key is not valid base64") from None
        if len(key) != 32:
            raise _UsageError(f"the key must be base64 of exactly 32 bytes, it decodes to {len(key)} bytes")
        return key
    try:
        keys = parse_key_text(text, where)
    except KeyringError as exc:
        raise _UsageError(str(exc)) from None
    artifact_key_id = read_header(head).key_id
    if artifact_key_id in keys:
        return keys[artifact_key_id]
    held = ", ".join(repr(k) for k in keys if k) or "no key id"
    raise _UsageError(
        f"the artifact was encrypted with key id {artifact_key_id!r}, but {where} holds {held};"
        f" use the key exported for {artifact_key_id!r}"
    )


def _detect(head: bytes) -> tuple[bool, Compression | None]:
    """(encrypted, compression) from the first bytes; compression None = read it from the header."""
    if head.startswith(MAGIC):
        return True, None
    if head.startswith(_ZSTD_MAGIC):
        return False, "zstd"
    if head.startswith(_GZIP_MAGIC):
        return False, "gzip"
    return False, "none"


def _find_manifest(artifact: Path, explicit: str | None) -> Manifest | None:
    path = Path(explicit) if explicit else artifact.with_name(artifact.name + ".manifest.json")
    if not explicit and not path.exists():
        return None
    try:
        return Manifest.from_json(path.read_bytes())
    except OSError as exc:
        raise _UsageError(f"cannot read the manifest {str(path)!r}: {exc.strerror}") from exc
    except ValueError as exc:
        raise _UsageError(f"the manifest {str(path)!r} is not a valid RahatBack manifest") from exc


def _decode(src: IO[bytes], dst: IO[bytes], decoder: RestoreDecoder) -> None:
    while chunk := src.read(READ_CHUNK):
        for piece in decoder.feed(chunk):
            dst.write(piece)
    decoder.finish()


def _run(args: argparse.Namespace) -> str:
    artifact = Path(args.artifact)
    try:
        src = open(artifact, "rb")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise _UsageError(f"cannot open {str(artifact)!r}: {exc.strerror}") from exc
    try:
        head = src.read(4096)
        src.seek(0)
        encrypted, compression = _detect(head)
        key: bytes | None = None
        if encrypted:
            if args.key is None:
                raise _UsageError(
                    f"the artifact is encrypted (key id {read_header(head).key_id!r}); pass --key"
                )
            key = _load_key(args.key, head)
        manifest = None if args.no_manifest else _find_manifest(artifact, args.manifest)
        decoder = RestoreDecoder(
            compression=compression,
            job_key_lookup=key,
            expected_artifact_sha256=manifest.artifact_sha256 if manifest else None,
            expected_dump_sha256=manifest.dump_sha256 if manifest else None,
        )
        if args.out == "-":
            _decode(src, sys.stdout.buffer, decoder)
            sys.stdout.buffer.flush()
        else:
            _decode_to_file(src, Path(args.out), decoder)
    finally:
        src.close()
    checked = " (checksums match the manifest)" if manifest else ""
    return f"decrypted {decoder.artifact_size} artifact bytes into {decoder.dump_size} dump bytes{checked}"


def _decode_to_file(src: IO[bytes], out: Path, decoder: RestoreDecoder) -> None:
    # A hidden temporary file renamed into place only after every check passed: a tampered or
    # truncated artifact never leaves something at --out that looks like a complete dump.
    temp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.partial")
    try:
        with open(temp, "xb") as dst:
            _decode(src, dst, decoder)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(temp, out)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahatback-agent decrypt",
        description="Decrypt and decompress a RahatBack artifact into the plain dump, offline.",
    )
    parser.add_argument("artifact", help="the artifact file (.zst.rbk, .gz.rbk, .rbk, .zst, .gz)")
    parser.add_argument(
        "--key",
        help="the backup key: base64 of 32 bytes, or @FILE holding it, a managed or customer key"
        " export, or an agent keyring (prefer @FILE: ps shows arguments)",
    )
    parser.add_argument("--out", default="-", help="output file, or - for stdout (default)")
    parser.add_argument(
        "--manifest",
        help="manifest to verify checksums against (default: ARTIFACT.manifest.json if it exists)",
    )
    parser.add_argument("--no-manifest", action="store_true", help="do not look for a manifest")
    return parser


def decrypt_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        summary = _run(args)
    except _UsageError as exc:
        print(f"rahatback-agent decrypt: {exc}", file=sys.stderr)
        return 2
    except ArtifactError as exc:
        print(f"rahatback-agent decrypt: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"rahatback-agent decrypt: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"rahatback-agent decrypt: {summary}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(decrypt_main())
