"""shard stages: one lease per shard and stage; stage runs written once, when done

Before, every item of a shard had a pending stage-run row per stage, claimed and finished
one by one: three writes per item and stage. Now the unit a message delivers, one stage of
one shard for one (run, round), is one `shard_stages` row that holds the lease and the
items' ids, and a stage run is written once, when its stage commits. Live (pending or
running) stage-run rows move into `shard_stages` as pending rows, which the reconciler
re-drives.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KEY = ("shard_id", "stage", "run", "round")


def upgrade() -> None:
    op.create_table(
        "shard_stages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  autoincrement=True, nullable=False),
        sa.Column("shard_id", sa.String(length=48), nullable=False),
        sa.Column("stage", sa.String(length=32), nullable=False),
        sa.Column("run", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("request_ids", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("redrives", sa.Integer(), nullable=False),
        sa.Column("redrive_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=256), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["shard_id"], ["shards.id"],
                                name=op.f("fk_shard_stages_shard_id_shards")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shard_stages")),
        sa.UniqueConstraint(*KEY, name="uq_shard_stages_key"),
    )
    op.create_index("ix_shard_stages_status_lease", "shard_stages",
                    ["status", "lease_expires_at"], unique=False)
    _move_live_stage_runs()
    with op.batch_alter_table("stage_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_stage_runs_status_lease")
        batch_op.drop_index("ix_stage_runs_shard")
        batch_op.drop_column("redrive_after")
        batch_op.drop_column("redrives")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("lease_owner")


def _move_live_stage_runs() -> None:
    """Pending or running stage runs become pending shard stages (the reconciler re-drives
    them); a running one's lease is dropped, so its worker's commit will find it lost. All
    rows of one (shard, stage, run, round) shared a claim before, so a key is never split
    between done and live rows; the unique key would refuse the next stage if it were."""
    bind = op.get_bind()
    runs = sa.table("stage_runs", *(sa.column(c) for c in (
        "id", "request_id", "status", "deliveries", *KEY)))
    live = bind.execute(sa.select(runs).where(runs.c.status != "done")
                        .order_by(runs.c.id)).all()
    if not live:
        return
    grouped: dict[tuple[str, str, int, int], list[sa.Row]] = defaultdict(list)
    for row in live:
        grouped[(row.shard_id, row.stage, row.run, row.round)].append(row)
    now = datetime.now(UTC)
    stages = sa.table("shard_stages", *(sa.column(c) for c in (
        *KEY, "status", "deliveries", "redrives")), sa.column("request_ids", sa.JSON()),
        sa.column("created_at", sa.DateTime(timezone=True)))
    bind.execute(sa.insert(stages), [
        {"shard_id": shard, "stage": stage, "run": run, "round": round_,
         "request_ids": [r.request_id for r in rows], "status": "pending",
         "deliveries": max(r.deliveries for r in rows), "redrives": 0, "created_at": now}
        for (shard, stage, run, round_), rows in grouped.items()])
    bind.execute(sa.delete(runs).where(runs.c.status != "done"))


def downgrade() -> None:
    """Back to a pending stage-run row per item of each live shard stage; each row takes
    its shard stage's delivery count, the per-item counts having never existed."""
    with op.batch_alter_table("stage_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.add_column(sa.Column("redrives", sa.Integer(), nullable=False,
                                      server_default="0"))
        batch_op.add_column(sa.Column("redrive_after", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index("ix_stage_runs_shard", list(KEY), unique=False)
        batch_op.create_index("ix_stage_runs_status_lease", ["status", "lease_expires_at"],
                              unique=False)
    bind = op.get_bind()
    stages = sa.table("shard_stages", *(sa.column(c) for c in (*KEY, "status", "deliveries")),
                      sa.column("request_ids", sa.JSON()))
    live = bind.execute(sa.select(stages).where(stages.c.status != "done")).all()
    if live:
        now = datetime.now(UTC)
        runs = sa.table("stage_runs", *(sa.column(c) for c in (
            "request_id", "status", "deliveries", *KEY)),
            sa.column("created_at", sa.DateTime(timezone=True)))
        bind.execute(sa.insert(runs), [
            {"request_id": rid, "shard_id": s.shard_id, "stage": s.stage, "run": s.run,
             "round": s.round, "status": "pending", "deliveries": s.deliveries,
             "created_at": now} for s in live for rid in s.request_ids])
    op.drop_index("ix_shard_stages_status_lease", table_name="shard_stages")
    op.drop_table("shard_stages")
