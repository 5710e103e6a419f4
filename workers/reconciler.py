"""The store, not the broker, is the source of truth: re-drive shards that stopped moving.

A shard stage whose lease expired (its worker was killed) is put back on its queue at once.
One that has waited unclaimed for longer than `stall_s` (its message was lost, or is still
queued behind a backlog) is re-driven too, backing off: each re-drive doubles the wait
before the next, up to 2**MAX_BACKOFF_DOUBLINGS x `stall_s`, so a long backlog is not
flooded with copies. Duplicate messages are harmless: claims let one delivery compute and
the others forward or stop.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from schemas.stages import Hop
from schemas.status import Lane, ShardStageStatus, Stage
from workers.settings import Settings
from workers.store.admission import Dispatch
from workers.store.engine import session_scope
from workers.store.models import Shard, ShardStage
from workers.store.timeutil import utcnow

log = logging.getLogger("sluice.reconciler")
MAX_BACKOFF_DOUBLINGS = 5


@dataclass(frozen=True)
class Redrive:
    dispatch: Dispatch
    reason: str


def find_and_reset(session: Session, stall_s: float) -> list[Redrive]:
    """Stalled shard stages, reset to pending with a fresh clock, one re-drive each. The
    reset re-checks its condition, so a shard stage a worker claims meanwhile is left alone."""
    now = utcnow()
    expired = (ShardStage.status == ShardStageStatus.RUNNING.value) & (
        ShardStage.lease_expires_at < now)
    first_stall = ShardStage.redrive_after.is_(None) & (
        ShardStage.created_at < now - timedelta(seconds=stall_s))
    stalled = (ShardStage.status == ShardStageStatus.PENDING.value) & (
        first_stall | (ShardStage.redrive_after < now))
    rows = session.execute(
        update(ShardStage).where(expired | stalled)
        .values(status=ShardStageStatus.PENDING.value, lease_owner=None, lease_expires_at=None,
                created_at=now, redrives=ShardStage.redrives + 1)
        .returning(ShardStage.id, ShardStage.shard_id, ShardStage.stage, ShardStage.run,
                   ShardStage.round, ShardStage.redrives)
        .execution_options(synchronize_session=False)).all()
    if not rows:
        return []
    session.connection().execute(
        update(ShardStage).where(ShardStage.id == bindparam("row_id")),
        [{"row_id": r.id, "redrive_after": now + timedelta(seconds=backoff_s(stall_s, r.redrives))}
         for r in rows])
    lanes = dict(session.execute(select(Shard.id, Shard.lane)
                                 .where(Shard.id.in_({r.shard_id for r in rows}))).all())
    return [Redrive(Dispatch(Hop(shard_id=r.shard_id, run=r.run, round=r.round), Stage(r.stage),
                             Lane(lanes[r.shard_id])), "lease expired or stalled")
            for r in sorted(rows, key=lambda r: (r.shard_id, r.stage, r.run, r.round))]


def backoff_s(stall_s: float, redrives: int) -> float:
    """How long after its `redrives`-th re-drive a still-pending shard stage waits for the
    next."""
    return stall_s * 2 ** min(max(redrives, 0), MAX_BACKOFF_DOUBLINGS)


def reconcile_once(settings: Settings) -> list[Redrive]:
    from workers.dispatch import enqueue

    with session_scope(settings.database_url) as session:
        redrives = find_and_reset(session, settings.stall_s)
    sent = []
    for redrive in redrives:
        log.warning("re-driving %s of shard %s (%s)", redrive.dispatch.stage,
                    redrive.dispatch.hop.shard_id, redrive.reason)
        try:
            enqueue(redrive.dispatch, settings)
        except Exception:  # one message the broker refused must not hold back the others
            log.exception("could not re-drive %s of shard %s; a later pass tries again after "
                          "its back-off", redrive.dispatch.stage, redrive.dispatch.hop.shard_id)
            continue
        sent.append(redrive)
    return sent


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `reconcile_interval_s` until stopped."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="sluice-reconciler", daemon=True)
        self.settings = settings
        self.stopped = threading.Event()
        self.redriven = 0

    def run(self) -> None:
        while not self.stopped.wait(self.settings.reconcile_interval_s):
            try:
                self.redriven += len(reconcile_once(self.settings))
            except Exception:
                log.exception("reconcile pass failed; next pass in %ss",
                              self.settings.reconcile_interval_s)

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.join(timeout=10)
