"""stage runs: how often the reconciler re-drove a row, and not before when again

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stage_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("redrives", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("redrive_after", sa.DateTime(timezone=True),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stage_runs", schema=None) as batch_op:
        batch_op.drop_column("redrive_after")
        batch_op.drop_column("redrives")
