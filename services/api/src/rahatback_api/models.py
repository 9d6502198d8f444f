"""Every table, imported in one place so `SQLModel.metadata` is complete (Alembic, tests, tools)."""

from __future__ import annotations

from sqlmodel import SQLModel

from rahatback_api.agents.models import Agent, EnrollmentToken
from rahatback_api.audit.models import AuditEvent
from rahatback_api.auth.models import ApiToken, LoginThrottle, Membership, Organization, User
from rahatback_api.backups.models import (
    BackupCopy,
    BackupJob,
    BackupKey,
    BackupRun,
    PruneRun,
    RestoreRun,
    VerifyRun,
)
from rahatback_api.databases.models import Database
from rahatback_api.keys.models import CustomerKey, CustomerKeyHolder
from rahatback_api.notifications.models import NotificationChannel
from rahatback_api.outbox.models import OutboxMessage, ProcessedMessage
from rahatback_api.storages.models import Storage

metadata = SQLModel.metadata

__all__ = [
    "Agent",
    "ApiToken",
    "AuditEvent",
    "BackupCopy",
    "BackupJob",
    "BackupKey",
    "BackupRun",
    "CustomerKey",
    "CustomerKeyHolder",
    "Database",
    "EnrollmentToken",
    "LoginThrottle",
    "Membership",
    "NotificationChannel",
    "Organization",
    "OutboxMessage",
    "ProcessedMessage",
    "PruneRun",
    "RestoreRun",
    "Storage",
    "User",
    "VerifyRun",
    "metadata",
]
