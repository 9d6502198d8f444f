"""Which of a server's databases a whole-server job backs up."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase


def select_databases(names: Iterable[str], include: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """Names matching any `include` glob (none given = all) and no `exclude` glob, sorted.

    Case-sensitive like the servers' own names on Linux; `[...]` classes and `*`/`?` as in fnmatch."""
    include, exclude = list(include), list(exclude)
    return sorted(
        {
            name
            for name in names
            if (not include or any(fnmatchcase(name, p) for p in include))
            and not any(fnmatchcase(name, p) for p in exclude)
        }
    )
