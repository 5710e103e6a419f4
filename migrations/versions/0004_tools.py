"""governed tools: the ticket system of record, its notes, and the tool-call log that makes a
side-effect call run once

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tickets",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("title", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("service", sa.String(length=256), nullable=True),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.String(length=1024), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name=op.f("fk_tickets_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "id", name=op.f("pk_tickets")),
    )
    op.create_index("ix_tickets_tenant_status", "tickets", ["tenant_id", "status"], unique=False)
    op.create_table(
        "tool_calls",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("tool", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("args", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("side_effects", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error_class", sa.String(length=128), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("result_hash", sa.String(length=64), nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("executions", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("executed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tool_calls")),
        sa.UniqueConstraint("tenant_id", "idempotency_key", name="uq_tool_calls_tenant_idempotency"),
    )
    op.create_index("ix_tool_calls_tenant_tool", "tool_calls", ["tenant_id", "tool"], unique=False)
    op.create_table(
        "ticket_notes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True,
                  nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("ticket_id", sa.String(length=32), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("tool_call_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id", "ticket_id"], ["tickets.tenant_id", "tickets.id"],
                                name=op.f("fk_ticket_notes_tenant_id_tickets")),
        sa.ForeignKeyConstraint(["tool_call_id"], ["tool_calls.id"],
                                name=op.f("fk_ticket_notes_tool_call_id_tool_calls")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ticket_notes")),
        sa.UniqueConstraint("tool_call_id", name=op.f("uq_ticket_notes_tool_call_id")),
    )
    op.create_index("ix_ticket_notes_ticket", "ticket_notes", ["tenant_id", "ticket_id"],
                    unique=False)


def downgrade() -> None:
    op.drop_index("ix_ticket_notes_ticket", table_name="ticket_notes")
    op.drop_table("ticket_notes")
    op.drop_index("ix_tool_calls_tenant_tool", table_name="tool_calls")
    op.drop_table("tool_calls")
    op.drop_index("ix_tickets_tenant_status", table_name="tickets")
    op.drop_table("tickets")
