"""Engines by the name the control plane uses (contracts' `Engine` literal)."""

from __future__ import annotations

from rahatback_agent.engines.base import Engine, EngineError
from rahatback_agent.engines.mongodb import MongoDBEngine
from rahatback_agent.engines.mssql import MSSQLEngine
from rahatback_agent.engines.mysql import MySQLEngine
from rahatback_agent.engines.postgresql import PostgreSQLEngine
from rahatback_agent.engines.sqlite import SQLiteEngine

__all__ = ["ENGINES", "get_engine"]

ENGINES: dict[str, Engine] = {
    "postgresql": PostgreSQLEngine(),
    "sqlite": SQLiteEngine(),
    "mongodb": MongoDBEngine(),
    "mssql": MSSQLEngine(),
    "mysql": MySQLEngine(),
}


def get_engine(name: str) -> Engine:
    try:
        return ENGINES[name]
    except KeyError:
        supported = ", ".join(sorted(ENGINES))
        raise EngineError(
            "bad_settings", f"unsupported engine {name!r}: this agent supports {supported}"
        ) from None
