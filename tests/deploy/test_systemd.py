"""deploy/systemd: the agent's unit file — systemd itself checks it (`systemd-analyze verify`, and
`security` for its exposure score) where systemd-analyze is installed, and the unit agrees with the
agent's code (console script, settings, drain time)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from rahatback_agent.main import _parser as agent_parser
from rahatback_agent.settings import AgentSettings

from tests.deploy.settings_fields import assert_env_names_known

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy/systemd/rahatback-agent.service"
ENV_EXAMPLE = ROOT / "deploy/systemd/agent.env.example"
INSTALLED_BINARY = "/usr/local/bin/rahatback-agent"


def directives(section: str) -> dict[str, list[str]]:
    """Key → values in one section (keys like SystemCallFilter= may repeat)."""
    values: dict[str, list[str]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def environment() -> dict[str, str]:
    return dict(item.split("=", 1) for item in directives("Service")["Environment"])


def test_runs_the_agent_console_script_as_an_unprivileged_user() -> None:
    service = directives("Service")
    (exec_start,) = service["ExecStart"]
    binary, *args = exec_start.split()
    assert binary == INSTALLED_BINARY
    scripts = tomllib.loads((ROOT / "services/agent/pyproject.toml").read_text())["project"]["scripts"]
    assert Path(binary).name in scripts
    assert agent_parser().parse_args(args).command == "run"
    assert service["User"] == ["rahatback"] and service["Group"] == ["rahatback"]


def test_hardening() -> None:
    service = directives("Service")
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictSUIDSGID": "yes",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert service.get(key) == [value], key
    writable = service["ReadWritePaths"][0].split()
    config_dir = str(Path(environment()["RAHATBACK_AGENT_CONFIG"]).parent)
    assert config_dir in writable and "/var/backups/rahatback" in writable
    assert service["StateDirectory"] == ["rahatback"] and config_dir == "/var/lib/rahatback"


def test_stop_waits_longer_than_the_agent_drains() -> None:
    service = directives("Service")
    assert service["KillSignal"] == ["SIGTERM"]
    assert int(service["TimeoutStopSec"][0]) > AgentSettings.model_fields["drain_seconds"].default


def test_environment_names_are_agent_settings() -> None:
    names = set(environment())
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"#?(RAHATBACK_[A-Z_]+)=", line.strip()):
            names.add(match.group(1))
    assert len(names) >= 6
    assert_env_names_known("agent", names, where="deploy/systemd")


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    return tool


def unit_with_real_binary(tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's agent (verify wants it to exist)."""
    binary = Path(sys.executable).parent / "rahatback-agent"
    assert binary.exists()
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return unit


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_with_real_binary(tmp_path)
    checked = subprocess.run([tool, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_systemd_rates_the_unit_well_hardened(tmp_path: Path) -> None:
    tool = systemd_analyze()
    unit = unit_with_real_binary(tmp_path)
    rated = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", rated.stdout)
    if rated.returncode != 0 and match is None:
        pytest.skip(f"this systemd-analyze cannot rate a unit offline: {rated.stderr.strip()[:200]}")
    assert match is not None, rated.stdout[-500:]
    assert float(match.group(1)) <= 2.5, "exposure above 2.5 (of 10): a hardening option was lost"
