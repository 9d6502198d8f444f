"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-26 16:09:24.618624
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from rahatback_api.columns import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_table(
        "outbox_messages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("msg_id", sa.String(length=255), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("published_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox_messages")),
        sa.UniqueConstraint("msg_id", name=op.f("uq_outbox_messages_msg_id")),
    )
    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_outbox_messages_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_outbox_messages_published_at"), ["published_at"], unique=False)

    op.create_table(
        "processed_messages",
        sa.Column("msg_id", sa.String(length=255), nullable=False),
        sa.Column("processed_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("msg_id", name=op.f("pk_processed_messages")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("x25519_public_key", sa.String(length=128), nullable=False),
        sa.Column("engines", sa.JSON(), nullable=False),
        sa.Column("storages", sa.JSON(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=True),
        sa.Column("enrolled_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_agents_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agents_org_id"), ["org_id"], unique=False)

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("last_used_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_api_tokens_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_api_tokens_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_tokens_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_api_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "backup_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("database_id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=True),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("dump_size", sa.BigInteger(), nullable=True),
        sa.Column("artifact_size", sa.BigInteger(), nullable=True),
        sa.Column("dump_sha256", sa.String(length=64), nullable=True),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("storage_key", sa.Text(), nullable=True),
        sa.Column("manifest_key", sa.Text(), nullable=True),
        sa.Column("compression", sa.String(length=8), nullable=True),
        sa.Column("encrypted", sa.Boolean(), nullable=False),
        sa.Column("key_id", sa.String(length=80), nullable=True),
        sa.Column("server_version", sa.String(length=255), nullable=True),
        sa.Column("dump_format", sa.String(length=32), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("stage", sa.String(length=32), nullable=True),
        sa.Column("bytes_done", sa.BigInteger(), nullable=True),
        sa.Column("last_progress_at", UTCDateTime(), nullable=True),
        sa.Column("last_restore_status", sa.String(length=16), nullable=True),
        sa.Column("last_restore_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_backup_runs_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_runs")),
    )
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backup_runs_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(
            "ix_backup_runs_org_database_queued", ["org_id", "database_id", "queued_at"], unique=False
        )
        batch_op.create_index(
            "ix_backup_runs_org_job_queued", ["org_id", "job_id", "queued_at"], unique=False
        )
        batch_op.create_index("ix_backup_runs_org_queued", ["org_id", "queued_at"], unique=False)
        batch_op.create_index(
            "ix_backup_runs_org_status_queued", ["org_id", "status", "queued_at"], unique=False
        )
        batch_op.create_index("ix_backup_runs_status_progress", ["status", "last_progress_at"], unique=False)
        batch_op.create_index(
            "uq_backup_runs_active_job",
            ["job_id"],
            unique=True,
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )

    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("created_by_user_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["created_by_user_id"], ["users.id"], name=op.f("fk_enrollment_tokens_created_by_user_id_users")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_enrollment_tokens_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrollment_tokens_token_hash")),
    )
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_tokens_org_id"), ["org_id"], unique=False)

    op.create_table(
        "memberships",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_memberships_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], name=op.f("fk_memberships_user_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_memberships")),
        sa.UniqueConstraint("org_id", "user_id", name=op.f("uq_memberships_org_id_user_id")),
    )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_memberships_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_memberships_user_id"), ["user_id"], unique=False)

    op.create_table(
        "databases",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("engine", sa.String(length=32), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("secrets_encrypted", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_databases_agent_id_agents")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_databases_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_databases")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_databases_org_id_name")),
    )
    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_databases_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_databases_org_id"), ["org_id"], unique=False)

    op.create_table(
        "restore_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("backup_run_id", sa.String(length=32), nullable=False),
        sa.Column("database_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("bytes_restored", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_progress_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["backup_run_id"], ["backup_runs.id"], name=op.f("fk_restore_runs_backup_run_id_backup_runs")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_restore_runs_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_restore_runs")),
    )
    with op.batch_alter_table("restore_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_restore_runs_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_restore_runs_backup_run_id"), ["backup_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_restore_runs_database_id"), ["database_id"], unique=False)
        batch_op.create_index("ix_restore_runs_org_queued", ["org_id", "queued_at"], unique=False)
        batch_op.create_index(
            "uq_restore_runs_active_database",
            ["database_id"],
            unique=True,
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )

    op.create_table(
        "storages",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("secrets_encrypted", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["agent_id"], ["agents.id"], name=op.f("fk_storages_agent_id_agents")),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_storages_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storages")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_storages_org_id_name")),
    )
    with op.batch_alter_table("storages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_storages_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_storages_org_id"), ["org_id"], unique=False)

    op.create_table(
        "backup_jobs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("database_id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("compression", sa.String(length=8), nullable=False),
        sa.Column("compression_level", sa.Integer(), nullable=True),
        sa.Column("encryption_enabled", sa.Boolean(), nullable=False),
        sa.Column("key_id", sa.String(length=80), nullable=False),
        sa.Column("cron", sa.String(length=120), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("last_run_at", UTCDateTime(), nullable=True),
        sa.Column("last_run_status", sa.String(length=16), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["database_id"], ["databases.id"], name=op.f("fk_backup_jobs_database_id_databases")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_backup_jobs_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["storage_id"], ["storages.id"], name=op.f("fk_backup_jobs_storage_id_storages")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_jobs")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_backup_jobs_org_id_name")),
    )
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backup_jobs_database_id"), ["database_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_jobs_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_jobs_storage_id"), ["storage_id"], unique=False)
    op.create_table(
        "backup_keys",
        sa.Column("id", sa.String(length=80), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("key_encrypted", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_backup_keys_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_keys")),
    )
    with op.batch_alter_table("backup_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backup_keys_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_keys_org_id"), ["org_id"], unique=False)


def downgrade() -> None:
    op.drop_table("backup_keys")
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_backup_jobs_storage_id"))
        batch_op.drop_index(batch_op.f("ix_backup_jobs_org_id"))
        batch_op.drop_index(batch_op.f("ix_backup_jobs_database_id"))

    op.drop_table("backup_jobs")
    with op.batch_alter_table("storages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_storages_org_id"))
        batch_op.drop_index(batch_op.f("ix_storages_agent_id"))

    op.drop_table("storages")
    with op.batch_alter_table("restore_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_restore_runs_org_queued")
        batch_op.drop_index(batch_op.f("ix_restore_runs_database_id"))
        batch_op.drop_index(batch_op.f("ix_restore_runs_backup_run_id"))
        batch_op.drop_index(batch_op.f("ix_restore_runs_agent_id"))

    op.drop_table("restore_runs")
    with op.batch_alter_table("databases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_databases_org_id"))
        batch_op.drop_index(batch_op.f("ix_databases_agent_id"))

    op.drop_table("databases")
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_memberships_user_id"))
        batch_op.drop_index(batch_op.f("ix_memberships_org_id"))

    op.drop_table("memberships")
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_tokens_org_id"))

    op.drop_table("enrollment_tokens")
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_backup_runs_status_progress")
        batch_op.drop_index("ix_backup_runs_org_status_queued")
        batch_op.drop_index("ix_backup_runs_org_queued")
        batch_op.drop_index("ix_backup_runs_org_job_queued")
        batch_op.drop_index("ix_backup_runs_org_database_queued")
        batch_op.drop_index(batch_op.f("ix_backup_runs_agent_id"))

    op.drop_table("backup_runs")
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_tokens_user_id"))
        batch_op.drop_index(batch_op.f("ix_api_tokens_org_id"))

    op.drop_table("api_tokens")
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agents_org_id"))

    op.drop_table("agents")
    op.drop_table("users")
    op.drop_table("processed_messages")
    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_outbox_messages_published_at"))
        batch_op.drop_index(batch_op.f("ix_outbox_messages_created_at"))

    op.drop_table("outbox_messages")
    op.drop_table("organizations")
