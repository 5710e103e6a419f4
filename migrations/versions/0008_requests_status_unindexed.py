"""requests: status out of the indexes the stage commits rewrite; failures keep a partial index

A request's status changes twice on its way through the stages (queued -> running at the
first stage commit, running -> terminal at the last), and every index holding `status` gets
a new entry each time: two indexes did (`ix_requests_status`, `ix_requests_job_status`).
Updating a shard's requests cost about twice the server CPU it does without them (measured
with /proc CPU of the backend over 16k rows). What reads by status now uses:
- a job's requests (counts, unfinished, resume): `ix_requests_job` on job_id, then the rows;
- failures across jobs, newest first (`sluice failed`): a partial index on finished_at
  of the failed requests only, which a request enters once, when it fails.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

FAILED = sa.text("status = 'failed'")


def upgrade() -> None:
    op.drop_index("ix_requests_status", table_name="requests")
    op.drop_index("ix_requests_job_status", table_name="requests")
    op.create_index("ix_requests_job", "requests", ["job_id"])
    op.create_index("ix_requests_failed", "requests", ["finished_at"],
                    postgresql_where=FAILED, sqlite_where=FAILED)


def downgrade() -> None:
    op.drop_index("ix_requests_failed", table_name="requests")
    op.drop_index("ix_requests_job", table_name="requests")
    op.create_index("ix_requests_job_status", "requests", ["job_id", "status"])
    op.create_index("ix_requests_status", "requests", ["status"])
