"""Signed commands: what the signature binds (subject and body), and each way a check fails."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rahatback_contracts import messages as m
from rahatback_contracts import signing, subjects

AGENT = "0123456789abcdef0123456789abcdef"
OTHER_AGENT = "fedcba9876543210fedcba9876543210"
KEY = Ed25519PrivateKey.generate()
TRUSTED = {"api-1": KEY.public_key()}


def body() -> bytes:
    now = datetime.now(UTC)
    return m.CancelCommand(
        command_id="c1", org_id="o1", issued_at=now, expires_at=now + timedelta(hours=1), run_id="r1"
    ).to_bytes()


def test_a_signed_command_verifies_and_names_its_key() -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    headers = signing.signature_headers(KEY, "api-1", subject, data)
    assert list(headers) == ["Rahatback-Signature"]
    assert headers["Rahatback-Signature"].startswith("api-1:")
    assert signing.verify(TRUSTED, subject, data, headers["Rahatback-Signature"]) == "api-1"


def test_the_signature_covers_the_domain_the_subject_and_the_body() -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    header = signing.sign(KEY, "api-1", subject, data)
    raw = base64.b64decode(header.split(":", 1)[1])
    # independently of verify(): the exact bytes documented in docs/security.md
    KEY.public_key().verify(raw, b"rahatback-command-v1\n" + subject.encode() + b"\n" + data)


@pytest.mark.parametrize(
    "subject",
    [
        subjects.agent_command(OTHER_AGENT, "job.cancel"),  # another agent's subject
        subjects.agent_command(AGENT, "restore.execute"),  # another kind of command
        subjects.agent_command(AGENT, "job.cancel") + ".x",
    ],
)
def test_a_signature_does_not_move_to_another_subject(subject: str) -> None:
    data = body()
    header = signing.sign(KEY, "api-1", subjects.agent_command(AGENT, "job.cancel"), data)
    with pytest.raises(signing.SignatureError, match="another subject") as caught:
        signing.verify(TRUSTED, subject, data, header)
    assert caught.value.problem == "bad_signature"


@pytest.mark.parametrize("position", [0, 17, -1])
def test_a_flipped_byte_in_the_body_is_refused(position: int) -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    header = signing.sign(KEY, "api-1", subject, data)
    tampered = bytearray(data)
    tampered[position] ^= 0x01
    with pytest.raises(signing.SignatureError) as caught:
        signing.verify(TRUSTED, subject, bytes(tampered), header)
    assert caught.value.problem == "bad_signature"


def test_a_flipped_bit_in_the_signature_is_refused() -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    key_id, encoded = signing.sign(KEY, "api-1", subject, data).split(":", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x80
    with pytest.raises(signing.SignatureError) as caught:
        signing.verify(TRUSTED, subject, data, f"{key_id}:{base64.b64encode(bytes(raw)).decode()}")
    assert caught.value.problem == "bad_signature"


def test_a_forgery_by_another_key_under_the_trusted_key_id_is_refused() -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    forged = signing.sign(Ed25519PrivateKey.generate(), "api-1", subject, data)
    with pytest.raises(signing.SignatureError) as caught:
        signing.verify(TRUSTED, subject, data, forged)
    assert caught.value.problem == "bad_signature"


def test_an_unknown_key_id_is_refused_and_named() -> None:
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    header = signing.sign(Ed25519PrivateKey.generate(), "api-2", subject, data)
    with pytest.raises(signing.SignatureError, match=r"'api-2'.*pinned: api-1") as caught:
        signing.verify(TRUSTED, subject, data, header)
    assert caught.value.problem == "unknown_key"


@pytest.mark.parametrize("header", [None, ""])
def test_an_unsigned_message_is_refused(header: str | None) -> None:
    with pytest.raises(signing.SignatureError, match="no Rahatback-Signature") as caught:
        signing.verify(TRUSTED, subjects.agent_command(AGENT, "job.cancel"), body(), header)
    assert caught.value.problem == "unsigned"


@pytest.mark.parametrize("header", ["api-1", "api-1:not base64!", ":AAAA", "a b:AAAA"])
def test_a_malformed_header_is_refused(header: str) -> None:
    with pytest.raises(signing.SignatureError) as caught:
        signing.verify(TRUSTED, subjects.agent_command(AGENT, "job.cancel"), body(), header)
    assert caught.value.problem == "malformed_signature"


@pytest.mark.parametrize("key_id", ["", "a:b", "x" * 65, "a b"])
def test_key_ids_that_would_break_the_header_are_refused_when_signing(key_id: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        signing.sign(KEY, key_id, subjects.agent_command(AGENT, "job.cancel"), body())


def test_keys_round_trip_through_their_base64_form() -> None:
    private = signing.decode_private_key(signing.encode_private_key(KEY))
    public = signing.decode_public_key(signing.encode_public_key(KEY.public_key()))
    subject, data = subjects.agent_command(AGENT, "job.cancel"), body()
    assert signing.verify({"k": public}, subject, data, signing.sign(private, "k", subject, data)) == "k"


@pytest.mark.parametrize("value", ["not base64!", base64.b64encode(b"short").decode()])
def test_malformed_keys_are_refused_without_echoing_them(value: str) -> None:
    with pytest.raises(ValueError) as private:
        signing.decode_private_key(value)
    with pytest.raises(ValueError) as public:
        signing.decode_public_key(value)
    assert value not in str(private.value) and value not in str(public.value)


def test_the_refusal_report_lives_in_the_agents_own_report_subjects() -> None:
    assert subjects.agent_command_refused(AGENT) == f"agent.{AGENT}.report.command.refused"
    report = m.CommandRefused(
        agent_id=AGENT,
        occurred_at=datetime.now(UTC),
        subject=subjects.agent_command(AGENT, "job.execute"),
        reason="expired",
        detail="expired 5 minutes ago",
        command_id="c1",
        run_kind="backup",
        run_id="r1",
    )
    assert m.CommandRefused.from_bytes(report.to_bytes()) == report
