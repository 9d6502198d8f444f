"""Which dump/restore programs this host has, their versions, and whether they suit a server.

`detect_tools` runs at start-up and fills what the heartbeat reports. Before every run and
connection test the engine's tools are looked up again by the engine's own search rules (a stat
each) and asked for their version only when the binary is new or has changed, so installing the
package an error names fixes the next run without restarting the agent, and the heartbeat follows.

The rules themselves belong to the engines (`Engine.tool_problem`); they are listed with the
reasons and the packages in docs/dump-tools.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from .engines.base import Engine, EngineError, ToolAction, ToolProblem

__all__ = [
    "UNKNOWN_VERSION",
    "ToolInfo",
    "check_tools",
    "connection_warning",
    "detect_tools",
    "ensure_tools",
    "find_tool",
    "parse_version",
    "reported_tools",
    "tool_version",
]

log = structlog.get_logger("rahatback_agent.tools")

VERSION_TIMEOUT_S = 5.0
UNKNOWN_VERSION = "unknown"  # reported for a tool that is there but whose version could not be read

# In order; the first that matches wins. Real outputs, one per line:
#   pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)
#   mariadb-dump  Ver 10.19 Distrib 10.11.18-MariaDB, for debian-linux-gnu (x86_64)   (10.19: the tool's own)
#   mariadb-dump from 11.4.2-MariaDB, client 10.19 for debian-linux-gnu (x86_64)      (MariaDB 11 on)
#   mysqldump  Ver 10.13 Distrib 5.7.44, for Linux (x86_64)                           (Oracle 5.7)
#   mysqldump  Ver 8.0.36 for Linux on x86_64 (MySQL Community Server - GPL)          (Oracle 8 on)
#   mongodump version: 100.9.4      /      mongodump version: r4.2.8 (bundled before 4.4)
_VERSION_PATTERNS = (
    re.compile(r"\bDistrib\s+(\d+(?:\.\d+)+(?:-MariaDB)?)", re.IGNORECASE),
    re.compile(r"\bfrom\s+(\d+(?:\.\d+)+-MariaDB)", re.IGNORECASE),
    re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*(?:(?:devel|alpha|beta|rc)\d*)?)"),
    re.compile(r"\bversion:?\s+r?(\d+(?:\.\d+)+)", re.IGNORECASE),
    re.compile(r"\bVer\s+(\d+(?:\.\d+)+)"),
    re.compile(r"(?<![\w.-])(\d+\.\d+(?:\.\d+)*)"),
)


def parse_version(output: str) -> str | None:
    """The version a tool's `--version` output states ("15.18", "10.11.18-MariaDB", "100.9.4"),
    MariaDB's marked as such because its rules differ from MySQL's; None if it states none."""
    for pattern in _VERSION_PATTERNS:
        if match := pattern.search(output):
            return match.group(1)
    return None


@dataclass(frozen=True)
class ToolInfo:
    name: str
    path: str
    version: str | None  # None: it is there, but its version could not be read


# by binary (path and what stat says of it): a replaced or upgraded binary is asked again
_versions: dict[tuple[str, int, int, int], str | None] = {}
# the last look at each tool, by name: what the heartbeat reports
_found: dict[str, ToolInfo] = {}
_odbc_drivers: dict[str, str] = {}


async def _ask_version(path: str) -> str | None:
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "--version",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        log.warning("dump tool does not start", path=path, error=exc.strerror or str(exc))
        return None
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), VERSION_TIMEOUT_S)
    except TimeoutError:
        log.warning("dump tool did not say its version in time", path=path, timeout_s=VERSION_TIMEOUT_S)
        return None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return parse_version(output.decode("utf-8", "replace"))


async def tool_version(path: str) -> str | None:
    """`path --version`, parsed; remembered until the binary changes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = (path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _versions:
        _versions[key] = await _ask_version(path)
    return _versions[key]


async def find_tool(engine: Engine, name: str) -> ToolInfo | None:
    """`name` where `engine` would run it from, with its version; None if the engine finds none.
    The heartbeat's record of it follows what is found."""
    path = engine.locate_tool(name)
    info = ToolInfo(name, path, await tool_version(path)) if path else None
    if info is None:
        _found.pop(name, None)
    else:
        _found[name] = info
    return info


async def _odbc_driver_names() -> list[str]:
    def names() -> list[str]:
        try:
            import pyodbc  # type: ignore[import-not-found]  # its pyodbc.pyi is not PEP 561 packaged
        except ImportError:  # no unixODBC (libodbc.so.2) on this host
            return []
        try:
            return [str(name) for name in pyodbc.drivers()]
        except Exception:  # a broken odbcinst.ini must not stop the agent
            return []

    return await asyncio.to_thread(names)


async def detect_tools(engines: Iterable[Engine] | None = None, *, refresh: bool = False) -> dict[str, str]:
    """Look for every engine's tools (default: all registered engines) and the ODBC drivers, and
    return what the heartbeat will report. `refresh` asks every binary for its version again."""
    if engines is None:
        from .engines.registry import ENGINES

        engines = ENGINES.values()
    if refresh:
        _versions.clear()
    wanted = {name: engine for engine in engines for name in engine.tools}
    await asyncio.gather(*(find_tool(engine, name) for name, engine in wanted.items()))
    _odbc_drivers.clear()
    _odbc_drivers.update({f"odbc:{name}": "installed" for name in await _odbc_driver_names()})
    reported = reported_tools()
    missing = sorted(name for name in wanted if name not in reported)
    log.info("dump tools detected", tools=reported, missing=missing)
    return reported


def reported_tools() -> dict[str, str]:
    """name → version of every tool last found ("odbc:<driver>" → "installed" for ODBC drivers)."""
    found = {name: info.version or UNKNOWN_VERSION for name, info in sorted(_found.items())}
    return found | _odbc_drivers


async def check_tools(engine: Engine, action: ToolAction, server_version: str) -> ToolProblem | None:
    """Can this host `action` (dump or restore) a server of `server_version` with `engine`?"""
    if not engine.tools:
        return None
    infos = await asyncio.gather(*(find_tool(engine, name) for name in engine.tools))
    versions = {info.name: info.version for info in infos if info is not None}
    return engine.tool_problem(action, versions, server_version)


async def ensure_tools(engine: Engine, action: ToolAction, server_version: str) -> None:
    """Raise EngineError(tool_missing | tool_too_old) before a run that its tool would fail; log a
    tool that is merely older than advised."""
    problem = await check_tools(engine, action, server_version)
    if problem is None:
        return
    if problem.fatal:
        raise EngineError(problem.code, problem.message)
    log.warning("dump tool older than advised", engine=engine.name, warning=problem.message)


async def connection_warning(engine: Engine, server_version: str) -> ToolProblem | None:
    """For a connection test that worked: what would stop (first) or weaken a backup or restore."""
    actions: tuple[ToolAction, ...] = ("dump", "restore")
    problems = [
        problem for action in actions if (problem := await check_tools(engine, action, server_version))
    ]
    return next((problem for problem in problems if problem.fatal), problems[0] if problems else None)
