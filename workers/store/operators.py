"""What operators read and do: failures, audit trails, replays, cancels, job exports."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from schemas.events import EventKind
from schemas.stages import Hop
from schemas.status import DriftPolicy, Lane, ShardStageStatus, Stage, Status
from schemas.versions import VersionTuple
from workers.store.admission import AdmissionError, Dispatch, live_shard_stages, new_shard
from workers.store.models import AuditEvent, Job, Request, StageRun
from workers.store.progress import Ended, announce_ended
from workers.store.stage_runs import ACTIVE
from workers.store.timeutil import as_utc, utcnow
from workers.store.tuples import store_versions, versions_by_id

# Where events name a version tuple by id: admission ("versions_id"), replay.
_EVENT_TUPLE_KEYS = ("versions_id", "pinned_versions_id")


def failed_requests(session: Session, job_id: str | None = None, limit: int = 100) -> list[Request]:
    """Requests whose current run failed, the latest failure first (by ix_requests_failed_at;
    a replayed request keeps its failed_at until its new run ends, so status decides)."""
    query = select(Request).where(Request.failed_at.is_not(None),
                                  Request.status == Status.FAILED.value)
    if job_id:
        query = query.where(Request.job_id == job_id)
    return list(session.scalars(query.order_by(Request.failed_at.desc()).limit(limit)))


def audit_trail(session: Session, request_id: str) -> dict[str, Any]:
    """A request, its stage runs, the shard stages still holding it (pending or running,
    with their deliveries) and its events, oldest first; the version tuple it pins now; and
    every version tuple the trail names, by id: its pin's, those that served its stage runs,
    and those its events name (the pins of its admission and of each replay)."""
    request = session.get(Request, request_id)
    if request is None:
        raise AdmissionError(f"no request with id {request_id!r}")
    stage_rows = session.scalars(select(StageRun).where(StageRun.request_id == request_id)
                                 .order_by(StageRun.run, StageRun.round, StageRun.id)).all()
    events = session.scalars(select(AuditEvent).where(AuditEvent.request_id == request_id)
                             .order_by(AuditEvent.id)).all()
    waiting = [stage for stage, _ in live_shard_stages(session, request)]
    named = [request.pinned_versions_id, *(s.served_versions_id for s in stage_rows),
             *(e.payload.get(k) for e in events if isinstance(e.payload, dict)
               for k in _EVENT_TUPLE_KEYS)]
    tuples = versions_by_id(session.connection(), named)
    return {"request": request, "stage_runs": list(stage_rows), "waiting": waiting,
            "events": list(events), "pinned_versions": tuples.get(request.pinned_versions_id),
            "tuples": tuples}


def cancel_job(session: Session, job_id: str) -> int:
    """Stop a job's remaining work: every unfinished request ends as failed/Cancelled."""
    job = session.get(Job, job_id)
    if job is None:
        raise AdmissionError(f"no job with id {job_id!r}")
    now = utcnow()
    job.cancelled_at = now
    # Lines not admitted yet end too (never_admitted): the job's waiters look, whatever ended.
    announce_ended(session, Ended(job_id, None))
    # One statement that re-checks each row's status once it holds the row's lock: a stage
    # commit that ends a request meanwhile is waited for, and its outcome stands.
    cancelled = session.execute(
        update(Request).where(Request.job_id == job_id, Request.status.in_(ACTIVE))
        .values(status=Status.FAILED.value, error_class="Cancelled", error_stage=None,
                error_message=f"job {job_id} was cancelled", finished_at=now, failed_at=now)
        .returning(Request.id, Request.run)
        .execution_options(synchronize_session=False)).all()
    if cancelled:
        session.execute(insert(AuditEvent), [
            {"request_id": rid, "stage": None, "run": run, "round": 0,
             "kind": EventKind.CANCELLED, "payload": {"job_id": job_id}, "created_at": now}
            for rid, run in cancelled])
    return len(cancelled)


def replay(session: Session, request_id: str, from_stage: Stage, current: VersionTuple,
           follow_current_versions: bool) -> Dispatch:
    """A new run of one request from `from_stage`, reusing earlier stages' recorded outputs.
    Replays are `strict` on their pin unless told to follow the current versions."""
    request = session.get(Request, request_id)
    if request is None:
        raise AdmissionError(f"no request with id {request_id!r}")
    if request.status in ACTIVE:
        raise AdmissionError(f"request {request_id} is still {request.status}; replay ends work")
    previous_run, run = request.run, request.run + 1
    _require_stage_reached(session, request, from_stage)
    _copy_earlier_stages(session, request_id, previous_run, run, from_stage)
    policy = DriftPolicy.FOLLOW if follow_current_versions else DriftPolicy.STRICT
    if follow_current_versions:
        request.pinned_versions_id = store_versions(session.connection(), current.model_dump(),
                                                    utcnow())
    request.run, request.status, request.drift_policy = run, Status.QUEUED.value, policy.value
    request.error_class = request.error_stage = request.error_message = request.output = None
    request.finished_at, request.citations, request.admitted_at = None, [], utcnow()
    if request.deadline_at is not None and as_utc(request.deadline_at) < utcnow():
        request.deadline_at = utcnow() + timedelta(hours=1)
    session.add(AuditEvent(request_id=request_id, stage=from_stage.value, run=run, round=0,
                           kind=EventKind.REPLAY, payload={
                               "from_stage": from_stage.value, "previous_run": previous_run,
                               "drift_policy": policy.value,
                               "pinned_versions_id": request.pinned_versions_id}))
    shard_id = _replay_shard(session, request, run, from_stage)
    return Dispatch(Hop(shard_id=shard_id, run=run), from_stage, Lane.ONLINE)


def _replay_shard(session: Session, request: Request, run: int, from_stage: Stage) -> str:
    shard_id = new_shard(session, [request.id], request.job_id, run=run, lane=Lane.ONLINE,
                         stage=from_stage, index=run)
    session.execute(update(StageRun).where(StageRun.request_id == request.id,
                                           StageRun.run == run)
                    .values(shard_id=shard_id).execution_options(synchronize_session=False))
    return shard_id


def _require_stage_reached(session: Session, request: Request, stage: Stage) -> None:
    """Replaying from a stage reuses earlier decisions only if they passed the request on:
    a refusal by the router is never skipped by replaying from retrieval. Reached means the
    stage ran for it in its current run, or holds it still (cancelled while waiting there)."""
    if stage == Stage.ROUTER:
        return
    ran = session.scalar(select(StageRun.id).where(
        StageRun.request_id == request.id, StageRun.run == request.run,
        StageRun.stage == stage.value).limit(1))
    if ran is None and not any(s.stage == stage.value
                               for s, _ in live_shard_stages(session, request)):
        raise AdmissionError(f"request {request.id} never reached {stage} in run "
                             f"{request.run}; replay it from an earlier stage")


def _copy_earlier_stages(session: Session, request_id: str, previous_run: int, run: int,
                         from_stage: Stage) -> None:
    """Each earlier stage's last output of the previous run (of its last round: the draft
    the last validation judged, after repair rounds) becomes its output in round 0 of the
    new run. An earlier stage whose last output ended the request cannot be skipped."""
    earlier = [s.value for s in Stage][: list(Stage).index(from_stage)]
    rows = session.scalars(select(StageRun).where(
        StageRun.request_id == request_id, StageRun.run == previous_run,
        StageRun.stage.in_(earlier)).order_by(StageRun.round)).all()  # every stage run is done
    last = {r.stage: r for r in rows}  # by round: the last one stays
    missing = [s for s in earlier if s not in last]
    if missing:
        raise AdmissionError(f"cannot replay from {from_stage}: run {previous_run} has no "
                             f"recorded output for {missing}")
    ended = [r for r in last.values() if r.outcome_status is not None]
    if ended:
        raise AdmissionError(f"cannot replay from {from_stage}: {ended[0].stage} ended the "
                             f"request ({ended[0].outcome_status}) in round {ended[0].round} of "
                             f"run {previous_run}; replay it from {ended[0].stage}")
    now = utcnow()
    for row in last.values():
        session.add(StageRun(request_id=request_id, shard_id=row.shard_id, stage=row.stage,
                             run=run, round=0, status=ShardStageStatus.DONE.value, deliveries=0,
                             created_at=now, finished_at=now, duration_s=0.0,
                             served_versions_id=row.served_versions_id, output=row.output))
    session.flush()


def job_requests(session: Session, job_id: str) -> list[Request]:
    return list(session.scalars(select(Request).where(Request.job_id == job_id)
                                .order_by(Request.line_no)))


def unfinished(session: Session, job_id: str) -> int:
    return session.scalar(select(func.count()).select_from(Request).where(
        Request.job_id == job_id, Request.status.in_(ACTIVE))) or 0


def job_active(session: Session, job_id: str) -> bool:
    """Whether any admitted request of the job is still queued or running. It reads the
    job's rows until it meets an active one: no index holds status (migrations 0008, 0012),
    since each would take an entry from both status updates of every request."""
    return session.scalar(select(Request.id).where(Request.job_id == job_id,
                                                   Request.status.in_(ACTIVE))
                          .limit(1)) is not None
