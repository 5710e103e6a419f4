"""Claims, leases and commits of shard stages: exactly-once effects over at-least-once delivery.

A message delivers one stage of one shard for one (run, round): its `ShardStage` row. A
delivery claims it under a lease, computes, then commits the shard stage done, one
`StageRun` per item, request outcomes, audit events and the next shard stage, in one
transaction, and only while it still holds the lease.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, or_, select, update
from sqlalchemy.orm import Session

from schemas.events import EventKind
from schemas.stages import REPAIR, AuditRecord, Hop, ItemRecord, ItemResult, Outcome
from schemas.status import ShardStageStatus, Stage, Status
from workers.store.among import any_of
from workers.store.bulk import insert_rows, update_rows
from workers.store.models import AuditEvent, Request, Shard, ShardStage, StageRun
from workers.store.progress import NAMED_AT_MOST, Ended, announce_ended
from workers.store.timeutil import utcnow
from workers.store.tuples import store_versions, versions_by_id

RUNNING = ShardStageStatus.RUNNING.value
PENDING = ShardStageStatus.PENDING.value
DONE = ShardStageStatus.DONE.value
ACTIVE = (Status.QUEUED.value, Status.RUNNING.value)


class LeaseLost(RuntimeError):
    """Another delivery took this shard stage over; this one must not commit."""


class ClaimState(StrEnum):
    CLAIMED = "claimed"  # this delivery computes
    BUSY = "busy"  # another live delivery holds the lease
    DONE = "done"  # already committed: forward, do not recompute
    EMPTY = "empty"  # no such shard stage: every item ended earlier


@dataclass(frozen=True)
class StageKey:
    hop: Hop
    stage: Stage

    def where(self) -> list[Any]:
        return [ShardStage.shard_id == self.hop.shard_id, ShardStage.stage == self.stage.value,
                ShardStage.run == self.hop.run, ShardStage.round == self.hop.round]


@dataclass(frozen=True)
class Lease:
    """A claimed shard stage: what this delivery computes and must commit."""

    id: int  # the shard stage's
    request_ids: list[str]
    deliveries: int  # of the shard stage, this one included
    claimed_at: datetime


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    lease: Lease | None = None  # set when CLAIMED


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
    """Take the shard stage under a lease, in one statement. A lease held by a process of
    this host that no longer exists is taken over without waiting for it to expire."""
    now = utcnow()
    claimable = (ShardStage.status == PENDING) | (
        (ShardStage.status == RUNNING) & (ShardStage.lease_expires_at < now))
    taken = _take(session, key, owner, lease_s, claimable, now)
    if taken is None:
        found = session.execute(select(ShardStage.status, ShardStage.lease_owner)
                                .where(*key.where())).first()
        if found is None:
            return Claim(ClaimState.EMPTY)
        if found.status == DONE:
            return Claim(ClaimState.DONE)
        taken = _take_from_dead_owner(session, key, owner, lease_s, found, now)
        if taken is None:
            return Claim(ClaimState.BUSY)
    return Claim(ClaimState.CLAIMED,
                 Lease(taken.id, list(taken.request_ids), taken.deliveries, now))


def _take_from_dead_owner(session: Session, key: StageKey, owner: LeaseOwner, lease_s: float,
                          found: Any, now: datetime) -> Any:
    """The shard stage, if its lease holder is a process of this host that is gone. The
    UPDATE re-checks the holder, so two deliveries cannot both take it over."""
    holder = LeaseOwner.parse(found.lease_owner or "")
    if found.status != RUNNING or holder is None or holder.host != owner.host \
            or not process_is_gone(holder.pid):
        return None
    return _take(session, key, owner, lease_s,
                 (ShardStage.status == RUNNING) & (ShardStage.lease_owner == found.lease_owner),
                 now)


def _take(session: Session, key: StageKey, owner: LeaseOwner, lease_s: float, claimable: Any,
          now: datetime) -> Any:
    return session.execute(
        update(ShardStage).where(*key.where(), claimable)
        .values(status=RUNNING, lease_owner=str(owner),
                lease_expires_at=now + timedelta(seconds=lease_s),
                deliveries=ShardStage.deliveries + 1, started_at=now)
        .returning(ShardStage.id, ShardStage.request_ids, ShardStage.deliveries)
        .execution_options(synchronize_session=False)).first()


def renew_lease(session: Session, lease_id: int, owner: LeaseOwner, lease_s: float) -> bool:
    result = session.execute(
        update(ShardStage).where(*_held(lease_id, owner))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def release(session: Session, lease_id: int, owner: LeaseOwner) -> None:
    """Give the shard stage back (before a retry) so the next delivery can claim it at once."""
    session.execute(
        update(ShardStage).where(*_held(lease_id, owner))
        .values(status=PENDING, lease_owner=None, lease_expires_at=None, created_at=utcnow(),
                redrive_after=None)
        .execution_options(synchronize_session=False))


def _held(lease_id: int, owner: LeaseOwner) -> list[Any]:
    return [ShardStage.id == lease_id, ShardStage.lease_owner == str(owner),
            ShardStage.status == RUNNING]


@dataclass(frozen=True)
class RequestState:
    job_id: str | None
    status: Status
    run: int
    pinned_versions_id: str
    pinned_versions: dict[str, Any]  # shared between requests (and shards): read-only
    drift_policy: str
    deadline_at: datetime | None


def load_shard(session: Session, request_ids: list[str],
               key: StageKey) -> tuple[dict[str, RequestState], list[ItemRecord]]:
    """The claimed requests' states (status, run, pin, deadline: what decides whether the
    stage runs for each) and records, in one read of their rows; each record carries every
    earlier stage's latest output for this run up to this round, and a repair round of
    generation also the last round's draft and verdict."""
    # Core statements on the tables: these reads return plain rows, and the ORM's per-row
    # loading machinery would cost more than the rows' decoding.
    connection = session.connection()
    c = Request.__table__.c
    rows = connection.execute(
        select(c.id, c.job_id, c.tenant_id, c.grants, c.kind, c.payload, c.status, c.run,
               c.pinned_versions_id, c.drift_policy, c.deadline_at)
        .where(any_of(c.id, request_ids))).all()
    previous = _previous_outputs(connection, request_ids, key)
    pinned = {row.pinned_versions_id for row in rows}
    pins = versions_by_id(connection, pinned)
    unknown = sorted(pinned - pins.keys())
    if unknown:
        raise LookupError(f"the store holds no version tuple {unknown}, which requests of "
                          f"shard {key.hop.shard_id} pin")
    states: dict[str, RequestState] = {}
    records: list[ItemRecord] = []
    # Unpacked: a row's attributes are looked up by name on every access. The record is
    # validated (pydantic's compiled validator builds it faster than model_construct does).
    for rid, job_id, tenant, grants, kind, payload, status, run, pin, policy, deadline in rows:
        states[rid] = RequestState(job_id, Status(status), run, pin, pins[pin], policy, deadline)
        records.append(ItemRecord(request_id=rid, tenant=tenant, grants=grants, kind=kind,
                                  payload=payload, previous=previous[rid],
                                  round=key.hop.round))
    return states, records


def _previous_outputs(connection: Connection, request_ids: list[str],
                      key: StageKey) -> dict[str, dict[str, dict[str, Any]]]:
    previous: dict[str, dict[str, dict[str, Any]]] = {rid: {} for rid in request_ids}
    earlier = [s.value for s in Stage][: list(Stage).index(key.stage)]
    c = StageRun.__table__.c
    if earlier:
        for rid, stage, output in _outputs(connection, request_ids, key.hop.run, earlier,
                                           c.round <= key.hop.round):
            previous[rid][stage] = output  # ordered by round: a later round overrides
    if key.stage == Stage.GENERATION and key.hop.round > 0:
        for rid, stage, output in _outputs(connection, request_ids, key.hop.run,
                                           [Stage.GENERATION.value, Stage.VALIDATION.value],
                                           c.round == key.hop.round - 1):
            previous[rid].setdefault(REPAIR, {})[stage] = output
    return previous


def _outputs(connection: Connection, request_ids: list[str], run: int, stages: list[str],
             rounds: Any) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(request, stage, output) of the requests' stage runs of `run` in `stages` and `rounds`,
    by round; unpacked from the rows, whose names would cost a lookup each."""
    c = StageRun.__table__.c
    for rid, stage, output in connection.execute(
            select(c.request_id, c.stage, c.output)
            .where(any_of(c.request_id, request_ids), c.run == run, c.stage.in_(stages), rounds)
            .order_by(c.round)):
        yield rid, stage, output or {}


@dataclass
class StageCommit:
    """Everything one delivery of a stage writes, in one transaction."""

    key: StageKey
    owner: LeaseOwner
    lease: Lease
    results: list[ItemResult]
    events: list[AuditRecord]
    served_versions: dict[str, Any]
    duration_s: float
    queued: frozenset[str] = frozenset()  # loaded as queued: the ones to mark running
    announce: bool = True  # NOTIFY waiters when requests end (Settings.notify_ends)
    # The jobs of the claimed requests as loaded (None in it: requests of no job); None when
    # not loaded. A notification names the job when there is exactly one.
    jobs: frozenset[str | None] | None = None


@dataclass(frozen=True)
class Committed:
    onward: list[str]  # go on to the next stage in this round
    repair: list[str]  # go back to generation in the next round


def commit(session: Session, work: StageCommit) -> Committed:
    """Finish the shard stage, record each item's stage run, end decided requests, append
    events, open the next shard stage (or, for drafts sent back, generation in the next
    round).

    The shard stage finishes only while this delivery holds its lease. When it was taken
    over, this raises `LeaseLost` before writing anything else, and the other delivery
    commits. A stage run is unique on (request, stage, run, round): a second commit of the
    same work fails instead of recording it twice.
    """
    claimed = work.lease.request_ids
    covered = [r.request_id for r in work.results]
    if len(covered) != len(set(covered)) or set(covered) != set(claimed):
        raise ValueError(f"{work.key.stage} returned results for {sorted(covered)}, "
                         f"claimed {sorted(claimed)}")
    now = utcnow()
    finished = session.execute(
        update(ShardStage).where(*_held(work.lease.id, work.owner))
        .values(status=DONE, finished_at=now, lease_expires_at=None)
        .execution_options(synchronize_session=False))
    if finished.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"{work.key.stage} of shard {work.key.hop.shard_id}: the lease was "
                        f"taken over")
    connection = session.connection()
    # A stage failed before it knew what served it records no versions.
    served = store_versions(connection, work.served_versions, now) if work.served_versions \
        else None
    insert_rows(connection, StageRun.__table__,
                [_stage_run(work, r, served, now) for r in work.results])
    _update_requests(session, work, now)
    insert_rows(connection, AuditEvent.__table__, [
        {"request_id": e.request_id, "stage": work.key.stage.value, "run": work.key.hop.run,
         "round": work.key.hop.round, "kind": e.kind, "payload": e.payload, "created_at": now}
        for e in work.events])
    going = [r for r in work.results if r.outcome is None and not r.untouched]
    onward = [r.request_id for r in going if not r.repair]
    repair = [r.request_id for r in going if r.repair]
    nxt = work.key.stage.next
    opened = [(nxt, work.key.hop.round, onward)] if nxt is not None and onward else []
    if repair:
        opened.append((Stage.GENERATION, work.key.hop.round + 1, repair))
    if opened:
        connection.execute(insert(ShardStage.__table__), [
            pending_shard_stage(work.key.hop.shard_id, stage, work.key.hop.run, round_, ids, now)
            for stage, round_, ids in opened])
    return Committed(onward if nxt is not None else [], repair)


def rides_along(status: Status, request_run: int, run: int) -> bool:
    """Whether a claimed request is left as it is by a stage of `run`: it has ended
    (cancelled, refused...) or a replay superseded it."""
    return status.is_terminal or request_run != run


def ride_along(request_id: str, status: Status, request_run: int) -> ItemResult:
    """The result of a claimed request that has ended (cancelled, refused...) or that a
    replay superseded: the stage leaves it as it is."""
    return ItemResult(request_id=request_id, output={"skipped": status.value,
                                                     "request_run": request_run},
                      untouched=True)


def fail_claimed(session: Session, key: StageKey, owner: LeaseOwner, lease: Lease,
                 outcome: Outcome, announce: bool = True) -> Committed:
    """Commit the claimed shard stage as `outcome` (a permanent error, or retries spent) for
    every request still active in the shard's run. The others ride along, so a request
    cancelled meanwhile gets no failed stage on its record."""
    c = Request.__table__.c
    rows = session.execute(select(c.id, c.status, c.run)
                           .where(any_of(c.id, lease.request_ids))).all()
    ended = {rid: ride_along(rid, Status(status), run) for rid, status, run in rows
             if rides_along(Status(status), run, key.hop.run)}
    failing = [rid for rid in lease.request_ids if rid not in ended]
    results = [ItemResult(request_id=rid, output={"error": outcome.model_dump()},
                          outcome=outcome) for rid in failing]
    events = [AuditRecord(request_id=rid, kind=EventKind.STAGE_FAILED,
                          payload=outcome.model_dump(mode="json")) for rid in failing]
    # A stage that failed before it knew what served it records no versions.
    return commit(session, StageCommit(key, owner, lease, results + list(ended.values()),
                                       events, {}, 0.0, announce=announce))


def pending_shard_stage(shard_id: str, stage: Stage, run: int, round_: int,
                        request_ids: list[str], now: datetime) -> dict[str, Any]:
    """The row of a shard stage that waits for its first delivery."""
    return {"shard_id": shard_id, "stage": stage.value, "run": run, "round": round_,
            "request_ids": request_ids, "status": PENDING, "deliveries": 0, "redrives": 0,
            "created_at": now}


def _stage_run(work: StageCommit, result: ItemResult, served: str | None,
               now: datetime) -> dict[str, Any]:
    outcome = result.outcome
    return {"request_id": result.request_id, "shard_id": work.key.hop.shard_id,
            "stage": work.key.stage.value, "run": work.key.hop.run, "round": work.key.hop.round,
            "status": DONE, "deliveries": work.lease.deliveries,
            "created_at": work.lease.claimed_at, "started_at": work.lease.claimed_at,
            "finished_at": now, "duration_s": work.duration_s,
            "served_versions_id": served, "output": result.output,
            "outcome_status": outcome.status.value if outcome else None,
            "error_class": outcome.error_class if outcome else None,
            "error_message": outcome.message if outcome and outcome.error_class else None}


def _update_requests(session: Session, work: StageCommit, now: datetime) -> None:
    """Decided requests get their outcome; queued ones become running. Only a request still
    active in this run is written, so a cancel or a newer run is never overwritten. A request
    is queued only before the first stage of its run commits: later stages skip the write."""
    ended = [_ended_row(work, r, now) for r in work.results if r.outcome and not r.untouched]
    # Plain comparisons, not IN: an executemany (SQLite) cannot expand a list parameter.
    count = update_rows(session.connection(), Request.__table__, "id", ended,
                        Request.run == work.key.hop.run,
                        or_(*(Request.status == status for status in ACTIVE)))
    if ended and work.announce:
        announce_ended(session, _news(work.jobs, count, [row["id"] for row in ended]))
    onward = [r.request_id for r in work.results if r.request_id in work.queued
              and r.outcome is None and not r.untouched and not r.repair]
    if onward:
        session.execute(update(Request).where(any_of(Request.id, onward),
                                              Request.run == work.key.hop.run,
                                              Request.status == Status.QUEUED.value)
                        .values(status=Status.RUNNING.value)
                        .execution_options(synchronize_session=False))


def _news(jobs: frozenset[str | None] | None, count: int, ended: list[str]) -> Ended | None:
    """What the notification can say: whose requests ended and how many, when the claimed
    requests all belong to one job (or all to none); requests of no job by id, when few
    (those the commit ended: a cancelled one it skipped is named too, and read for nothing)."""
    if jobs is None or len(jobs) != 1:
        return None
    (job_id,) = jobs
    named = tuple(ended) if job_id is None and len(ended) <= NAMED_AT_MOST else ()
    return Ended(job_id, count, named)


def _ended_row(work: StageCommit, result: ItemResult, now: datetime) -> dict[str, Any]:
    outcome = result.outcome
    assert outcome is not None
    failed = outcome.status == Status.FAILED
    return {"id": result.request_id, "status": outcome.status.value, "finished_at": now,
            "failed_at": now if failed else None,
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


def repair_waiting(session: Session, key: StageKey) -> tuple[str, int] | None:
    """The shard's lane and the drafts' count, when the generation round this validation
    sent drafts back to is still pending and was never delivered (the enqueue after the
    commit did not happen)."""
    if key.stage != Stage.VALIDATION:
        return None
    repair_key = StageKey(key.hop.model_copy(update={"round": key.hop.round + 1}),
                          Stage.GENERATION)
    waiting = session.scalar(select(ShardStage.request_ids).where(
        *repair_key.where(), ShardStage.status == PENDING, ShardStage.deliveries == 0))
    return None if waiting is None else (shard_lane(session, key.hop.shard_id), len(waiting))


def next_stage_waiting(session: Session, key: StageKey) -> bool:
    """True when the next shard stage exists and nobody has claimed it yet."""
    nxt = key.stage.next
    if nxt is None:
        return False
    next_key = StageKey(key.hop, nxt)
    return session.scalar(select(ShardStage.id).where(*next_key.where(),
                                                      ShardStage.status == PENDING)) is not None
