"""Customer-held backup keys: generated on this host, kept on this host, never sent anywhere.

The keyring is a 0600 JSON file next to the identity (`agent.json` → `agent.keys.json`). The
settings may also name one key file (`RAHATBACK_AGENT_KEY_FILE`, a key exported by `keys export`)
and a command that prints the key for a key id (`RAHATBACK_AGENT_KEY_COMMAND`, run as
`<command> <key id>`, for a vault or KMS), serving the ids in `RAHATBACK_AGENT_KEY_COMMAND_IDS`.

The agent reports only key ids and fingerprints (heartbeat). A command for a customer-held key
names the key id and the fingerprint the control plane recorded; the agent refuses when it does not
hold that key or holds a different one under that id. See docs/backup-keys.md.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import shlex
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_contracts.messages import EncryptionSpec, HeldKey

from .private_files import write_private_atomic
from .sealing import SealingError, open_job_key

__all__ = [
    "EXPORT_FORMAT",
    "KeyInfo",
    "Keyring",
    "KeyringError",
    "artifact_key_lookup",
    "fingerprint",
    "job_key_for",
    "keys_main",
    "only_key",
    "parse_key_text",
]

log = structlog.get_logger("rahatback_agent.keyring")

KEY_BYTES = 32
EXPORT_FORMAT = "rahatback-backup-key"
_FINGERPRINT_DOMAIN = b"rahatback/backup-key-fingerprint/v1\x00"
# no ":" — managed key ids are "<job id>:<generation>", so the two kinds never collide
KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_COMMAND_TIMEOUT_SECONDS = 30.0
# a key command that failed is not run again for the heartbeat before this long (a vault that hangs
# would otherwise hold up every heartbeat by the timeout); a backup or restore that needs the key
# always asks again
KEY_COMMAND_RETRY_SECONDS = 60.0


class KeyringError(Exception):
    """A key is missing, differs, or cannot be read; the message says what to do (never key bytes)."""


def fingerprint(key_id: str, key: bytes) -> str:
    """First 16 bytes of SHA-256 over a domain-separated, length-prefixed (key id, key), in hex.

    Binding the id makes the same bytes under another id a different fingerprint, so a key cannot
    be passed off under a name it was not created with."""
    kid = key_id.encode()
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN + len(kid).to_bytes(2, "big") + kid + key).digest()
    return digest[:16].hex()


def check_key_id(key_id: str) -> str:
    if not KEY_ID_PATTERN.match(key_id):
        raise KeyringError(
            f"invalid key id {key_id!r}: use 1-64 letters, digits, '.', '_' or '-' (no ':'),"
            " starting with a letter or digit"
        )
    return key_id


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: the key is not valid base64") from None  # never echo the value
    if len(key) != KEY_BYTES:
        raise KeyringError(f"{where}: the key must be base64 of exactly 32 bytes, not {len(key)}")
    return key


def parse_key_text(text: str, where: str) -> dict[str, bytes]:
    """Key id → key from any of the shapes a key is kept in: a customer export
    (`{"format": "rahatback-backup-key", "key_id", "key_b64", ...}`), a managed export from the API
    (`{"key_id", "key_b64"}`), a whole keyring (`{"keys": [...]}`), or bare base64 (id "")."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return {"": _decode_key(stripped, where)}
    try:
        data = json.loads(stripped)
    except ValueError:
        raise KeyringError(f"{where} is neither base64 nor a RahatBack key file (bad JSON)") from None
    entries = data.get("keys") if isinstance(data, dict) and "keys" in data else [data]
    if not isinstance(entries, list):
        raise KeyringError(f"{where}: 'keys' must be a list")
    found: dict[str, bytes] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("key_b64"), str):
            raise KeyringError(f"{where}: every key needs key_id and key_b64")
        key_id = entry.get("key_id")
        found[key_id if isinstance(key_id, str) else ""] = _decode_key(entry["key_b64"], where)
    return found


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    fingerprint: str
    source: str  # "keyring", "file" or "command"
    name: str | None = None
    created_at: str | None = None


@dataclass(frozen=True)
class _Entry:
    info: KeyInfo
    key: bytes


def _read_private(path: Path, what: str) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyringError(
            f"{what} {path} is readable by other users (mode {stat.S_IMODE(mode):04o}) and holds backup"
            f" keys; run `chmod 600 {path}`"
        )
    return path.read_text(encoding="utf-8")


class Keyring:
    def __init__(
        self,
        path: Path,
        *,
        key_file: Path | None = None,
        key_command: str | None = None,
        key_command_ids: Sequence[str] = (),
    ) -> None:
        self.path = path.expanduser()
        self.key_file = key_file.expanduser() if key_file is not None else None
        self.key_command = key_command
        self.key_command_ids = [check_key_id(k) for k in key_command_ids]
        self._lock = threading.Lock()
        # asked once per key id and process, once it worked: the heartbeat (every few seconds, in a
        # thread) and a job must not both run the vault script, nor run it again and again
        self._from_command: dict[str, bytes] = {}
        self._command_locks = {key_id: threading.Lock() for key_id in self.key_command_ids}
        self._command_failed_at: dict[str, float] = {}  # time.monotonic() of the last failure

    @classmethod
    def beside(cls, config: Path, **sources: Any) -> Keyring:
        """`agent.json` → `agent.keys.json` in the same folder: one keyring per identity."""
        config = config.expanduser()
        return cls(config.with_name(f"{config.stem}.keys.json"), **sources)

    @classmethod
    def from_settings(cls, settings: Any) -> Keyring:
        sources = {
            "key_file": settings.key_file,
            "key_command": settings.key_command,
            "key_command_ids": settings.key_command_ids,
        }
        if settings.keyring is not None:
            return cls(settings.keyring, **sources)
        return cls.beside(settings.config, **sources)

    # ------------------------------------------------------------ the keyring file

    def _load_file(self) -> list[dict[str, Any]]:
        try:
            text = _read_private(self.path, "the keyring")
        except FileNotFoundError:
            return []
        try:
            data = json.loads(text)
            entries = data["keys"]
            assert isinstance(entries, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise KeyringError(f"the keyring {self.path} is damaged (not a RahatBack keyring)") from None
        return [e for e in entries if isinstance(e, dict)]

    def create(self, name: str | None = None) -> KeyInfo:
        """A new random key in the keyring file. Existing keys are never replaced or removed: old
        backups stay restorable with them."""
        with self._lock:
            entries = self._load_file()
            key_id = f"ck-{secrets.token_hex(8)}"
            key = secrets.token_bytes(KEY_BYTES)
            created_at = datetime.now(UTC).isoformat(timespec="seconds")
            entries.append(
                {
                    "key_id": key_id,
                    "name": name,
                    "created_at": created_at,
                    "key_b64": base64.b64encode(key).decode(),
                }
            )
            write_private_atomic(self.path, json.dumps({"version": 1, "keys": entries}, indent=2) + "\n")
        return KeyInfo(key_id, fingerprint(key_id, key), "keyring", name, created_at)

    # ------------------------------------------------------------ all sources

    def _entries(self) -> list[_Entry]:
        found: list[_Entry] = []
        for raw in self._load_file():
            key_id = str(raw.get("key_id", ""))
            key = _decode_key(str(raw.get("key_b64", "")), f"the keyring {self.path} ({key_id})")
            info = KeyInfo(
                key_id, fingerprint(key_id, key), "keyring", raw.get("name"), raw.get("created_at")
            )
            found.append(_Entry(info, key))
        if self.key_file is not None:
            try:
                text = _read_private(self.key_file, "the key file")
            except FileNotFoundError:
                raise KeyringError(
                    f"the key file {self.key_file} (RAHATBACK_AGENT_KEY_FILE) does not exist"
                ) from None
            for key_id, key in parse_key_text(text, f"the key file {self.key_file}").items():
                if not key_id:
                    raise KeyringError(
                        f"the key file {self.key_file} holds a bare key without a key id;"
                        " use a file written by `rahatback-agent keys export`"
                    )
                found.append(_Entry(KeyInfo(key_id, fingerprint(key_id, key), "file"), key))
        return found

    def _command_key(self, key_id: str, *, for_heartbeat: bool = False) -> bytes:
        with self._command_locks[key_id]:
            if key_id in self._from_command:
                return self._from_command[key_id]
            failed_at = self._command_failed_at.get(key_id)
            if for_heartbeat and failed_at is not None:
                wait = KEY_COMMAND_RETRY_SECONDS - (time.monotonic() - failed_at)
                if wait > 0:
                    raise KeyringError(
                        f"the key command for {key_id!r} failed; it is tried again in {wait:.0f} s"
                    )
            try:
                key = self._run_key_command(key_id)
            except KeyringError:
                self._command_failed_at[key_id] = time.monotonic()
                raise
            self._from_command[key_id] = key
            self._command_failed_at.pop(key_id, None)
            return key

    def _run_key_command(self, key_id: str) -> bytes:
        assert self.key_command is not None
        argv = [*shlex.split(self.key_command), key_id]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=KEY_COMMAND_TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KeyringError(f"the key command for {key_id!r} could not run: {exc}") from None
        if done.returncode != 0:
            # stderr may say why (vault sealed, no permission); stdout is never shown
            reason = done.stderr.strip().splitlines()[-1:] or ["no error output"]
            raise KeyringError(
                f"the key command for {key_id!r} exited with {done.returncode}: {reason[0][:200]}"
            )
        keys = parse_key_text(done.stdout, f"the key command's output for {key_id!r}")
        key = keys.get(key_id, keys.get(""))
        if key is None:
            raise KeyringError(f"the key command's output for {key_id!r} holds another key id")
        return key

    def infos(self, *, for_heartbeat: bool = False) -> list[KeyInfo]:
        infos = [e.info for e in self._entries()]
        for key_id in self.key_command_ids:
            try:
                key = self._command_key(key_id, for_heartbeat=for_heartbeat)
            except KeyringError as exc:
                log.warning("backup key not available from the key command", key_id=key_id, error=str(exc))
                continue
            infos.append(KeyInfo(key_id, fingerprint(key_id, key), "command"))
        return infos

    def held(self) -> list[HeldKey]:
        """What the heartbeat reports; an unreadable keyring is logged and reported as empty."""
        try:
            infos = self.infos(for_heartbeat=True)
            return [HeldKey(key_id=i.key_id, fingerprint=i.fingerprint) for i in infos]
        except (KeyringError, OSError) as exc:
            log.warning("keyring unreadable", path=str(self.path), error=str(exc))
            return []

    def key(self, key_id: str) -> bytes:
        for entry in self._entries():
            if entry.info.key_id == key_id:
                return entry.key
        if self.key_command is not None and key_id in self.key_command_ids:
            return self._command_key(key_id)
        raise KeyringError(
            f"this agent does not hold backup key {key_id!r} (not in {self.path}"
            + (f", {self.key_file}" if self.key_file else "")
            + (", nor among the key command's ids" if self.key_command else "")
            + "); add it back from your exported copy or restore on an agent that holds it"
        )

    def job_key(self, key_id: str, expected_fingerprint: str | None) -> bytes:
        key = self.key(key_id)
        found = fingerprint(key_id, key)
        if expected_fingerprint is not None and found != expected_fingerprint:
            raise KeyringError(
                f"backup key {key_id!r} on this agent has fingerprint {found}, but the control plane"
                f" expects {expected_fingerprint}: this is a different key under the same id"
            )
        return key

    def export(self, key_id: str, out: Path) -> KeyInfo:
        """Write one key in the export format, 0600; refuses to overwrite a file."""
        key = self.key(key_id)
        info = KeyInfo(key_id, fingerprint(key_id, key), "export")
        body = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "custody": "customer",
            "key_id": key_id,
            "fingerprint": info.fingerprint,
            "key_b64": base64.b64encode(key).decode(),
        }
        out = out.expanduser()
        if out.exists():
            raise KeyringError(f"{out} already exists; choose another --out (an export never overwrites)")
        write_private_atomic(out, json.dumps(body, indent=2) + "\n")
        return info


def job_key_for(
    spec: EncryptionSpec | None,
    *,
    private_key: X25519PrivateKey,
    info: str,
    keyring: Keyring | None,
) -> tuple[bytes, str | None] | None:
    """(job key, key id) for a command's encryption spec, from the sealed blob (managed) or this
    host's keyring (customer); None when the command carries no key. Raises KeyringError or
    SealingError with a message for the report."""
    if spec is None or not spec.enabled:
        return None
    if spec.custody == "customer":
        if not spec.key_id:
            raise KeyringError("the command asks for a customer-held key but names no key id")
        if keyring is None:
            raise KeyringError(f"this agent has no keyring; it cannot use backup key {spec.key_id!r}")
        return keyring.job_key(spec.key_id, spec.fingerprint), spec.key_id
    if spec.job_key is None:
        return None
    return open_job_key(private_key, spec.job_key, info), spec.key_id


def artifact_key_lookup(
    spec: EncryptionSpec | None,
    encrypted: bool,
    what: str,
    *,
    private_key: X25519PrivateKey,
    info: str,
    keyring: Keyring | None,
) -> Callable[[str], bytes] | None:
    """What reading an artifact needs (restore, verify): the command's key, bound to its key id;
    None for an unencrypted artifact. An encrypted one without a key is refused, naming `what`."""
    found = job_key_for(spec, private_key=private_key, info=info, keyring=keyring)
    if found is not None:
        return only_key(found[1], found[0])
    if encrypted:
        raise SealingError(f"the artifact is encrypted but the {what} command carries no job key")
    return None


def only_key(key_id: str | None, key: bytes) -> Callable[[str], bytes]:
    """The artifact's header must name the key the command named; else a clear error."""

    def lookup(header_key_id: str) -> bytes:
        if key_id is not None and header_key_id != key_id:
            raise KeyError(header_key_id)
        return key

    return lookup


# ---------------------------------------------------------------- `rahatback-agent keys`


def _keys_parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        prog="rahatback-agent keys",
        description="Customer-held backup keys: they stay on this host; the control plane sees only"
        " key ids and fingerprints.",
    )
    parser.add_argument("--config", type=Path, help="identity file (the keyring sits next to it)")
    sub = parser.add_subparsers(dest="action", required=True)
    p_create = sub.add_parser("create", help="generate a new key in this agent's keyring")
    p_create.add_argument("--name", help="a label for you (not secret, not sent anywhere)")
    sub.add_parser("list", help="key ids and fingerprints this agent holds")
    p_export = sub.add_parser("export", help="write one key to a 0600 file for safekeeping")
    p_export.add_argument("key_id")
    p_export.add_argument("--out", type=Path, required=True, help="the file to write (must not exist)")
    return parser


def keys_main(argv: list[str]) -> int:
    import sys

    from .settings import AgentSettings

    args = _keys_parser().parse_args(argv)
    settings = AgentSettings()
    if args.config is not None:
        settings = settings.model_copy(update={"config": args.config})
    keyring = Keyring.from_settings(settings)
    try:
        if args.action == "create":
            info = keyring.create(args.name)
            print(f"created backup key {info.key_id}")
            print(f"fingerprint {info.fingerprint}")
            print(f"stored in {keyring.path} (mode 0600); the key itself was not printed and is sent nowhere")
            print(
                "export a copy for safekeeping now: rahatback-agent keys export"
                f" {info.key_id} --out FILE — without a copy, losing this host loses every backup"
                " made with this key"
            )
        elif args.action == "list":
            infos = keyring.infos()
            if not infos:
                print(
                    f"no backup keys (keyring {keyring.path}); create one with `rahatback-agent keys create`"
                )
            for i in infos:
                label = f"  {i.name}" if i.name else ""
                print(f"{i.key_id}  {i.fingerprint}  {i.source}{label}")
        else:
            info = keyring.export(args.key_id, args.out)
            print(
                f"exported backup key {info.key_id} (fingerprint {info.fingerprint})"
                f" to {args.out} (mode 0600)"
            )
            print(
                "keep this file somewhere safe and apart from this host: it is what makes offline"
                " recovery possible (`rahatback-agent decrypt ARTIFACT --key @FILE`), and whoever"
                " holds it can read every backup made with this key"
            )
    except (KeyringError, OSError) as exc:
        print(f"rahatback-agent keys: {exc}", file=sys.stderr)
        return 1
    return 0
