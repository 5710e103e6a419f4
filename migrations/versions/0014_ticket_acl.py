"""tickets: an ACL, as documents have

A ticket is read through the governed tools by requests of its tenant; like a document's
chunks it is readable only by a request whose grants hold every label of its ACL. Seeding
takes the labels from the ticket file's folder (`<corpus>/<tenant>/<acl>/inc-*.md`, as
ingest does for documents). Tickets seeded before keep an empty ACL (readable by the whole
tenant, as before) unless their recorded source path names the folder: then it is set from it.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import json
from pathlib import PurePath

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.add_column(sa.Column("acl", sa.JSON(), nullable=False, server_default="[]"))
    connection = op.get_bind()
    rows = connection.execute(sa.text("SELECT tenant_id, id, source FROM tickets")).all()
    for tenant, ticket_id, source in rows:
        labels = acl_of_source(tenant, source)
        if labels:
            connection.execute(sa.text("UPDATE tickets SET acl = :acl WHERE tenant_id = :tenant "
                                       "AND id = :id"),
                               {"acl": json.dumps(labels), "tenant": tenant, "id": ticket_id})


def acl_of_source(tenant: str, source: str | None) -> list[str]:
    """The folder after the tenant's in a seeded ticket's path: `.../acme/engineering/x.md`."""
    parts = PurePath(source or "").parts
    if len(parts) >= 2 and parts[-2] == tenant:
        return []  # filed directly under its tenant: no ACL folder
    for i in range(len(parts) - 3, -1, -1):  # the last such folder: the corpus's own
        if parts[i] == tenant:
            return [parts[i + 1]]
    return []


def downgrade() -> None:
    with op.batch_alter_table("tickets") as batch:
        batch.drop_column("acl")
