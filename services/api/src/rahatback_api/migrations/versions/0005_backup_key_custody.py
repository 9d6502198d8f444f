"""customer-held backup keys and rotation (issue 7)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from rahatback_api.columns import UTCDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "customer_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=80), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_customer_keys_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_keys")),
        sa.UniqueConstraint("org_id", "key_id", name=op.f("uq_customer_keys_org_id_key_id")),
    )
    with op.batch_alter_table("customer_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_customer_keys_org_id"), ["org_id"], unique=False)

    op.create_table(
        "customer_key_holders",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("org_id", sa.String(length=32), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=80), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("first_seen_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["organizations.id"], name=op.f("fk_customer_key_holders_org_id_organizations")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customer_key_holders")),
        sa.UniqueConstraint("agent_id", "key_id", name=op.f("uq_customer_key_holders_agent_id_key_id")),
    )
    with op.batch_alter_table("customer_key_holders", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_customer_key_holders_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_customer_key_holders_org_id"), ["org_id"], unique=False)

    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_custody", sa.String(length=16), nullable=True))
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("key_custody", sa.String(length=16), nullable=True))
    # every job and encrypted run so far used a managed key
    op.execute("UPDATE backup_jobs SET key_custody = 'managed'")
    op.execute("UPDATE backup_runs SET key_custody = 'managed' WHERE encrypted = true AND key_id IS NOT NULL")
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.alter_column("key_custody", existing_type=sa.String(length=16), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("backup_runs", schema=None) as batch_op:
        batch_op.drop_column("key_custody")
    with op.batch_alter_table("backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("key_custody")
    with op.batch_alter_table("customer_key_holders", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_customer_key_holders_org_id"))
        batch_op.drop_index(batch_op.f("ix_customer_key_holders_agent_id"))
    op.drop_table("customer_key_holders")
    with op.batch_alter_table("customer_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_customer_keys_org_id"))
    op.drop_table("customer_keys")
