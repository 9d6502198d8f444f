"""docker-compose.yml, checked without Docker: valid against the Compose Specification schema
(vendored, see README.md here), and consistent with the code — every image built maps to a
Dockerfile, every RAHATBACK_* variable is a setting of that service, URLs point at ports the target
service listens on, health checks guard every `service_healthy` dependency, and the environment
compose hands each container is accepted by the service's own settings class.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from rahatback_api.settings import Settings, decode_master_key
from rahatback_notifier.settings import NotifierSettings, decode_private_key

from tests.deploy.dockerfiles import parse_dockerfile
from tests.deploy.settings_fields import assert_env_names_known, settings_class

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")

# ports the third-party images listen on (their documented defaults, as configured here)
IMAGE_PORTS = {
    "nats": {4222, 8222},
    "postgres": {5432},
    "minio/minio": {9000, 9001},
    "axllent/mailpit": {1025, 8025},
}
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$`."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        current = env.get(name, "")
        if operator in (":-", "-"):
            return current or argument
        if operator in (":?", "?") and not current:
            raise ValueError(f"{name}: {argument}")
        return current

    return _INTERPOLATION.sub(one, value).replace("$$", "$")


def rahatback_service(service: dict[str, Any]) -> str | None:
    """'api' for a service running the rahatback/api image, None for third-party images."""
    match = re.match(r"rahatback/([a-z]+):", service.get("image", ""))
    return match.group(1) if match else None


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment as a mapping, so the tests can read it"
    return {k: str(v) for k, v in env.items()}


def listening_ports(compose: dict[str, Any], name: str) -> set[int]:
    service = compose["services"][name]
    ports = {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}
    ports |= {int(p) for p in service.get("expose", [])}
    image = service["image"].split(":")[0]
    ports |= IMAGE_PORTS.get(image, set())
    command = service.get("command", [])
    if "--port" in command:
        ports.add(int(command[command.index("--port") + 1]))
    return ports


def generated_env_file() -> dict[str, str]:
    """The .env that deploy/compose/generate-env.sh prints."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (generate-env.sh needs it)")
    out = subprocess.run(
        ["sh", str(ROOT / "deploy/compose/generate-env.sh")], capture_output=True, text=True, check=True
    ).stdout
    return parse_env_file(out)


def parse_env_file(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(load_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_mistakes() -> None:
    """Guards the guard: a misspelt key and a wrong condition are schema errors."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    compose = load_compose()
    compose["services"]["api"]["healthchek"] = compose["services"]["api"].pop("healthcheck")
    compose["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_completed"
    messages = [e.message for e in validator.iter_errors(compose)]
    assert any("healthchek" in m for m in messages) and any("service_completed" in m for m in messages)


def test_every_built_image_has_its_dockerfile() -> None:
    compose = load_compose()
    built = {name: s for name, s in compose["services"].items() if "build" in s}
    assert {rahatback_service(s) for s in built.values()} == {"api", "scheduler", "notifier", "agent"}
    for name, service in built.items():
        build = service["build"]
        assert build["context"] == ".", f"{name}: the Dockerfiles need the repository root as context"
        dockerfile = ROOT / build["dockerfile"]
        assert dockerfile == ROOT / "services" / str(rahatback_service(service)) / "Dockerfile", name
        parsed = parse_dockerfile(dockerfile)
        command = service.get("command")
        if command is not None:
            scripts = parsed.final.all("CMD")[0].exec_form or []
            assert command[0] == scripts[0], f"{name} runs another program than its image's CMD"


def test_rahatback_variables_are_settings_of_their_service() -> None:
    for name, service in load_compose()["services"].items():
        owner = rahatback_service(service)
        if owner is None:
            assert not [k for k in environment(service) if k.startswith("RAHATBACK_")], name
            continue
        assert_env_names_known(owner, environment(service), where=f"compose service {name}")


def test_urls_and_ports_point_at_listening_services() -> None:
    compose = load_compose()
    services = compose["services"]
    placeholders = dict.fromkeys(parse_env_file((ROOT / ".env.example").read_text()), "x")
    checked = 0
    for name, service in services.items():
        for key, raw in environment(service).items():
            value = interpolate(raw, placeholders)
            if "://" not in value:
                continue
            url = urlsplit(value)
            if url.hostname in services:
                assert url.port in listening_ports(compose, url.hostname), f"{name}.{key}={value}"
                checked += 1
        for test in (service.get("healthcheck", {}).get("test") or [])[1:]:
            for port in re.findall(r"127\.0\.0\.1:(\d+)/", test):
                assert int(port) in listening_ports(compose, name), f"{name} health check on {port}"
                checked += 1
    notifier = environment(services["notifier"])
    assert int(notifier["RAHATBACK_NOTIFIER_SMTP_PORT"]) in listening_ports(
        compose, notifier["RAHATBACK_NOTIFIER_SMTP_HOST"]
    )
    for service in ("scheduler", "notifier"):
        port = environment(services[service])[f"RAHATBACK_{service.upper()}_METRICS_PORT"]
        assert port in services[service]["expose"]
    assert checked >= 8


def test_health_checks_guard_every_dependency() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        one_shot = service.get("restart") == "no"
        check = service.get("healthcheck", {})
        if not one_shot:
            assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        for target, dependency in (service.get("depends_on") or {}).items():
            condition = dependency["condition"]
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), f"{name} → {target}"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must be a one-shot"
    migrate_first = services["api"]["depends_on"]["migrate"]["condition"]
    assert migrate_first == "service_completed_successfully"
    assert services["migrate"]["command"] == ["rahatback-api", "migrate"]


def test_named_volumes_are_declared_and_used() -> None:
    compose = load_compose()
    used = {
        volume.split(":")[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }
    assert used == set(compose["volumes"])


def test_env_example_lists_every_variable_and_no_secret() -> None:
    text = COMPOSE_FILE.read_text()
    referenced = {m.group(1) for m in _INTERPOLATION.finditer(text)}
    example = parse_env_file((ROOT / ".env.example").read_text())
    assert referenced == set(example), "docker-compose.yml and .env.example name different variables"
    for secret in ("RAHATBACK_MASTER_KEY", "RAHATBACK_NOTIFIER_PRIVATE_KEY", "RAHATBACK_COMMAND_SIGNING_KEY"):
        assert example[secret] == "", f"{secret} must be left empty in .env.example"
    required = {m.group(1) for m in _INTERPOLATION.finditer(text) if m.group(2) == ":?"}
    with pytest.raises(ValueError, match=r"RAHATBACK_COMMAND_SIGNING_KEY|RAHATBACK_MASTER_KEY"):
        for name in sorted(required):
            interpolate(f"${{{name}:?missing}}", example)


def test_generated_env_file_starts_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the containers receive from compose + generate-env.sh is accepted by each service."""
    env_file = generated_env_file()
    example = parse_env_file((ROOT / ".env.example").read_text())
    assert set(env_file) == set(example)
    assert len(decode_master_key(env_file["RAHATBACK_MASTER_KEY"], "master")) == 32
    private = decode_private_key(env_file["RAHATBACK_NOTIFIER_PRIVATE_KEY"], "notifier")
    public = base64.b64encode(private.public_key().public_bytes_raw()).decode()
    assert public == env_file["RAHATBACK_NOTIFIER_PUBLIC_KEY"], "the two halves of one key pair"

    services = load_compose()["services"]
    for name in ("api", "migrate", "scheduler", "notifier", "agent"):
        owner = rahatback_service(services[name])
        assert owner is not None
        for key in [k for k in os.environ if k.startswith("RAHATBACK_")]:
            monkeypatch.delenv(key)
        for key, value in environment(services[name]).items():
            monkeypatch.setenv(key, interpolate(value, env_file))
        settings = settings_class(owner)(_env_file=None)  # type: ignore[call-arg]
        if isinstance(settings, Settings):
            assert settings.master_key_bytes()
            assert settings.command_signer().key_id  # a usable Ed25519 key
            settings.check_notifier_public_key()
            assert settings.database_url.startswith("postgresql+asyncpg://rahatback:")
            assert not settings.dev_mode
        if isinstance(settings, NotifierSettings):
            assert settings.load_private_key() is not None and not settings.dev_mode
