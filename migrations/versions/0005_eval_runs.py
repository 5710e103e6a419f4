"""eval runs: each `sluice eval` with its golden set, version tuple, metrics and gate result

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("golden", sa.String(length=1024), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("cases", sa.Integer(), nullable=False),
        sa.Column("gate", sa.String(length=16), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_eval_runs_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_runs")),
    )
    op.create_index(op.f("ix_eval_runs_created_at"), "eval_runs", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_eval_runs_created_at"), table_name="eval_runs")
    op.drop_table("eval_runs")
