"""stage runs: the served version tuple by id, each tuple stored once in version_tuples

Every stage run carried the JSON of the version tuple that served it (about 560 bytes),
the same for every item of a shard stage: a third of the row, and enough to push a
retrieval stage run past Postgres' 2 kB inline limit, so each was compressed on insert. The
tuple is now stored once in `version_tuples`, keyed by a hash of its canonical JSON, and a
stage run names it (`served_versions_id`). No foreign key, as for the other append-only
rows (0007): the stage commit stores the tuple in the same transaction.

Upgrade moves the existing tuples over, a batch of rows at a time; downgrade puts the JSON
back on each row.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BATCH = 5000


def _id(versions: dict[str, Any]) -> str:
    # The application's id (workers.store.tuples.versions_id) for JSON of string values;
    # should they ever differ, a tuple is merely stored twice under two ids.
    canonical = json.dumps(versions, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "vt-" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    op.create_table(
        "version_tuples",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("versions", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_version_tuples"))
    with op.batch_alter_table("stage_runs") as batch:
        batch.add_column(sa.Column("served_versions_id", sa.String(32), nullable=True))
    bind = op.get_bind()
    runs = sa.table("stage_runs", sa.column("id", sa.BigInteger),
                    sa.column("served_versions", sa.JSON),
                    sa.column("served_versions_id", sa.String))
    tuples = sa.table("version_tuples", sa.column("id", sa.String),
                      sa.column("versions", sa.JSON), sa.column("created_at", sa.DateTime))
    known: set[str] = set()
    last = 0
    while True:
        rows = bind.execute(sa.select(runs.c.id, runs.c.served_versions)
                            .where(runs.c.id > last, runs.c.served_versions.is_not(None))
                            .order_by(runs.c.id).limit(BATCH)).all()
        if not rows:
            break
        last = rows[-1].id
        by_id: dict[str, list[int]] = {}
        for row in rows:
            versions = _json(row.served_versions)
            if not versions:
                continue
            key = _id(versions)
            if key not in known:
                known.add(key)
                bind.execute(sa.insert(tuples).values(id=key, versions=versions,
                                                      created_at=datetime.now(UTC)))
            by_id.setdefault(key, []).append(row.id)
        for key, ids in by_id.items():
            bind.execute(sa.update(runs).where(runs.c.id.in_(ids))
                         .values(served_versions_id=key))
    with op.batch_alter_table("stage_runs") as batch:
        batch.drop_column("served_versions")


def downgrade() -> None:
    with op.batch_alter_table("stage_runs") as batch:
        batch.add_column(sa.Column("served_versions", sa.JSON(), nullable=True))
    bind = op.get_bind()
    runs = sa.table("stage_runs", sa.column("served_versions", sa.JSON),
                    sa.column("served_versions_id", sa.String))
    tuples = sa.table("version_tuples", sa.column("id", sa.String),
                      sa.column("versions", sa.JSON))
    for row in bind.execute(sa.select(tuples.c.id, tuples.c.versions)).all():
        bind.execute(sa.update(runs).where(runs.c.served_versions_id == row.id)
                     .values(served_versions=_json(row.versions)))
    with op.batch_alter_table("stage_runs") as batch:
        batch.drop_column("served_versions_id")
    op.drop_table("version_tuples")
