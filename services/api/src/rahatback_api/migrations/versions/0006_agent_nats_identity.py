"""agent NATS identity: nkeys, JWTs, revocation (issue 7)

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26 21:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from rahatback_api.columns import UTCDateTime

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nats_public_key", sa.String(length=56), nullable=True))
        batch_op.add_column(sa.Column("nats_jwt_expires_at", UTCDateTime(), nullable=True))
        # revocations are keyed by the public key: one key must never stand for two agents
        batch_op.create_index(batch_op.f("ix_agents_nats_public_key"), ["nats_public_key"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("agents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agents_nats_public_key"))
        batch_op.drop_column("nats_jwt_expires_at")
        batch_op.drop_column("nats_public_key")
