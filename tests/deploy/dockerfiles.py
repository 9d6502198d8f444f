"""Just enough of Docker's file formats to check ours: Dockerfile instructions and stages, and
`.dockerignore` matching (no Docker engine runs here).

Dockerfile: line continuations with `\\`, comment lines (also inside continuations), `--flag=value`
options, JSON ("exec") and shell forms, `ARG` defaults substituted into `FROM`.
.dockerignore: Go `filepath.Match` globs plus `**`, `!` exceptions, last match wins, and a pattern
matching a directory matches everything under it — the rules of moby's patternmatcher.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_OPTION = re.compile(r"--([a-z-]+)=(\S+)\s*")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Instruction:
    keyword: str  # upper case
    text: str  # everything after the keyword and its --options, continuations joined
    line: int
    options: dict[str, str] = field(default_factory=dict)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of CMD/ENTRYPOINT/RUN/HEALTHCHECK CMD, or None for the shell form."""
        text = self.text
        if self.keyword == "HEALTHCHECK":
            if not text.startswith("CMD "):
                return None
            text = text[4:].strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def words(self) -> list[str]:
        return self.text.split()


@dataclass
class Stage:
    base: str  # with global ARG defaults substituted
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(parse_env(instruction.text))
        return values


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments, even inside a continuation, and blank lines between instructions
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        lines.append((start, " ".join(part for part in current if part)))
        current = []
    assert not current, "the Dockerfile ends inside a line continuation"
    return lines


def parse_env(text: str) -> dict[str, str]:
    """`ENV A=1 B="x y"` (the legacy `ENV A 1` form is not used here)."""
    values: dict[str, str] = {}
    for match in re.finditer(r'([A-Za-z_][A-Za-z0-9_]*)=("([^"]*)"|\S*)', text):
        values[match.group(1)] = match.group(3) if match.group(3) is not None else match.group(2)
    return values


def substitute(text: str, variables: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: variables.get(m.group(1) or m.group(2), m.group(0)), text)


def parse_dockerfile(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, logical in _logical_lines(path.read_text()):
        keyword, _, rest = logical.partition(" ")
        keyword = keyword.upper()
        options: dict[str, str] = {}
        while match := _OPTION.match(rest):
            options[match.group(1)] = match.group(2)
            rest = rest[match.end() :]
        instruction = Instruction(keyword, rest.strip(), line, options)
        if keyword == "FROM":
            words = instruction.words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name, []))
        elif not stages:
            assert keyword == "ARG", f"{path}:{line}: only ARG may come before the first FROM"
            arg_name, _, default = instruction.text.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, global_args, stages)


# --- .dockerignore ---------------------------------------------------------------------------------


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # `**/` also matches no directory at all
                out = out[:-2] + "(?:.*/)?"
                i += 1
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        else:
            out += re.escape(char)
        i += 1
    return re.compile(f"^{out}$")


@dataclass
class DockerIgnore:
    rules: list[tuple[bool, re.Pattern[str]]]  # (is an exception "!", pattern)

    @classmethod
    def load(cls, path: Path) -> DockerIgnore:
        rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            exception = line.startswith("!")
            pattern = line[1:].strip() if exception else line
            pattern = pattern.strip("/")
            rules.append((exception, _glob_regex(pattern)))
        return cls(rules)

    def excluded(self, relative: str) -> bool:
        """Whether a file (path relative to the context, `/`-separated) is left out of the context."""
        parts = relative.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]  # the file and its parents
        excluded = False
        for exception, regex in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not exception
        return excluded
