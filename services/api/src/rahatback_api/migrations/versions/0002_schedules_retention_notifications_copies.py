"""schedules retention notifications copies

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 19:09:51.865540
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from rahatback_api.columns import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "notification_channels",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("events", sa.JSON(), nullable=False),
        sa.Column("job_ids", sa.JSON(), nullable=True),
        sa.Column("recipients", sa.JSON(), nullable=False),
        sa.Column("secrets_encrypted", sa.Text(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_notification_channels_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification_channels")),
        sa.UniqueConstraint("org_id", "name", name=op.f("uq_notification_channels_org_id_name")),
    )
    with op.batch_alter_table("notification_channels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_notification_channels_org_id"), ["org_id"], unique=False)

    op.create_table(
        "prune_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("deleted", sa.Integer(), nullable=False),
        sa.Column("requested_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_prune_runs_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prune_runs")),
    )
    with op.batch_alter_table("prune_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_prune_runs_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_prune_runs_org_id"), ["org_id"], unique=False)

    op.create_table(
        "backup_copies",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=True),
        sa.Column("manifest_key", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("prune_id", sa.String(length=32), nullable=True),
        sa.Column("pruned_at", UTCDateTime(), nullable=True),
        sa.Column("prune_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_backup_copies_org_id_organizations")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["backup_runs.id"], name=op.f("fk_backup_copies_run_id_backup_runs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_copies")),
        sa.UniqueConstraint("run_id", "storage_id", name=op.f("uq_backup_copies_run_id_storage_id")),
    )
    with op.batch_alter_table("backup_copies", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_backup_copies_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_copies_org_id"), ["org_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_copies_prune_id"), ["prune_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_copies_run_id"), ["run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_backup_copies_storage_id"), ["storage_id"], unique=False)

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tools", sa.JSON(), nullable=True))

    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("extra_storage_ids", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("schedule_set_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("keep_last", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_days", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_daily", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_weekly", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_monthly", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_yearly", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("last_success_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("overdue_since", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("last_prune_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("last_prune_error", sa.Text(), nullable=True))

    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("extra_storage_ids", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("pruned_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("prune_error", sa.Text(), nullable=True))

    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("headers", sa.JSON(), nullable=True))

    with op.batch_alter_table("restore_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_id", sa.String(length=32), nullable=True))

    op.create_table(
        "verify_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("backup_run_id", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("database_id", sa.String(length=32), nullable=False),
        sa.Column("storage_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=True),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.Column("duration_ms", sa.BigInteger(), nullable=True),
        sa.Column("artifact_sha256_ok", sa.Boolean(), nullable=True),
        sa.Column("dump_sha256_ok", sa.Boolean(), nullable=True),
        sa.Column("tables_compared", sa.Integer(), nullable=False),
        sa.Column("mismatches", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_progress_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["backup_run_id"], ["backup_runs.id"], name=op.f("fk_verify_runs_backup_run_id_backup_runs")
        ),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_verify_runs_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verify_runs")),
    )
    with op.batch_alter_table("verify_runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_verify_runs_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_verify_runs_backup_run_id"), ["backup_run_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_verify_runs_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_verify_runs_org_queued", ["org_id", "queued_at"], unique=False)
        batch_op.create_index(
            "uq_verify_runs_active_backup",
            ["backup_run_id"],
            unique=True,
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )

    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verify_cron", sa.String(length=120), nullable=True))
        batch_op.add_column(sa.Column("verify_level", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("last_verified_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("last_verify_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("last_verify_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("last_verify_ok_at", UTCDateTime(), nullable=True))

    # existing rows: no extra storages or tools yet; the dead-man clock starts at the job's last
    # change; its last success and its backups' copies come from the history
    op.execute("UPDATE agents SET tools = '{}'")
    op.execute(
        "UPDATE backup_jobs SET extra_storage_ids = '[]', schedule_set_at = updated_at,"
        " verify_level = 'integrity'"
    )
    op.execute("UPDATE backup_runs SET extra_storage_ids = '[]'")
    op.execute(
        "UPDATE backup_jobs SET last_success_at = (SELECT max(r.finished_at) FROM backup_runs r"
        " WHERE r.job_id = backup_jobs.id AND r.status = 'completed')"
    )
    op.execute(
        "INSERT INTO backup_copies"
        " (id, org_id, run_id, job_id, storage_id, status, storage_key, manifest_key, finished_at)"
        " SELECT id, org_id, id, job_id, storage_id, 'completed', storage_key, manifest_key, finished_at"
        " FROM backup_runs WHERE status IN ('completed', 'partial') AND storage_key IS NOT NULL"
    )
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.alter_column("tools", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.alter_column("extra_storage_ids", existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column("schedule_set_at", existing_type=UTCDateTime(), nullable=False)
        batch_op.alter_column("verify_level", existing_type=sa.String(length=16), nullable=False)
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.alter_column("extra_storage_ids", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("last_verify_ok_at")
        batch_op.drop_column("last_verify_id")
        batch_op.drop_column("last_verify_status")
        batch_op.drop_column("last_verified_at")
        batch_op.drop_column("verify_level")
        batch_op.drop_column("verify_cron")

    with op.batch_alter_table("verify_runs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_verify_runs_active_backup",
            sqlite_where=sa.text("status IN ('queued', 'running')"),
            postgresql_where=sa.text("status IN ('queued', 'running')"),
        )
        batch_op.drop_index("ix_verify_runs_org_queued")
        batch_op.drop_index(batch_op.f("ix_verify_runs_job_id"))
        batch_op.drop_index(batch_op.f("ix_verify_runs_backup_run_id"))
        batch_op.drop_index(batch_op.f("ix_verify_runs_agent_id"))

    op.drop_table("verify_runs")
    with op.batch_alter_table("restore_runs", schema=None) as batch_op:
        batch_op.drop_column("storage_id")

    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.drop_column("headers")

    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.drop_column("prune_error")
        batch_op.drop_column("pruned_at")
        batch_op.drop_column("extra_storage_ids")

    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("last_prune_error")
        batch_op.drop_column("last_prune_at")
        batch_op.drop_column("overdue_since")
        batch_op.drop_column("last_success_at")
        batch_op.drop_column("keep_yearly")
        batch_op.drop_column("keep_monthly")
        batch_op.drop_column("keep_weekly")
        batch_op.drop_column("keep_daily")
        batch_op.drop_column("keep_days")
        batch_op.drop_column("keep_last")
        batch_op.drop_column("schedule_set_at")
        batch_op.drop_column("extra_storage_ids")

    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_column("tools")

    with op.batch_alter_table("backup_copies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_backup_copies_storage_id"))
        batch_op.drop_index(batch_op.f("ix_backup_copies_run_id"))
        batch_op.drop_index(batch_op.f("ix_backup_copies_prune_id"))
        batch_op.drop_index(batch_op.f("ix_backup_copies_org_id"))
        batch_op.drop_index(batch_op.f("ix_backup_copies_job_id"))

    op.drop_table("backup_copies")
    with op.batch_alter_table("prune_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prune_runs_org_id"))
        batch_op.drop_index(batch_op.f("ix_prune_runs_job_id"))

    op.drop_table("prune_runs")
    with op.batch_alter_table("notification_channels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notification_channels_org_id"))

    op.drop_table("notification_channels")
