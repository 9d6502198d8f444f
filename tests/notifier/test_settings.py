"""Settings and the key commands, without servers."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from rahatback_notifier.main import main
from rahatback_notifier.settings import ConfigurationError, NotifierSettings


def test_backoff_doubles_up_to_the_cap() -> None:
    settings = NotifierSettings(backoff_base_seconds=5, backoff_cap_seconds=600)
    assert [settings.backoff(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert settings.backoff(10_000) == 600


@pytest.mark.parametrize(("security", "port"), [("none", 25), ("starttls", 587), ("tls", 465)])
def test_smtp_port_follows_the_security_mode(security: str, port: int) -> None:
    assert NotifierSettings(smtp_host="mail.example.com", smtp_security=security).resolved_smtp_port == port
    assert NotifierSettings(smtp_host="mail.example.com", smtp_port=2525).resolved_smtp_port == 2525


def test_no_smtp_host_is_dev_mode() -> None:
    assert NotifierSettings(smtp_host=None).dev_mode
    assert not NotifierSettings(smtp_host="mail.example.com").dev_mode


@pytest.mark.parametrize(
    ("value", "complaint"),
    [("not base64!", "not valid base64"), (base64.b64encode(b"short").decode(), "32 raw bytes")],
)
def test_a_bad_private_key_is_refused_with_the_reason(value: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        NotifierSettings(private_key=value).load_private_key()


def test_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="keygen"):
        NotifierSettings(private_key_file=tmp_path / "absent.key").load_private_key()


def test_keygen_writes_a_private_file_whose_public_key_the_api_gets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "notifier.key"
    assert main(["keygen", "--out", str(key_file)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert main(["keygen", "--out", str(key_file)]) == 1  # never overwritten by accident

    monkeypatch.setenv("RAHATBACK_NOTIFIER_PRIVATE_KEY_FILE", str(key_file))
    capsys.readouterr()
    assert main(["public-key"]) == 0
    public = capsys.readouterr().out.strip()
    assert len(base64.b64decode(public)) == 32
    assert f"public key (give it to the API): {public}" in printed
    assert key_file.read_text().strip() not in printed  # the private key is only in the file
