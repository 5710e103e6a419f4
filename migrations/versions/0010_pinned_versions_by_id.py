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

BATCH_ROWS = 5000
_REQUESTS = sa.table("requests", sa.column("id", sa.String), sa.column("pinned_versions", sa.JSON),
                     sa.column("pinned_versions_id", sa.String))
_TUPLES = sa.table("version_tuples", sa.column("id", sa.String), sa.column("versions", sa.JSON),
                   sa.column("created_at", sa.DateTime))


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
    known = set(bind.execute(sa.select(_TUPLES.c.id)).scalars())
    last = ""
    while True:
        rows = bind.execute(sa.select(_REQUESTS.c.id, _REQUESTS.c.pinned_versions)
                            .where(_REQUESTS.c.id > last)
                            .order_by(_REQUESTS.c.id).limit(BATCH_ROWS)).all()
        if not rows:
            break
        last = rows[-1].id
        _move_batch(bind, rows, known)
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("pinned_versions_id", existing_type=sa.String(32), nullable=False)
        batch.drop_column("pinned_versions")


def _move_batch(bind: sa.Connection, rows: list[Any], known: set[str]) -> None:
    """Store each new pin of the batch once; point each request at its pin."""
    by_id: dict[str, list[str]] = {}
    for row in rows:
        versions = _json(row.pinned_versions) or {}
        key = _id(versions)
        if key not in known:
            known.add(key)
            bind.execute(sa.insert(_TUPLES).values(id=key, versions=versions,
                                                   created_at=datetime.now(UTC)))
        by_id.setdefault(key, []).append(row.id)
    for key, ids in by_id.items():
        bind.execute(sa.update(_REQUESTS).where(_REQUESTS.c.id.in_(ids))
                     .values(pinned_versions_id=key))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("pinned_versions", sa.JSON(), nullable=True))
    bind = op.get_bind()
    pinned = set(bind.execute(sa.select(_REQUESTS.c.pinned_versions_id).distinct()).scalars())
    for row in bind.execute(sa.select(_TUPLES.c.id, _TUPLES.c.versions)).all():
        if row.id in pinned:  # the others only served stage runs
            bind.execute(sa.update(_REQUESTS).where(_REQUESTS.c.pinned_versions_id == row.id)
                         .values(pinned_versions=_json(row.versions)))
    with op.batch_alter_table("requests") as batch:
        batch.alter_column("pinned_versions", existing_type=sa.JSON(), nullable=False)
        batch.drop_column("pinned_versions_id")
