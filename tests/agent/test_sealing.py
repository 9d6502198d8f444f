"""HPKE sealing: only this agent, only this run/request, never silently."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from rahatback_agent.identity import public_key_b64
from rahatback_agent.sealing import SealingError, open_job_key, open_sealed
from rahatback_contracts.messages import Sealed, seal_info
from rahatback_contracts.sealing import seal


@pytest.fixture
def key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def test_round_trip_bound_to_the_run(key: X25519PrivateKey) -> None:
    info = seal_info("run", "run-1")
    sealed = seal(public_key_b64(key), {"password": "pässwörd"}, info)
    assert sealed.info == "rahatback:run:run-1"
    assert "pässwörd" not in sealed.model_dump_json()
    assert open_sealed(key, sealed, info) == {"password": "pässwörd"}


def test_refuses_secrets_bound_to_another_run(key: X25519PrivateKey) -> None:
    sealed = seal(public_key_b64(key), {"password": "x"}, seal_info("run", "run-1"))
    with pytest.raises(SealingError, match="another run"):
        open_sealed(key, sealed, seal_info("run", "run-2"))


def test_relabelled_info_does_not_help_an_attacker(key: X25519PrivateKey) -> None:
    # the info is authenticated by HPKE itself, not just compared as a label
    sealed = seal(public_key_b64(key), {"password": "x"}, seal_info("run", "run-1"))
    relabelled = Sealed(ciphertext_b64=sealed.ciphertext_b64, info=seal_info("run", "run-2"))
    with pytest.raises(SealingError, match="could not be opened"):
        open_sealed(key, relabelled, seal_info("run", "run-2"))


def test_refuses_secrets_sealed_to_another_agent(key: X25519PrivateKey) -> None:
    other = X25519PrivateKey.generate()
    info = seal_info("rpc", "req-1")
    sealed = seal(public_key_b64(other), {"password": "x"}, info)
    with pytest.raises(SealingError, match="sealed to another recipient"):
        open_sealed(key, sealed, info)


def test_tampered_ciphertext_and_garbage(key: X25519PrivateKey) -> None:
    info = seal_info("restore", "r-1")
    sealed = seal(public_key_b64(key), {"password": "x"}, info)
    raw = bytearray(base64.b64decode(sealed.ciphertext_b64))
    raw[-1] ^= 1
    with pytest.raises(SealingError):
        open_sealed(key, Sealed(ciphertext_b64=base64.b64encode(bytes(raw)).decode(), info=info), info)
    with pytest.raises(SealingError, match="base64"):
        open_sealed(key, Sealed(ciphertext_b64="!!!", info=info), info)
    with pytest.raises(SealingError):
        open_sealed(key, Sealed(ciphertext_b64=base64.b64encode(b"short").decode(), info=info), info)


def test_job_key(key: X25519PrivateKey) -> None:
    info = seal_info("run", "run-1")
    job_key = bytes(range(32))
    sealed = seal(public_key_b64(key), {"key_b64": base64.b64encode(job_key).decode()}, info)
    assert open_job_key(key, sealed, info) == job_key
    short = seal(public_key_b64(key), {"key_b64": base64.b64encode(b"x" * 16).decode()}, info)
    with pytest.raises(SealingError, match="32 bytes"):
        open_job_key(key, short, info)
    missing = seal(public_key_b64(key), {"password": "x"}, info)
    with pytest.raises(SealingError, match="key_b64"):
        open_job_key(key, missing, info)
