"""requests: the pinned version tuple by id, stored once in version_tuples

Every request carried the JSON of the version tuple pinned at admission (about 560 bytes),
the same for every request of a job: half the row, copied again by each of the request's
status updates and read again by every stage. A request now names its tuple
(`pinned_versions_id`), stored once in `version_tuples` (0009), keyed by a hash of its
content. No foreign key, as for stage runs (0009): admission stores the tuple in the same
transaction, and tuples are never deleted.

Upgrade moves the existing pins over, a batch of rows at a time; downgrade puts the JSON
back on each row. Admission events written before this keep the tuple in full; later ones
name it by id.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
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
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("pinned_versions_id", sa.String(32), nullable=True))
    bind = op.get_bind()
    requests = sa.table("requests", sa.column("id", sa.String),
                        sa.column("pinned_versions", sa.JSON),
                        sa.column("pinned_versions_id", sa.String))
    tuples = sa.table("version_tuples", sa.column("id", sa.String),
                      sa.column("versions", sa.JSON), sa.column("created_at", sa.DateTime))
    known = set(bind.execute(sa.select(tuples.c.id)).scalars())
    last = ""
    while True:
        rows = bind.execute(sa.select(requests.c.id, requests.c.pinned_versions)
                            .where(requests.c.id > last)
                            .order_by(requests.c.id).limit(BATCH)).all()
        if not rows:
            break
        last = rows[-1].id
        by_id: dict[str, list[str]] = {}
        for row in rows:
            versions = _json(row.pinned_versions) or {}
            key = _id(versions)
            if key not in known:
                known.add(key)
                bind.execute(sa.insert(tuples).values(id=key, versions=versions,
                                                      created_at=datetime.now(UTC)))
            by_id.setdefault(key, []).append(row.id)
        for key, ids in by_id.items():
            bind.execute(sa.update(requests).where(requests.c.id.in_(ids))
                         .values(pinned_versions_id=key))
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("pinned_versions_id", existing_type=sa.String(32), nullable=False)
        batch.drop_column("pinned_versions")


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("pinned_versions", sa.JSON(), nullable=True))
    bind = op.get_bind()
    requests = sa.table("requests", sa.column("pinned_versions", sa.JSON),
                        sa.column("pinned_versions_id", sa.String))
    tuples = sa.table("version_tuples", sa.column("id", sa.String),
                      sa.column("versions", sa.JSON))
    for row in bind.execute(sa.select(tuples.c.id, tuples.c.versions)).all():
        bind.execute(sa.update(requests).where(requests.c.pinned_versions_id == row.id)
                     .values(pinned_versions=_json(row.versions)))
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("pinned_versions", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("pinned_versions_id")
