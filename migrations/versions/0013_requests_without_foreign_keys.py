"""requests: no foreign keys to jobs and tenants

Admission inserts a request per line, and each row ran two referential checks inside the
server (a keyed lookup of the job, one of the tenant, each locking the referenced row). Those
checks cost 25-30 us of Postgres CPU per admitted request (measured on admissions of 2,048
lines, /proc CPU of the Postgres processes: 24-34 us per request without them, 54-64 with),
about 3% of the orchestration benchmark's CPU per item, and they guard nothing the writer does
not already hold: the only writer (workers.store.admission._persist) inserts the requests of a
job whose row it has just read and locked in the same transaction (admit_lines), or of no job
(admit_one), and upserts their tenants in that transaction first (ensure_tenants); and no code
deletes a job or a tenant. The columns and the index on job_id stay; only the constraints go,
as 0007 did for the append-only rows.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# (constraint, column, referred table)
FOREIGN_KEYS = (
    ("fk_requests_job_id_jobs", "job_id", "jobs"),
    ("fk_requests_tenant_id_tenants", "tenant_id", "tenants"),
)


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for name, _, _ in FOREIGN_KEYS:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for name, column, referred in FOREIGN_KEYS:
            batch.create_foreign_key(name, referred, [column], ["id"])
