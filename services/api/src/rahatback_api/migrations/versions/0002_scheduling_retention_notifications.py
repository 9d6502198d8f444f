"""scheduling retention notifications

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 18:36:58.669036
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

    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
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
    # existing jobs: the dead-man clock starts at their last change, their last success is in history
    op.execute("UPDATE backup_jobs SET schedule_set_at = updated_at")
    op.execute(
        "UPDATE backup_jobs SET last_success_at = (SELECT max(r.finished_at) FROM backup_runs r"
        " WHERE r.job_id = backup_jobs.id AND r.status = 'completed')"
    )
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.alter_column("schedule_set_at", existing_type=UTCDateTime(), nullable=False)

    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prune_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("pruned_at", UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("prune_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_backup_runs_prune_id"), ["prune_id"], unique=False)

    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("headers", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox_messages", schema=None) as batch_op:
        batch_op.drop_column("headers")

    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_backup_runs_prune_id"))
        batch_op.drop_column("prune_error")
        batch_op.drop_column("pruned_at")
        batch_op.drop_column("prune_id")

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

    with op.batch_alter_table("prune_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prune_runs_org_id"))
        batch_op.drop_index(batch_op.f("ix_prune_runs_job_id"))

    op.drop_table("prune_runs")
    with op.batch_alter_table("notification_channels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notification_channels_org_id"))

    op.drop_table("notification_channels")
