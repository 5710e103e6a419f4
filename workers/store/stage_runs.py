"""Claims, leases and commits of stage runs: exactly-once effects over at-least-once delivery."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, insert, or_, select, update
from sqlalchemy.orm import Session

from schemas.stages import REPAIR, AuditRecord, Hop, ItemRecord, ItemResult
from schemas.status import Stage, StageRunStatus, Status
from workers.store.models import AuditEvent, Request, Shard, StageRun
from workers.store.timeutil import utcnow

RUNNING = StageRunStatus.RUNNING.value
PENDING = StageRunStatus.PENDING.value
DONE = StageRunStatus.DONE.value
ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)


class LeaseLost(RuntimeError):
    """Another delivery took this stage run over; this one must not commit."""


class ClaimState(StrEnum):
    CLAIMED = "claimed"  # this delivery computes
    BUSY = "busy"  # another live delivery holds the lease
    DONE = "done"  # already committed: forward, do not recompute
    EMPTY = "empty"  # no rows: every item ended earlier


@dataclass(frozen=True)
class StageKey:
    hop: Hop
    stage: Stage

    def where(self) -> list[Any]:
        return [StageRun.shard_id == self.hop.shard_id, StageRun.stage == self.stage.value,
                StageRun.run == self.hop.run, StageRun.round == self.hop.round]


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    row_ids: dict[str, int] = field(default_factory=dict)  # request id -> stage run id
    deliveries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseOwner:
    """host:pid:task: a lease held by a process that no longer exists may be taken over."""

    host: str
    pid: int
    task_id: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.task_id}"

    @classmethod
    def parse(cls, raw: str) -> LeaseOwner | None:
        parts = raw.split(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])


def process_is_gone(pid: int) -> bool:
    """True for a pid that does not exist or is a zombie awaiting its parent."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    status = Path(f"/proc/{pid}/status")
    try:
        return any(line.startswith("State:") and "Z" in line.split()[1]
                   for line in status.read_text().splitlines())
    except OSError:
        return False


def claim(session: Session, key: StageKey, owner: LeaseOwner, lease_s: float) -> Claim:
    """Take the shard's rows for this stage under a lease, in one statement. Rows leased by
    a process of this host that no longer exists are taken over without waiting."""
    now = utcnow()
    claimable = (StageRun.status == PENDING) | (
        (StageRun.status == RUNNING) & (StageRun.lease_expires_at < now))
    rows = _take(session, key, owner, lease_s, claimable, now)
    if not rows:
        dead = _dead_owners(session, key, owner.host)
        if dead:
            rows = _take(session, key, owner, lease_s,
                         (StageRun.status == RUNNING) & StageRun.lease_owner.in_(dead), now)
    if rows:
        return Claim(ClaimState.CLAIMED, {r.request_id: r.id for r in rows},
                     {r.request_id: r.deliveries for r in rows})
    statuses = set(session.scalars(select(StageRun.status).where(*key.where())))
    if not statuses:
        return Claim(ClaimState.EMPTY)
    return Claim(ClaimState.BUSY if RUNNING in statuses else ClaimState.DONE)


def _take(session: Session, key: StageKey, owner: LeaseOwner, lease_s: float, claimable: Any,
          now: datetime) -> list[Any]:
    return list(session.execute(
        update(StageRun).where(*key.where(), claimable)
        .values(status=RUNNING, lease_owner=str(owner),
                lease_expires_at=now + timedelta(seconds=lease_s),
                deliveries=StageRun.deliveries + 1, started_at=now)
        .returning(StageRun.id, StageRun.request_id, StageRun.deliveries)
        .execution_options(synchronize_session=False)).all())


def _dead_owners(session: Session, key: StageKey, host: str) -> list[str]:
    owners = session.scalars(select(StageRun.lease_owner).distinct()
                             .where(*key.where(), StageRun.status == RUNNING))
    dead = []
    for raw in owners:
        parsed = LeaseOwner.parse(raw or "")
        if parsed and parsed.host == host and process_is_gone(parsed.pid):
            dead.append(str(raw))
    return dead


def renew_lease(session: Session, row_ids: list[int], owner: LeaseOwner, lease_s: float) -> int:
    result = session.execute(
        update(StageRun).where(StageRun.id.in_(row_ids), StageRun.lease_owner == str(owner),
                               StageRun.status == RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, row_ids: list[int], owner: LeaseOwner) -> None:
    """Give the rows back (before a retry) so the next delivery can claim them at once."""
    session.execute(
        update(StageRun).where(StageRun.id.in_(row_ids), StageRun.lease_owner == str(owner),
                               StageRun.status == RUNNING)
        .values(status=PENDING, lease_owner=None, lease_expires_at=None, created_at=utcnow(),
                redrive_after=None)
        .execution_options(synchronize_session=False))


def load_records(session: Session, request_ids: list[str], key: StageKey) -> list[ItemRecord]:
    """Active requests of the claim with every earlier stage's latest output for this run up
    to this round; a repair round of generation also gets the last round's draft and verdict."""
    requests = session.execute(select(Request.id, Request.tenant_id, Request.grants, Request.kind,
                                      Request.payload)
                               .where(Request.id.in_(request_ids))).all()
    previous: dict[str, dict[str, dict[str, Any]]] = {rid: {} for rid in request_ids}
    earlier = [s.value for s in Stage][: list(Stage).index(key.stage)]
    if earlier:
        for row in session.execute(select(StageRun.request_id, StageRun.stage, StageRun.output)
                                   .where(StageRun.request_id.in_(request_ids),
                                          StageRun.run == key.hop.run,
                                          StageRun.stage.in_(earlier), StageRun.status == DONE,
                                          StageRun.round <= key.hop.round)
                                   .order_by(StageRun.round)):  # a later round overrides
            previous[row.request_id][row.stage] = row.output or {}
    if key.stage == Stage.GENERATION and key.hop.round > 0:
        for row in session.execute(select(StageRun.request_id, StageRun.stage, StageRun.output)
                                   .where(StageRun.request_id.in_(request_ids),
                                          StageRun.run == key.hop.run, StageRun.status == DONE,
                                          StageRun.stage.in_([Stage.GENERATION.value,
                                                              Stage.VALIDATION.value]),
                                          StageRun.round == key.hop.round - 1)):
            previous[row.request_id].setdefault(REPAIR, {})[row.stage] = row.output or {}
    return [ItemRecord(request_id=r.id, tenant=r.tenant_id, grants=r.grants, kind=r.kind,
                       payload=r.payload, previous=previous[r.id], round=key.hop.round)
            for r in requests]


@dataclass(frozen=True)
class RequestState:
    status: Status
    run: int
    pinned_versions: dict[str, Any]
    drift_policy: str
    deadline_at: datetime | None


def request_states(session: Session, request_ids: list[str]) -> dict[str, RequestState]:
    rows = session.execute(
        select(Request.id, Request.status, Request.run, Request.pinned_versions,
               Request.drift_policy, Request.deadline_at)
        .where(Request.id.in_(request_ids))).all()
    return {r.id: RequestState(Status(r.status), r.run, r.pinned_versions, r.drift_policy,
                               r.deadline_at) for r in rows}


@dataclass
class StageCommit:
    """Everything one delivery of a stage writes, in one transaction."""

    key: StageKey
    owner: LeaseOwner
    row_ids: dict[str, int]
    results: list[ItemResult]
    events: list[AuditRecord]
    served_versions: dict[str, Any]
    duration_s: float


@dataclass(frozen=True)
class Committed:
    onward: list[str]  # go on to the next stage in this round
    repair: list[str]  # go back to generation in the next round


def commit(session: Session, work: StageCommit) -> Committed:
    """Finish the claimed rows, end decided requests, append events, open the next stage
    (or, for drafts sent back, generation in the next round).

    A row finishes only while this delivery holds its lease. When any was taken over, this
    raises `LeaseLost` after the finishing UPDATE and before anything else: the caller's
    transaction must then roll back (`session_scope` does), and the rows stay the other
    delivery's to finish.
    """
    covered = [r.request_id for r in work.results]
    if len(covered) != len(set(covered)) or set(covered) != set(work.row_ids):
        raise ValueError(f"{work.key.stage} returned results for {sorted(covered)}, "
                         f"claimed {sorted(work.row_ids)}")
    now = utcnow()
    # Core statements, not the ORM's bulk paths: one executemany each, no per-row bookkeeping.
    connection = session.connection()
    if not connection.dialect.supports_sane_multi_rowcount:  # psycopg 3 and sqlite3 do
        raise RuntimeError(f"{connection.dialect.name}: the lease check needs the rows an "
                           "executemany changed")
    # In row id order, the order the lease heartbeat's UPDATE locks them in: no deadlock.
    rows = sorted((_finished_row(work, r, now) for r in work.results),
                  key=lambda row: row["row_id"])
    finished = connection.execute(
        _FINISH_ROW.where(_RUN_TABLE.c.lease_owner == str(work.owner),
                          _RUN_TABLE.c.status == RUNNING), rows)
    if finished.rowcount != len(work.results):
        raise LeaseLost(f"{work.key.stage} of shard {work.key.hop.shard_id}: lease held on "
                        f"{finished.rowcount} of {len(work.results)} rows")
    _update_requests(session, work, now)
    if work.events:
        connection.execute(insert(AuditEvent.__table__), [
            {"request_id": e.request_id, "stage": work.key.stage.value, "run": work.key.hop.run,
             "round": work.key.hop.round, "kind": e.kind, "payload": e.payload, "created_at": now}
            for e in work.events])
    going = [r for r in work.results if r.outcome is None and not r.untouched]
    onward = [r.request_id for r in going if not r.repair]
    repair = [r.request_id for r in going if r.repair]
    nxt = work.key.stage.next
    opened = [(rid, nxt, work.key.hop.round) for rid in onward if nxt is not None] + [
        (rid, Stage.GENERATION, work.key.hop.round + 1) for rid in repair]
    if opened:
        connection.execute(insert(StageRun.__table__), [
            {"request_id": rid, "shard_id": work.key.hop.shard_id, "stage": stage.value,
             "run": work.key.hop.run, "round": round_, "status": PENDING,
             "deliveries": 0, "created_at": now} for rid, stage, round_ in opened])
    return Committed(onward if nxt is not None else [], repair)


_RUN_TABLE = StageRun.__table__
_FINISH_ROW = update(_RUN_TABLE).where(_RUN_TABLE.c.id == bindparam("row_id"))


def _finished_row(work: StageCommit, result: ItemResult, now: datetime) -> dict[str, Any]:
    outcome = result.outcome
    return {"row_id": work.row_ids[result.request_id], "status": DONE, "finished_at": now,
            "duration_s": work.duration_s, "served_versions": work.served_versions,
            "output": result.output, "lease_expires_at": None,
            "outcome_status": outcome.status.value if outcome else None,
            "error_class": outcome.error_class if outcome else None,
            "error_message": outcome.message if outcome and outcome.error_class else None}


def _update_requests(session: Session, work: StageCommit, now: datetime) -> None:
    """Decided requests get their outcome; queued ones become running. Only a request still
    active in this run is written, so a cancel or a newer run is never overwritten."""
    # Plain comparisons, not IN: an executemany cannot expand a list parameter.
    live = (Request.id == bindparam("rid"), Request.run == work.key.hop.run,
            or_(*(Request.status == status for status in ACTIVE)))
    ended = [_ended_row(work, r, now) for r in work.results if r.outcome and not r.untouched]
    if ended:
        session.connection().execute(update(Request).where(*live), ended)
    onward = [r.request_id for r in work.results
              if r.outcome is None and not r.untouched and not r.repair]
    if onward:
        session.execute(update(Request).where(Request.id.in_(onward),
                                              Request.status == Status.QUEUED.value)
                        .values(status=Status.RUNNING.value)
                        .execution_options(synchronize_session=False))


def _ended_row(work: StageCommit, result: ItemResult, now: datetime) -> dict[str, Any]:
    outcome = result.outcome
    assert outcome is not None
    return {"rid": result.request_id, "status": outcome.status.value, "finished_at": now,
            "error_class": outcome.error_class,
            "error_stage": work.key.stage.value if outcome.error_class else None,
            "error_message": outcome.message or None, "output": result.final_text,
            "citations": result.citations, "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens}


def shard_lane(session: Session, shard_id: str) -> str:
    lane = session.scalar(select(Shard.lane).where(Shard.id == shard_id))
    if lane is None:
        raise LookupError(f"no shard {shard_id}")
    return str(lane)


def next_stage_waiting(session: Session, key: StageKey) -> bool:
    """True when the next stage's rows exist and nobody has claimed them yet."""
    nxt = key.stage.next
    if nxt is None:
        return False
    next_key = StageKey(key.hop, nxt)
    return session.scalar(select(StageRun.id).where(*next_key.where(), StageRun.status == PENDING)
                          .limit(1)) is not None
