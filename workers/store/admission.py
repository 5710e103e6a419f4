"""Admission: persist requests with pinned versions and cut them into shards (no Celery)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schemas.events import EventKind
from schemas.requests import MalformedLine, RequestLine
from schemas.stages import Hop
from schemas.status import DriftPolicy, Lane, ShardStageStatus, Stage, Status
from schemas.versions import VersionTuple
from workers.store.among import any_of
from workers.store.bulk import insert_rows, upsert
from workers.store.engine import session_scope
from workers.store.models import AuditEvent, Job, Request, Shard, ShardStage, Tenant
from workers.store.stage_runs import pending_shard_stage
from workers.store.timeutil import utcnow
from workers.store.tuples import store_versions


class AdmissionError(ValueError):
    """A request the boundary refuses to admit (reused idempotency key, unknown job...)."""


@dataclass(frozen=True)
class Dispatch:
    """A shard to put on the queues, from `stage` on, in `lane`."""

    hop: Hop
    stage: Stage
    lane: Lane


@dataclass(frozen=True)
class AdmittedJob:
    job_id: str
    created: bool
    dispatches: list[Dispatch]
    malformed: list[MalformedLine]


def job_id_for(content: bytes) -> str:
    return "job-" + hashlib.sha256(content).hexdigest()[:16]


def request_id_for(scope: str, custom_id: str) -> str:
    return "req-" + hashlib.sha256(f"{scope}\x00{custom_id}".encode()).hexdigest()[:20]


def line_request_id(job_id: str, line_no: int) -> str:
    """A job line's request id: the job's hash, then the line number. A job's ids sort in
    the order its lines are admitted, so each index on a request id (requests, stage runs,
    audit events) takes a shard's rows into one or two neighbouring pages, where hashed ids
    spread them over the whole index; and the same file names the same ids again."""
    return f"req-{job_id.removeprefix('job-')}{line_no:08d}"


# Requests per admission transaction of a job file (rounded to whole shards), and in the
# first one, from which they double up to the former (see `chunk_bounds`).
ADMIT_CHUNK_LINES = 512
ADMIT_FIRST_LINES = 64
# An admission that loses a race for an idempotency key looks again up to this many times.
KEY_RACE_RETRIES = 3
# In job_counts: the job's lines the store does not hold yet (an admission under way or cut
# short); a job with any is not done. A cancelled job's are NEVER_ADMITTED: they never run.
NOT_ADMITTED = "not_admitted"
NEVER_ADMITTED = "never_admitted"


def admit_job(session: Session, *, name: str, content: bytes, lines: list[RequestLine],
              malformed: list[MalformedLine], line_numbers: list[int], versions: VersionTuple,
              drift_policy: DriftPolicy, shard_size: int, lane: Lane = Lane.BATCH) -> AdmittedJob:
    """Admit a job file once, in the session's one transaction; admitting the same content
    again resumes it instead (and admits any lines an interrupted admission left out).
    `admit_job_in_chunks` is the same for files of any size."""
    job_id, created = open_job(session, name=name, content=content, line_count=len(lines),
                               malformed=malformed, lane=lane)
    dispatches = [] if created else resume_dispatches(session, job_id)
    dispatches += admit_lines(session, job_id, lines, line_numbers, versions=versions,
                              drift_policy=drift_policy, shard_size=shard_size)
    return AdmittedJob(job_id, created, dispatches, stored_malformed(session, job_id))


def admit_job_in_chunks(url: str, *, name: str, content: bytes, lines: list[RequestLine],
                        malformed: list[MalformedLine], line_numbers: list[int],
                        versions: VersionTuple, drift_policy: DriftPolicy, shard_size: int,
                        lane: Lane, on_dispatch: Callable[[list[Dispatch]], None],
                        chunk_lines: int = ADMIT_CHUNK_LINES) -> AdmittedJob:
    """`admit_job`, committed chunk by chunk (see `chunk_bounds`), each chunk's dispatches
    handed to `on_dispatch` once it commits: a large file's first shards run while the rest
    is admitted, and no transaction grows with the file. An admission cut short leaves whole
    chunks behind (`NOT_ADMITTED` in `job_counts`); admitting the file again admits the
    rest."""
    with session_scope(url) as session:
        job_id, created = open_job(session, name=name, content=content,
                                   line_count=len(lines), malformed=malformed, lane=lane)
        dispatches = [] if created else resume_dispatches(session, job_id)
        complete = not created and NOT_ADMITTED not in job_counts(session, job_id)
    on_dispatch(dispatches)
    for start, end in [] if complete else chunk_bounds(len(lines), shard_size, chunk_lines):
        with session_scope(url) as session:
            chunk = admit_lines(session, job_id, lines[start:end], line_numbers[start:end],
                                versions=versions, drift_policy=drift_policy,
                                shard_size=shard_size)
        on_dispatch(chunk)
        dispatches += chunk
    with session_scope(url) as session:
        malformed = stored_malformed(session, job_id)
    return AdmittedJob(job_id, created, dispatches, malformed)


def stored_malformed(session: Session, job_id: str) -> list[MalformedLine]:
    """The job's lines not admitted as requests: malformed in its file, or refused at
    admission (a reused idempotency key)."""
    stored = session.scalar(select(Job.malformed).where(Job.id == job_id))
    return [MalformedLine.model_validate(m) for m in stored or []]


def chunk_bounds(count: int, shard_size: int, chunk_lines: int,
                 first_lines: int = ADMIT_FIRST_LINES) -> list[tuple[int, int]]:
    """The [start, end) of each admission chunk of `count` lines: `first_lines` first, then
    twice as many lines each time up to `chunk_lines` (each rounded to whole shards, at
    least one). The first shards are on the queues after a small transaction, not a full
    chunk's, and each chunk commits while the workers are busy with the ones before."""

    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")

    def whole_shards(lines: int) -> int:
        return max(1, lines // shard_size) * shard_size

    step = whole_shards(chunk_lines)
    bounds, start, size = [], 0, min(whole_shards(first_lines), step)
    while start < count:
        bounds.append((start, min(count, start + size)))
        start, size = start + size, min(2 * size, step)
    return bounds


def open_job(session: Session, *, name: str, content: bytes, line_count: int,
             malformed: list[MalformedLine], lane: Lane) -> tuple[str, bool]:
    """The job of this file content (`line_count` well-formed lines), and whether this call
    created it."""
    job_id = job_id_for(content)
    if session.get(Job, job_id) is not None:
        return job_id, False
    try:
        with session.begin_nested():
            session.add(Job(id=job_id, name=name, input_sha256=job_id[4:], lane=lane.value,
                            total_lines=line_count + len(malformed),
                            malformed=[m.model_dump() for m in malformed]))
    except IntegrityError:
        # A concurrent admission of the same file won; its insert waited for its commit.
        return job_id, False
    return job_id, True


def admit_lines(session: Session, job_id: str, lines: list[RequestLine],
                line_numbers: list[int], *, versions: VersionTuple, drift_policy: DriftPolicy,
                shard_size: int) -> list[Dispatch]:
    """Admit the job's lines that the store does not hold yet (all of them, unless an
    admission of the same file ran before) and cut them into shards; their dispatches.
    Admissions of one job take turns: on Postgres this locks the job's row (FOR NO KEY
    UPDATE, which rows that reference the job do not wait for), on SQLite the write
    transaction is the lock. A cancelled job admits nothing more. The lines join the job
    in its lane, under the pin and drift policy its first admitted lines got (`versions`
    and `drift_policy` serve only the first): a job resumed after a deploy is not split.

    A line whose idempotency key an earlier request of its tenant holds (of another job, or
    submitted online) is not admitted: it joins the job's malformed lines as
    `IdempotencyKeyReused`, naming that request, and so ends in errors.jsonl."""
    if not lines:
        return []
    job = session.execute(select(Job.lane, Job.cancelled_at, Job.malformed)
                          .where(Job.id == job_id).with_for_update(key_share=True)).one()
    if job.cancelled_at is not None:
        return []
    refused_before = {m["line_no"] for m in job.malformed or []}
    ids = [line_request_id(job_id, line_no) for line_no in line_numbers]
    # Lines admitted before ids followed line numbers are held under the hash of their
    # custom_id: a job admitted in part before that deploy is completed, not doubled.
    legacy = [request_id_for(job_id, line.custom_id) for line in lines]
    columns = Request.__table__.c
    held = set(session.execute(select(columns.id)
                               .where(any_of(columns.id, ids + legacy))).scalars())
    todo = [(line, request_id, line_no)
            for line, request_id, old_id, line_no in zip(lines, ids, legacy, line_numbers,
                                                         strict=True)
            if request_id not in held and old_id not in held and line_no not in refused_before]
    keyed = any(line.idempotency_key for line, _, _ in todo)
    for attempt in range(1 + KEY_RACE_RETRIES):
        try:
            with session.begin_nested():
                return _admit_new(session, job_id, Lane(job.lane), job.malformed or [], todo,
                                  versions, drift_policy, shard_size)
        except IntegrityError:
            # Another job's admission, or an online submit, took one of these keys after
            # they were looked up (this job's lock does not hold other jobs back). It has
            # committed by now, so the next look finds it and refuses the line.
            if not keyed or attempt == KEY_RACE_RETRIES:
                raise
    raise AssertionError("the loop returns or raises")


def _admit_new(session: Session, job_id: str, lane: Lane, malformed: list[dict[str, Any]],
               todo: list[tuple[RequestLine, str, int]], versions: VersionTuple,
               drift_policy: DriftPolicy, shard_size: int) -> list[Dispatch]:
    todo = _refuse_reused_keys(session, job_id, malformed, todo)
    if not todo:
        return []
    earlier = session.execute(select(Request.pinned_versions_id, Request.drift_policy)
                              .where(Request.job_id == job_id).limit(1)).first()
    pinned_id, policy = (earlier.pinned_versions_id, DriftPolicy(earlier.drift_policy)) \
        if earlier else (_stored_pin_id(session, versions), drift_policy)
    requests = [_new_request(line, request_id, pinned_id, policy, lane, job_id, line_no)
                for line, request_id, line_no in todo]
    return _persist(session, requests, job_id, lane, shard_size)


def _refuse_reused_keys(session: Session, job_id: str, malformed: list[dict[str, Any]],
                        todo: list[tuple[RequestLine, str, int]],
                        ) -> list[tuple[RequestLine, str, int]]:
    """`todo` less the lines whose idempotency key a stored request holds, which are added to
    the job's malformed lines (its row is locked: admissions of the job take turns)."""
    holders = _key_holders(session, [line for line, _, _ in todo])
    if not holders:
        return todo
    refused = [MalformedLine(
        line_no=line_no, custom_id=line.custom_id, error_class="IdempotencyKeyReused",
        reason=f"idempotency_key {line.idempotency_key!r} of tenant {line.tenant!r} is held by "
               f"request {holders[(line.tenant, line.idempotency_key)]}: a key admits one "
               f"request").model_dump()
        for line, _, line_no in todo if (line.tenant, line.idempotency_key) in holders]
    session.execute(update(Job).where(Job.id == job_id).values(malformed=malformed + refused)
                    .execution_options(synchronize_session=False))
    return [item for item in todo if (item[0].tenant, item[0].idempotency_key) not in holders]


def _key_holders(session: Session, lines: list[RequestLine]) -> dict[tuple[str, str | None], str]:
    """(tenant, idempotency key) -> the stored request that holds it, for the lines' keys."""
    keyed = [line for line in lines if line.idempotency_key is not None]
    if not keyed:
        return {}
    c = Request.__table__.c
    rows = session.execute(select(c.tenant_id, c.idempotency_key, c.id).where(
        any_of(c.tenant_id, sorted({line.tenant for line in keyed})),
        any_of(c.idempotency_key, sorted({str(line.idempotency_key) for line in keyed}))))
    return {(tenant, key): request_id for tenant, key, request_id in rows}


def admit_one(session: Session, line: RequestLine, versions: VersionTuple,
              drift_policy: DriftPolicy, lane: Lane = Lane.ONLINE) -> tuple[str, list[Dispatch]]:
    """Admit one upstream request as a shard of one. A repeated idempotency key returns the
    first request's id, and enqueues again only a first stage that was never delivered (the
    first submit's enqueue failed); a duplicate message is harmless, claims dedupe it. The
    same key with a different request (custom_id, grants or body) raises `AdmissionError`:
    its sender would otherwise read another request's result as its own."""
    if line.idempotency_key:
        existing = _by_idempotency_key(session, line)
        if existing:
            return existing, _undelivered(session, existing)
    scope = line.idempotency_key or uuid.uuid4().hex
    request = _new_request(line, request_id_for(f"{line.tenant}:{scope}", line.custom_id),
                           _stored_pin_id(session, versions), drift_policy, lane, None, None)
    try:
        with session.begin_nested():
            dispatches = _persist(session, [request], None, lane, 1)
    except IntegrityError:
        # The same key admitted concurrently: the first admission stands.
        existing = _by_idempotency_key(session, line) if line.idempotency_key else None
        if existing is None:
            raise
        return existing, _undelivered(session, existing)
    return str(request["id"]), dispatches


def _by_idempotency_key(session: Session, line: RequestLine) -> str | None:
    """The request that holds the line's key, when it is the same request."""
    held = session.execute(select(Request.id, Request.custom_id, Request.grants, Request.payload)
                           .where(Request.tenant_id == line.tenant,
                                  Request.idempotency_key == line.idempotency_key)).first()
    if held is None:
        return None
    if (held.custom_id, sorted(held.grants or []), held.payload) != (
            line.custom_id, line.grants, line.request.model_dump(mode="json")):
        raise AdmissionError(f"idempotency_key {line.idempotency_key!r} of tenant "
                             f"{line.tenant!r} is held by request {held.id} "
                             f"(custom_id {held.custom_id!r}), a different request")
    return str(held.id)


def _undelivered(session: Session, request_id: str) -> list[Dispatch]:
    """The first stage of the request's current run, if it is still pending and no worker
    ever received it."""
    request = session.get_one(Request, request_id)
    if request.status != Status.QUEUED.value:
        return []
    for stage, shard in live_shard_stages(session, request):
        if stage.status == ShardStageStatus.PENDING.value and stage.deliveries == 0 \
                and stage.stage == shard.start_stage and stage.round == 0:
            return [Dispatch(Hop(shard_id=shard.id, run=stage.run), Stage(stage.stage),
                             Lane(shard.lane))]
    return []


def live_shard_stages(session: Session, request: Request) -> list[tuple[ShardStage, Shard]]:
    """The pending or running shard stages that hold the request in its current run, with
    their shard: its work still to do."""
    job = Shard.job_id.is_(None) if request.job_id is None else Shard.job_id == request.job_id
    rows = session.execute(
        select(ShardStage, Shard).join(Shard, Shard.id == ShardStage.shard_id)
        .where(job, ShardStage.run == request.run,
               ShardStage.status != ShardStageStatus.DONE.value)
        .order_by(ShardStage.id)).all()
    return [(stage, shard) for stage, shard in rows if request.id in stage.request_ids]


def _stored_pin_id(session: Session, versions: VersionTuple) -> str:
    """Store the tuple admitted requests pin; its id."""
    return store_versions(session.connection(), versions.model_dump(), utcnow())


def _new_request(line: RequestLine, request_id: str, pinned_id: str,
                 drift_policy: DriftPolicy, lane: Lane, job_id: str | None,
                 line_no: int | None) -> dict[str, Any]:
    """A request's row, queued, with its pinned versions (by id)."""
    now = utcnow()
    deadline = now + timedelta(seconds=line.deadline_s) if line.deadline_s else None
    return {"id": request_id, "job_id": job_id, "line_no": line_no,
            "custom_id": line.custom_id, "tenant_id": line.tenant, "grants": line.grants,
            "kind": line.request.kind, "payload": line.request.model_dump(),
            "lane": lane.value, "status": Status.QUEUED.value, "run": 0,
            "pinned_versions_id": pinned_id, "drift_policy": drift_policy.value,
            "deadline_at": deadline, "idempotency_key": line.idempotency_key, "citations": [],
            "prompt_tokens": 0, "completion_tokens": 0, "created_at": now, "admitted_at": now}


def _persist(session: Session, requests: list[dict[str, Any]], job_id: str | None, lane: Lane,
             shard_size: int) -> list[Dispatch]:
    """Insert the requests and their admission events (in bulk, not through the ORM's unit
    of work: a job can be large), then cut them into shards."""
    ensure_tenants(session, {r["tenant_id"] for r in requests})
    connection = session.connection()
    insert_rows(connection, Request.__table__, requests)
    insert_rows(connection, AuditEvent.__table__, [
        {"request_id": r["id"], "stage": None, "run": 0, "round": 0,
         "kind": EventKind.ADMITTED, "created_at": r["admitted_at"],
         "payload": {"job_id": job_id, "versions_id": r["pinned_versions_id"],
                     "drift_policy": r["drift_policy"], "lane": lane.value}}
        for r in requests])
    dispatches = []
    for start in range(0, len(requests), shard_size):
        members = [r["id"] for r in requests[start:start + shard_size]]
        shard_id = new_shard(session, members, job_id, run=0, lane=lane, stage=Stage.ROUTER,
                             index=start // shard_size)  # within this admission
        dispatches.append(Dispatch(Hop(shard_id=shard_id, run=0), Stage.ROUTER, lane))
    return dispatches


def new_shard(session: Session, request_ids: list[str], job_id: str | None, *, run: int,
              lane: Lane, stage: Stage, index: int = 0) -> str:
    """A shard and its first stage, pending."""
    seed = f"{job_id}:{run}:{index}:{','.join(request_ids)}"
    shard_id = "shd-" + hashlib.sha256(seed.encode()).hexdigest()[:20]
    session.add(Shard(id=shard_id, job_id=job_id, run=run, lane=lane.value,
                      start_stage=stage.value, request_ids=request_ids))
    session.flush()
    session.execute(insert(ShardStage.__table__).values(
        pending_shard_stage(shard_id, stage, run, 0, request_ids, utcnow())))
    return shard_id


def ensure_tenants(session: Session, tenants: set[str]) -> None:
    """Insert the tenants not yet known; concurrent admissions of a new tenant both succeed."""
    if not tenants:
        return
    now = utcnow()
    session.execute(upsert(session, Tenant).values([{"id": t, "created_at": now} for t in sorted(tenants)])
                    .on_conflict_do_nothing(index_elements=["id"]))


def resume_dispatches(session: Session, job_id: str) -> list[Dispatch]:
    """For every shard with unfinished requests, the stage its chain must restart from."""
    if not session.scalar(select(Request.id).where(
            Request.job_id == job_id,
            Request.status.in_([Status.QUEUED.value, Status.RUNNING.value])).limit(1)):
        return []
    rows = session.execute(
        select(ShardStage.shard_id, ShardStage.stage, ShardStage.run, ShardStage.round,
               Shard.lane)
        .join(Shard, Shard.id == ShardStage.shard_id)
        .where(Shard.job_id == job_id, ShardStage.status != ShardStageStatus.DONE.value)
        .order_by(ShardStage.id)).all()
    return [Dispatch(Hop(shard_id=r.shard_id, run=r.run, round=r.round), Stage(r.stage),
                     Lane(r.lane)) for r in rows]


def job_counts(session: Session, job_id: str) -> dict[str, int]:
    """The job's requests by status, and its lines not admitted (`NOT_ADMITTED`, or
    `NEVER_ADMITTED` once the job is cancelled); {} for an unknown job."""
    job = session.execute(select(Job.total_lines, Job.malformed, Job.cancelled_at)
                          .where(Job.id == job_id)).first()
    if job is None:
        return {}
    rows = session.execute(select(Request.status, func.count()).where(Request.job_id == job_id)
                           .group_by(Request.status)).all()
    counts = {status: int(count) for status, count in rows}
    missing = job.total_lines - len(job.malformed or []) - sum(counts.values())
    if missing > 0:
        counts[NOT_ADMITTED if job.cancelled_at is None else NEVER_ADMITTED] = missing
    return counts
