"""requests: status updates become heap-only tuples; failures are found by failed_at

0008 took status out of the indexes but kept failures in a partial index, `ON
(finished_at) WHERE status = 'failed'`. To Postgres a column named in an index's predicate is
an indexed column like any other: every update that changes status (both of each request's
updates do) or finished_at could not be a heap-only tuple (HOT), so each wrote a new entry
into every index of the table (primary key, idempotency key, job) and left the old ones for
vacuum. This revision:

- adds `failed_at`, set only by an update that ends a request as failed (a stage commit, a
  cancel), backfilled from finished_at (admitted_at where that is missing) for the failed
  requests there are;
- replaces that index with one on failed_at, for the rows that have one: the updates that do
  not fail a request leave it null, so they change no indexed column;
- brings a store that ran the withdrawn 0011 back to one index on job_id;
- leaves half of each new page of requests free (fillfactor 50; existing pages keep what
  they have until rewritten): a new version is written as a heap-only tuple only where it
  fits in the old one's page.

Measured in-process at shard 64 (2048 requests, four stages, /proc CPU of the Postgres
processes): 0 of 4,624 request updates were heap-only before, 4,067 after; 243-247 us of
server CPU per request before, 205-208 after (the shard's request updates 44 -> 28 us, its
reads 49 -> 40 us).

Workers of earlier versions must be stopped before it runs (compose runs migrations before
any worker starts): they would end requests as failed without setting failed_at, and
`sluice failed` would not list those. Running the backfill statement again repairs that.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

FILLFACTOR = 50
HAS_FAILED = sa.text("failed_at IS NOT NULL")
FAILED = sa.text("status = 'failed'")


def upgrade() -> None:
    # A store that ran the withdrawn 0011 (see there) gets 0010's index on job_id back.
    op.execute("DROP INDEX IF EXISTS ix_requests_job_status")
    op.execute("CREATE INDEX IF NOT EXISTS ix_requests_job ON requests (job_id)")
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE requests SET failed_at = coalesce(finished_at, admitted_at) "
               "WHERE status = 'failed' AND failed_at IS NULL")
    op.drop_index("ix_requests_failed", table_name="requests")
    op.create_index("ix_requests_failed_at", "requests", ["failed_at"],
                    postgresql_where=HAS_FAILED, sqlite_where=HAS_FAILED)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE requests SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE requests RESET (fillfactor)")
    op.drop_index("ix_requests_failed_at", table_name="requests")
    op.create_index("ix_requests_failed", "requests", ["finished_at"],
                    postgresql_where=FAILED, sqlite_where=FAILED)
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("failed_at")
