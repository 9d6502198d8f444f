"""Which environment variables each service reads: its settings class's fields under its env prefix,
plus the few its command line reads directly (named here only after checking the code reads them)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable

from pydantic_settings import BaseSettings

SERVICES: dict[str, str] = {
    "api": "rahatback_api.settings:Settings",
    "agent": "rahatback_agent.settings:AgentSettings",
    "scheduler": "rahatback_scheduler.settings:SchedulerSettings",
    "notifier": "rahatback_notifier.settings:NotifierSettings",
}

# read with os.environ by the service's main module, not through its settings class
COMMAND_LINE_ENV: dict[str, tuple[str, ...]] = {
    "api": ("RAHATBACK_ADMIN_PASSWORD",),
    "agent": ("RAHATBACK_AGENT_ENROLL_TOKEN",),
    "scheduler": (),
    "notifier": (),
}

# Named by the deployment files but not read by the code yet: each waits for a setting to be wired
# (see docs/deploy.md). test_pending_settings_are_still_pending fails once one exists, so this list
# cannot outlive its reason.
PENDING_ENV: dict[str, tuple[str, ...]] = {
    "api": (),
    "agent": (),
    "scheduler": (),
    "notifier": (),
}


def settings_class(service: str) -> type[BaseSettings]:
    module, _, name = SERVICES[service].partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, BaseSettings)
    return cls


def settings_env_names(service: str) -> set[str]:
    cls = settings_class(service)
    prefix = str(cls.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in cls.model_fields}


def command_line_env_names(service: str) -> set[str]:
    main = inspect.getsource(importlib.import_module(f"rahatback_{service}.main"))
    names = set(COMMAND_LINE_ENV[service])
    for name in names:
        assert f'"{name}"' in main, f"rahatback_{service}.main no longer reads {name}"
    return names


def known_env_names(service: str) -> set[str]:
    return settings_env_names(service) | command_line_env_names(service) | set(PENDING_ENV[service])


def assert_env_names_known(service: str, names: Iterable[str], where: str = "") -> None:
    known = known_env_names(service)
    unknown = sorted(n for n in names if n.startswith("RAHATBACK_") and n not in known)
    assert not unknown, f"{where or service}: {unknown} are not settings of rahatback-{service}"
