"""stage runs and audit events: no foreign keys on the append-only rows

Every stage commit appends a stage run per item and audit events per item; with a foreign
key each row also ran a referential check (a keyed lookup that locks the referenced request
or shard row) inside the server. Those checks were a fifth of the store's CPU per item on
the orchestration benchmark's Postgres (ops/bench_orchestration.py), and they guard nothing
the writer does not already hold: the only writer, the stage commit (workers.store.
stage_runs.commit), writes rows for the requests of the shard stage it holds under lease,
which it has just loaded, in the same transaction that finishes that shard stage; admission
writes its events with the requests they describe; and no code deletes a request or a
shard. The columns and indexes stay; only the constraints go.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# (table, constraint, column, referred table)
FOREIGN_KEYS = (
    ("stage_runs", "fk_stage_runs_request_id_requests", "request_id", "requests"),
    ("stage_runs", "fk_stage_runs_shard_id_shards", "shard_id", "shards"),
    ("audit_events", "fk_audit_events_request_id_requests", "request_id", "requests"),
)


def upgrade() -> None:
    for table in ("stage_runs", "audit_events"):
        with op.batch_alter_table(table) as batch:
            for _, name, _, _ in (k for k in FOREIGN_KEYS if k[0] == table):
                batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    for table in ("stage_runs", "audit_events"):
        with op.batch_alter_table(table) as batch:
            for _, name, column, referred in (k for k in FOREIGN_KEYS if k[0] == table):
                batch.create_foreign_key(name, referred, [column], ["id"])
