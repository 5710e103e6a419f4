"""(no change) the number of a revision that was withdrawn

A revision 0011 stood on main for a few hours on 2026-12-06: it replaced ix_requests_job
(job_id) by ix_requests_job_status (job_id, status), and was then removed, since an index
naming status makes both status updates of every request write index entries (see 0012)
and lets the planner reach a shard's requests through every active request of every job.
This revision keeps its number known, so a store that ran it upgrades instead of stopping
at an unknown revision; 0012 brings such a store back to one index on job_id. On a store
that never ran it, this changes nothing.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing: see the module's text."""


def downgrade() -> None:
    """Nothing: see the module's text."""
