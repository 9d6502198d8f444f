"""whole-server backup jobs (issue 5)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("all_databases", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("include_databases", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("exclude_databases", sa.JSON(), nullable=True))
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("database_name", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("batch_id", sa.String(length=32), nullable=True))
        batch_op.create_index(batch_op.f("ix_backup_runs_batch_id"), ["batch_id"], unique=False)
        batch_op.drop_index("uq_backup_runs_active_job")

    # existing jobs back up the one database their connection names
    op.execute(
        "UPDATE backup_jobs SET all_databases = false, include_databases = '[]', exclude_databases = '[]'"
    )
    op.execute("UPDATE backup_runs SET database_name = ''")
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.alter_column("all_databases", existing_type=sa.Boolean(), nullable=False)
        batch_op.alter_column("include_databases", existing_type=sa.JSON(), nullable=False)
        batch_op.alter_column("exclude_databases", existing_type=sa.JSON(), nullable=False)
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.alter_column("database_name", existing_type=sa.String(length=128), nullable=False)
        batch_op.create_index(
            "uq_backup_runs_active_job",
            ["job_id", "database_name"],
            unique=True,
            sqlite_where=sa.text(_ACTIVE),
            postgresql_where=sa.text(_ACTIVE),
        )


def downgrade() -> None:
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.drop_index("uq_backup_runs_active_job")
        batch_op.drop_index(batch_op.f("ix_backup_runs_batch_id"))
        batch_op.drop_column("batch_id")
        batch_op.drop_column("database_name")
        batch_op.create_index(
            "uq_backup_runs_active_job",
            ["job_id"],
            unique=True,
            sqlite_where=sa.text(_ACTIVE),
            postgresql_where=sa.text(_ACTIVE),
        )
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("exclude_databases")
        batch_op.drop_column("include_databases")
        batch_op.drop_column("all_databases")
