"""documents: the folder they were ingested from and when they were retired; an append-only
log of index activations (for rollback and the record)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("source", sa.String(length=1024), nullable=True))
        batch_op.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_documents_tenant_source", ["tenant_id", "source"], unique=False)
    op.create_table(
        "index_activations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("index_id", sa.String(length=32), nullable=False),
        sa.Column("previous_id", sa.String(length=32), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["index_id"], ["index_versions.id"],
                                name=op.f("fk_index_activations_index_id_index_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_activations")),
    )


def downgrade() -> None:
    op.drop_table("index_activations")
    with op.batch_alter_table("documents", schema=None) as batch_op:
        batch_op.drop_index("ix_documents_tenant_source")
        batch_op.drop_column("updated_at")
        batch_op.drop_column("retired_at")
        batch_op.drop_column("source")
