"""The service Dockerfiles, checked without a Docker engine: structure (multi-stage, non-root, health
check, no build tools in the final image), that everything they COPY exists and is in the build
context, that CMD names a real console script, and that their builder steps work: the `uv sync`
commands are run exactly as written (offline, from uv's cache) on a context assembled from their
COPY lines and .dockerignore, and the result starts.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.dockerfiles import Dockerfile, DockerIgnore, parse_dockerfile, parse_env, substitute
from tests.deploy.settings_fields import SERVICES, assert_env_names_known

ROOT = Path(__file__).resolve().parents[2]
SERVICE_NAMES = sorted(SERVICES)
IGNORE = DockerIgnore.load(ROOT / ".dockerignore")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|build-essential|make|uv|pip install|-dev)\b")


def dockerfile(service: str) -> Dockerfile:
    return parse_dockerfile(ROOT / "services" / service / "Dockerfile")


def pyproject(service: str) -> dict[str, object]:
    data: dict[str, object] = tomllib.loads((ROOT / "services" / service / "pyproject.toml").read_text())
    return data


def workspace_members() -> list[str]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    members: list[str] = root["tool"]["uv"]["workspace"]["members"]
    return members


def context_files(source: str) -> list[Path]:
    path = ROOT / source
    return [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_multi_stage_non_root_with_health_check(service: str) -> None:
    parsed = dockerfile(service)
    assert len(parsed.stages) >= 2, "a builder stage and a runtime stage"
    assert parsed.stages[0].name == "builder"
    final = parsed.final
    assert final.base.startswith("python:3.11-slim"), final.base
    assert final.base == parsed.stages[0].base, "the venv's python symlink needs the same interpreter path"

    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].text.split(":")[0]
    assert user.isdigit() and int(user) != 0, "a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert all(i.line < users[-1].line for i in final.all("RUN")), "nothing runs as root after USER"

    (health,) = final.all("HEALTHCHECK")
    probe = health.exec_form
    assert probe is not None and probe[0] == "python", "exec form; the slim image has no curl"
    assert {"interval", "timeout", "retries"} <= health.options.keys()

    for run in final.all("RUN"):
        installed = " ".join(w for w in run.words() if not w.startswith("-"))
        assert not BUILD_TOOLS.search(installed.replace("apt-get install", "")), run.text


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_cmd_is_a_console_script_of_the_service(service: str) -> None:
    parsed = dockerfile(service)
    (cmd,) = parsed.final.all("CMD")
    argv = cmd.exec_form
    assert argv is not None
    scripts: dict[str, str] = pyproject(service)["project"]["scripts"]  # type: ignore[index]
    assert argv[0] in scripts, f"{argv[0]} is not a [project.scripts] entry of rahatback-{service}"
    module, _, function = scripts[argv[0]].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_every_copy_source_exists_and_is_in_the_build_context(service: str) -> None:
    parsed = dockerfile(service)
    stage_names = {s.name for s in parsed.stages}
    copies = [i for s in parsed.stages for i in s.all("COPY")]
    assert copies
    for copy in copies:
        *sources, _destination = copy.words()
        if "from" in copy.options:
            assert copy.options["from"] in stage_names, copy.text
            continue
        for source in sources:
            files = context_files(source)
            assert files and all(f.exists() for f in files), f"COPY {source}: not in the repository"
            kept = [f for f in files if not IGNORE.excluded(f.relative_to(ROOT).as_posix())]
            assert kept, f"COPY {source}: everything under it is excluded by .dockerignore"
            if not Path(ROOT / source).is_dir():
                assert kept == files, f"COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_build_inputs_and_drops_local_state() -> None:
    for kept in ("uv.lock", "services/api/src/rahatback_api/main.py", "deploy/docker/agent-entrypoint.sh"):
        assert not IGNORE.excluded(kept), kept
    for dropped in (
        ".venv/bin/python",
        "var/master.key",
        ".env",
        ".git/config",
        "tests/conftest.py",
        "services/api/src/rahatback_api/__pycache__/main.cpython-311.pyc",
    ):
        assert IGNORE.excluded(dropped), dropped


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_builder_copies_every_workspace_member_before_resolving(service: str) -> None:
    """uv needs every member's pyproject.toml to read the workspace, even for one package."""
    builder = dockerfile(service).stage("builder")
    first_sync = next(i for i in builder.all("RUN") if "uv sync" in i.text)
    copied = {
        source for copy in builder.all("COPY") if copy.line < first_sync.line for source in copy.words()[:-1]
    }
    assert {"pyproject.toml", "uv.lock"} <= copied
    for member in workspace_members():
        assert f"{member}/pyproject.toml" in copied, member
    syncs = [i.text for i in builder.all("RUN") if "uv sync" in i.text]
    for sync in syncs:
        assert "--frozen" in sync and "--no-dev" in sync and f"--package rahatback-{service}" in sync
    assert "--no-editable" in syncs[-1]


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_dockerfile_env_names_are_settings(service: str) -> None:
    assert_env_names_known(service, dockerfile(service).final.env())


def test_agent_image_carries_the_dump_tools_and_its_entry_point() -> None:
    parsed = dockerfile("agent")
    installs = " ".join(i.text for i in parsed.final.all("RUN"))
    for package in ("postgresql-client", "mariadb-client", "libodbc2"):
        assert package in installs
    (entrypoint,) = parsed.final.all("ENTRYPOINT")
    assert entrypoint.exec_form == ["/usr/local/bin/rahatback-agent-entrypoint"]
    assert os.access(ROOT / "deploy/docker/agent-entrypoint.sh", os.X_OK)


def test_health_checks_and_ports_agree() -> None:
    api = dockerfile("api").final
    assert api.all("EXPOSE")[0].text == "8000"
    assert "127.0.0.1:8000/healthz" in " ".join(api.all("HEALTHCHECK")[0].exec_form or [])
    cmd = api.all("CMD")[0].exec_form or []
    assert cmd[cmd.index("--port") + 1] == "8000"
    for service in ("scheduler", "notifier"):
        final = dockerfile(service).final
        port = final.env()[f"RAHATBACK_{service.upper()}_METRICS_PORT"]
        assert final.all("EXPOSE")[0].text == port
        assert f"127.0.0.1:{port}/metrics" in " ".join(final.all("HEALTHCHECK")[0].exec_form or [])


# --- the builder stage, run for real ---------------------------------------------------------------


def _assemble_context(parsed: Dockerfile, workdir: Path) -> list[tuple[str, dict[str, str]]]:
    """Copy the builder's COPY sources into `workdir` in order; return its uv RUN commands with the
    environment in force at each."""
    builder = parsed.stage("builder")
    env: dict[str, str] = {}
    commands: list[tuple[str, dict[str, str]]] = []
    for instruction in builder.instructions:
        if instruction.keyword == "ENV":
            env.update({k: substitute(v, env) for k, v in parse_env(instruction.text).items()})
        elif instruction.keyword == "COPY":
            *sources, destination = instruction.words()
            for source in sources:
                for file in context_files(source):
                    relative = file.relative_to(ROOT)
                    if IGNORE.excluded(relative.as_posix()):
                        continue
                    inside = relative.relative_to(source) if (ROOT / source).is_dir() else Path(file.name)
                    target = workdir / destination / inside
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, target)
        elif instruction.keyword == "RUN" and instruction.text.startswith("uv "):
            commands.append((instruction.text, dict(env)))
    return commands


@pytest.mark.parametrize("service", SERVICE_NAMES)
def test_builder_stage_builds_a_working_venv(service: str, tmp_path: Path) -> None:
    uv = shutil.which("uv") or str(Path(sys.executable).parent / "uv")
    if not Path(uv).exists():
        pytest.skip("uv is not installed")
    parsed = dockerfile(service)
    assert parsed.stage("builder").all("WORKDIR")[0].text == "/src"
    context = tmp_path / "src"
    context.mkdir()
    commands = _assemble_context(parsed, context)
    assert len(commands) == 2
    venv = tmp_path / "venv"
    for command, env in commands:
        assert env["UV_PROJECT_ENVIRONMENT"] == "/opt/rahatback"
        run_env = {
            **os.environ,
            **env,
            "UV_PROJECT_ENVIRONMENT": str(venv),
            "UV_PYTHON": sys.base_prefix + "/bin/python3",
            "UV_OFFLINE": "1",  # everything comes from uv's cache, filled by `uv sync` of the workspace
            "UV_COMPILE_BYTECODE": "0",  # slow, and not what is tested here
            "UV_LINK_MODE": "hardlink",  # idem; uv copies where it cannot link
        }
        run_env.pop("VIRTUAL_ENV", None)
        done = subprocess.run(command.split(), cwd=context, env=run_env, capture_output=True, text=True)
        if done.returncode != 0 and "offline" in done.stderr.lower():
            pytest.skip(f"uv's cache lacks a package and the test stays offline: {done.stderr[-300:]}")
        assert done.returncode == 0, done.stderr

    argv = parsed.final.all("CMD")[0].exec_form or []
    script = venv / "bin" / argv[0]
    assert script.exists(), f"{argv[0]} is not installed in the image's venv"
    started = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert started.returncode == 0 and f"usage: {argv[0]}" in started.stdout, started.stderr
    site = next((venv / "lib").glob("python3.*/site-packages"))
    assert not (site / "pytest").exists(), "dev dependencies must stay out of the image"
    assert not list(site.glob("_rahatback_*.pth")) and not list(site.glob("__editable__*")), "not editable"
    package_data = {
        "api": "rahatback_api/migrations/script.py.mako",
        "notifier": "rahatback_notifier/templates/backup_failed.html",
        "scheduler": "rahatback_scheduler/py.typed",
        "agent": "rahatback_agent/py.typed",
    }
    assert (site / package_data[service]).exists(), "package data is installed with the wheel"
