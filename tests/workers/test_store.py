"""The audit store under contention, on SQLite (embedded) and on Postgres (distributed): admission
races, idempotent resubmission, the reconciler's back-off. No broker, no workers."""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from schemas.requests import RequestLine
from schemas.status import DriftPolicy, Lane, Stage
from schemas.versions import VersionTuple
from tests.services import race, wait_for_a_lock_wait
from workers.store.timeutil import utcnow

pytestmark = pytest.mark.integration

VERSIONS = VersionTuple(model="m", prompt="p", router="r", index="i", tool_schemas="t",
                        validators="v", decoding="d", runtime="rt")


def _line(custom_id: str, key: str | None = None, tenant: str = "acme") -> RequestLine:
    return RequestLine.model_validate({
        "custom_id": custom_id, "tenant": tenant, "grants": ["public"],
        "request": {"kind": "answer", "question": "How do I roll back a deploy?"},
        "idempotency_key": key})


def test_concurrent_admissions_of_one_job_file_admit_it_once(store_url: str) -> None:
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope
    from workers.store.models import Request, ShardStage

    lines = [_line(f"c-{i}", tenant=f"tenant-{uuid.uuid4().hex[:6]}") for i in range(6)]
    content = ("\n".join(line.model_dump_json() for line in lines)).encode()

    def admit() -> Any:
        with session_scope(store_url) as session:
            return admit_job(session, name="race.jsonl", content=content, lines=lines,
                             malformed=[], line_numbers=list(range(1, 7)), versions=VERSIONS,
                             drift_policy=DriftPolicy.STRICT, shard_size=4)

    admitted = race(3, admit)
    assert len({a.job_id for a in admitted}) == 1
    assert sorted(a.created for a in admitted) == [False, False, True]
    with session_scope(store_url) as session:
        assert session.scalar(select(func.count()).select_from(Request)) == 6
        stages = session.scalars(select(ShardStage.request_ids)).all()
        assert sorted(len(ids) for ids in stages) == [2, 4]  # one pending router stage a shard
        assert sorted(rid for ids in stages for rid in ids) == sorted(
            session.scalars(select(Request.id)))
    # The losers resume the winner's shards: both still pending at the router.
    for loser in (a for a in admitted if not a.created):
        assert {d.stage for d in loser.dispatches} == {Stage.ROUTER}
        assert len(loser.dispatches) == 2


def _cut_short(store_url: str, lines: list[RequestLine], content: bytes,
               versions: VersionTuple = VERSIONS) -> tuple[str, list[Any]]:
    """A chunked admission that committed its first chunk (two lines) and then stopped."""
    from workers.store.admission import admit_lines, open_job
    from workers.store.engine import session_scope

    with session_scope(store_url) as session:
        job_id, created = open_job(session, name="cut.jsonl", content=content,
                                   line_count=len(lines), malformed=[], lane=Lane.BATCH)
        first = admit_lines(session, job_id, lines[:2], [1, 2], versions=versions,
                            drift_policy=DriftPolicy.STRICT, shard_size=2)
    assert created and len(first) == 1
    return job_id, first


def _admit_all(store_url: str, lines: list[RequestLine], content: bytes,
               versions: VersionTuple = VERSIONS, lane: Lane = Lane.BATCH) -> Any:
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope

    with session_scope(store_url) as session:
        return admit_job(session, name="cut.jsonl", content=content, lines=lines, malformed=[],
                         line_numbers=list(range(1, len(lines) + 1)), versions=versions,
                         drift_policy=DriftPolicy.FOLLOW, shard_size=2, lane=lane)


def test_an_admission_cut_short_is_completed_by_admitting_the_file_again(store_url: str) -> None:
    from workers.store.admission import NOT_ADMITTED, job_counts
    from workers.store.engine import session_scope
    from workers.store.models import Request, ShardStage

    lines = [_line(f"cut-{i}", tenant="acme") for i in range(6)]
    content = uuid.uuid4().bytes
    # Given an admission cut short after its first chunk: the job is not done
    job_id, first = _cut_short(store_url, lines, content)
    with session_scope(store_url) as session:
        assert job_counts(session, job_id) == {"queued": 2, NOT_ADMITTED: 4}
    # When the file is admitted again, after a deploy and from an online lane
    later = VERSIONS.model_copy(update={"model": "m2"})
    again = _admit_all(store_url, lines, content, versions=later, lane=Lane.ONLINE)
    # Then the first chunk's shard resumes and the four other lines are admitted, once,
    # with the job's lane, pin and drift policy
    assert not again.created and again.job_id == job_id
    assert len(again.dispatches) == 3
    assert again.dispatches[0] == first[0]
    assert {d.lane for d in again.dispatches} == {Lane.BATCH}
    with session_scope(store_url) as session:
        rows = session.execute(select(Request.id, Request.line_no, Request.pinned_versions_id,
                                      Request.drift_policy, Request.lane)
                               .where(Request.job_id == job_id)).all()
        stages = session.scalars(select(ShardStage.request_ids)).all()
        assert job_counts(session, job_id) == {"queued": 6}
    assert sorted(r.line_no for r in rows) == [1, 2, 3, 4, 5, 6]
    assert len({(r.pinned_versions_id, r.drift_policy, r.lane) for r in rows}) == 1
    assert rows[0].drift_policy == DriftPolicy.STRICT.value
    assert sorted(rid for ids in stages for rid in ids) == sorted(r.id for r in rows)
    # And a third admission only resumes: nothing new
    third = _admit_all(store_url, lines, content)
    assert sorted(d.hop.shard_id for d in third.dispatches) == sorted(
        d.hop.shard_id for d in again.dispatches)
    with session_scope(store_url) as session:
        assert session.scalar(select(func.count()).select_from(Request)) == 6


def test_a_jobs_request_ids_follow_its_lines_and_name_them_again(store_url: str) -> None:
    from workers.store.admission import line_request_id
    from workers.store.engine import session_scope
    from workers.store.models import Request

    lines = [_line(f"order-{i}", tenant="acme") for i in range(12)]
    content = uuid.uuid4().bytes
    # When a job is admitted, then admitted again
    first = _admit_all(store_url, lines, content)
    again = _admit_all(store_url, lines, content)
    # Then its ids are the job's and the line numbers', in line order, and name the same rows
    with session_scope(store_url) as session:
        rows = session.execute(select(Request.id, Request.line_no)
                               .where(Request.job_id == first.job_id)
                               .order_by(Request.line_no)).all()
    assert [r.id for r in rows] == [line_request_id(first.job_id, n) for n in range(1, 13)]
    assert [r.id for r in rows] == sorted(r.id for r in rows)
    assert again.job_id == first.job_id and not again.created


def test_a_job_admitted_in_part_under_hashed_ids_is_completed_not_doubled(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.store import admission
    from workers.store.admission import job_counts, request_id_for
    from workers.store.engine import session_scope

    lines = [_line(f"old-{i}", tenant="acme") for i in range(6)]
    content = uuid.uuid4().bytes
    # Given a job whose first chunk was admitted before ids followed line numbers
    with monkeypatch.context() as patched:
        patched.setattr(admission, "line_request_id",
                        lambda job_id, line_no: request_id_for(job_id, f"old-{line_no - 1}"))
        job_id, _ = _cut_short(store_url, lines, content)
    # When the file is admitted again
    _admit_all(store_url, lines, content)
    # Then the two lines held under their old ids are not admitted a second time
    with session_scope(store_url) as session:
        assert job_counts(session, job_id) == {"queued": 6}


def test_a_cancelled_job_admits_no_more_lines(store_url: str) -> None:
    from workers.store.admission import NEVER_ADMITTED, job_counts
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job

    lines = [_line(f"stop-{i}", tenant="acme") for i in range(6)]
    content = uuid.uuid4().bytes
    job_id, _ = _cut_short(store_url, lines, content)
    with session_scope(store_url) as session:
        cancel_job(session, job_id)
    again = _admit_all(store_url, lines, content)
    assert again.dispatches == []
    with session_scope(store_url) as session:
        assert job_counts(session, job_id) == {"failed": 2, NEVER_ADMITTED: 4}


def test_concurrent_chunked_admissions_of_one_file_admit_each_line_once(store_url: str) -> None:
    from workers.store.admission import admit_job_in_chunks
    from workers.store.engine import session_scope
    from workers.store.models import Request, ShardStage

    lines = [_line(f"chunk-{i}", tenant="acme") for i in range(9)]
    content = uuid.uuid4().bytes

    def admit() -> Any:
        sent: list[Any] = []
        admitted = admit_job_in_chunks(
            store_url, name="chunks.jsonl", content=content, lines=lines, malformed=[],
            line_numbers=list(range(1, 10)), versions=VERSIONS, drift_policy=DriftPolicy.STRICT,
            shard_size=2, lane=Lane.BATCH, on_dispatch=sent.extend, chunk_lines=4)
        assert sent == admitted.dispatches
        return admitted

    admitted = race(3, admit)
    assert sorted(a.created for a in admitted) == [False, False, True]
    with session_scope(store_url) as session:
        ids = sorted(session.scalars(select(Request.id)))
        stages = session.execute(select(ShardStage.shard_id, ShardStage.request_ids)).all()
    assert len(ids) == 9
    assert sorted(rid for s in stages for rid in s.request_ids) == ids  # each in one shard
    # Between them, the admissions put every shard on the queues
    assert {d.hop.shard_id for a in admitted for d in a.dispatches} == {s.shard_id for s in stages}


def test_concurrent_submits_with_one_idempotency_key_admit_one_request(store_url: str) -> None:
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope
    from workers.store.models import Request

    def submit() -> tuple[str, list[Any]]:
        with session_scope(store_url) as session:
            return admit_one(session, _line("same", key="key-1"), VERSIONS, DriftPolicy.STRICT)

    results = race(4, submit)
    assert len({request_id for request_id, _ in results}) == 1
    with session_scope(store_url) as session:
        assert session.scalar(select(func.count()).select_from(Request)) == 1


def test_a_repeated_idempotency_key_enqueues_again_only_a_never_delivered_first_stage(
        store_url: str) -> None:
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageKey, claim

    with session_scope(store_url) as session:
        request_id, first = admit_one(session, _line("once", key="key-2"), VERSIONS,
                                      DriftPolicy.STRICT, Lane.ONLINE)
    # The first submit's enqueue failed: nothing was delivered, so a resubmit re-dispatches.
    with session_scope(store_url) as session:
        again, dispatches = admit_one(session, _line("once", key="key-2"), VERSIONS,
                                      DriftPolicy.STRICT, Lane.ONLINE)
    assert again == request_id
    assert dispatches == first
    with session_scope(store_url) as session:
        taken = claim(session, StageKey(first[0].hop, Stage.ROUTER),
                      LeaseOwner("host", 1, "task"), lease_s=30)
    assert taken.lease is not None and taken.lease.request_ids == [request_id]
    with session_scope(store_url) as session:
        third, none = admit_one(session, _line("once", key="key-2"), VERSIONS,
                                DriftPolicy.STRICT, Lane.ONLINE)
    assert third == request_id and none == []


def test_the_reconciler_backs_off_a_row_that_stays_pending(store_url: str) -> None:
    from workers.reconciler import backoff_s, find_and_reset
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope
    from workers.store.models import ShardStage

    stall_s = 60.0
    with session_scope(store_url) as session:
        admit_one(session, _line("stalled"), VERSIONS, DriftPolicy.STRICT)

    def age_row(**values: Any) -> None:
        with session_scope(store_url) as session:
            session.execute(update(ShardStage).values(**values))

    def row() -> Any:
        with session_scope(store_url) as session:
            return session.execute(select(ShardStage.redrives, ShardStage.redrive_after)).one()

    def redrive() -> int:
        with session_scope(store_url) as session:
            return len(find_and_reset(session, stall_s))

    assert redrive() == 0  # fresh: not stalled yet
    age_row(created_at=utcnow() - timedelta(seconds=stall_s + 1))
    assert redrive() == 1
    first = row()
    assert first.redrives == 1
    wait = first.redrive_after.replace(tzinfo=None) - utcnow().replace(tzinfo=None)  # SQLite: naive
    assert wait > timedelta(seconds=backoff_s(stall_s, 1) - 5)
    assert redrive() == 0  # backing off, although stall_s has passed since created_at...
    age_row(created_at=utcnow() - timedelta(seconds=10 * stall_s))
    assert redrive() == 0  # ...and still backing off
    age_row(redrive_after=utcnow() - timedelta(seconds=1))
    assert redrive() == 1
    assert row().redrives == 2
    assert backoff_s(stall_s, 2) == 4 * stall_s
    assert backoff_s(stall_s, 50) == backoff_s(stall_s, 5)  # capped
    # An expired lease is re-driven at once, whatever the back-off says.
    age_row(status="running", lease_expires_at=utcnow() - timedelta(seconds=1),
            redrive_after=utcnow() + timedelta(hours=1))
    assert redrive() == 1


def test_a_redrive_the_broker_refuses_holds_back_no_other(
        store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import dispatch
    from workers.reconciler import reconcile_once
    from workers.settings import Settings
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope
    from workers.store.models import ShardStage

    # Given two stalled shard stages, and a broker that refuses the first message (injected)
    with session_scope(store_url) as session:
        for name in ("first", "second"):
            admit_one(session, _line(name), VERSIONS, DriftPolicy.STRICT)
        session.execute(update(ShardStage).values(created_at=utcnow() - timedelta(hours=1)))
    tried: list[str] = []

    def enqueue(redriven: Any, _settings: Any) -> None:
        tried.append(redriven.hop.shard_id)
        if len(tried) == 1:
            raise ConnectionError("broker down")

    monkeypatch.setattr(dispatch, "enqueue", enqueue)
    # When the reconciler runs a pass, the second is still re-driven
    redriven = reconcile_once(Settings(database_url=store_url, data_dir=tmp_path, stall_s=60))

    assert len(tried) == 2
    assert [r.dispatch.hop.shard_id for r in redriven] == tried[1:]


def test_a_commit_after_the_lease_was_taken_over_writes_nothing(store_url: str) -> None:
    """The first delivery's lease on a shard stage runs out and a second delivery claims it:
    the first one's commit raises LeaseLost and leaves no trace (no stage run, no event, no
    next stage); the second one's commit records all three items once."""
    from schemas.events import EventKind
    from schemas.stages import AuditRecord, ItemResult
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, ShardStage, StageRun
    from workers.store.stage_runs import (
        ClaimState,
        Lease,
        LeaseLost,
        LeaseOwner,
        StageCommit,
        StageKey,
        claim,
        commit,
    )

    lines = [_line(f"l-{i}", tenant=f"tenant-{uuid.uuid4().hex[:6]}") for i in range(3)]
    with session_scope(store_url) as session:
        admitted = admit_job(session, name="lease.jsonl", content=uuid.uuid4().bytes,
                             lines=lines, malformed=[], line_numbers=[1, 2, 3],
                             versions=VERSIONS, drift_policy=DriftPolicy.STRICT, shard_size=4)
    key = StageKey(admitted.dispatches[0].hop, Stage.ROUTER)
    first, second = LeaseOwner("host", 1, "first"), LeaseOwner("host", 2, "second")
    with session_scope(store_url) as session:
        taken = claim(session, key, first, lease_s=30).lease
    assert taken is not None and len(taken.request_ids) == 3
    with session_scope(store_url) as session:  # held and live: a second delivery waits
        assert claim(session, key, second, lease_s=30).state == ClaimState.BUSY
    with session_scope(store_url) as session:  # the first lease runs out
        session.execute(update(ShardStage).where(ShardStage.id == taken.id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    with session_scope(store_url) as session:
        retaken = claim(session, key, second, lease_s=30).lease
    assert retaken is not None and retaken.id == taken.id and retaken.deliveries == 2
    assert sorted(retaken.request_ids) == sorted(taken.request_ids)

    def work(owner: LeaseOwner, held: Lease) -> StageCommit:
        results = [ItemResult(request_id=rid, output={"by": owner.task_id})
                   for rid in held.request_ids]
        events = [AuditRecord(request_id=rid, kind=EventKind.ROUTE_DECISION,
                              payload={"by": owner.task_id}) for rid in held.request_ids]
        return StageCommit(key, owner, held, results, events, {}, 0.1)

    with pytest.raises(LeaseLost, match="taken over"), session_scope(store_url) as session:
        commit(session, work(first, taken))
    with session_scope(store_url) as session:
        assert session.scalar(select(func.count()).select_from(StageRun).where(
            StageRun.shard_id == key.hop.shard_id)) == 0
        assert session.scalar(select(func.count()).select_from(ShardStage).where(
            ShardStage.shard_id == key.hop.shard_id,
            ShardStage.stage == Stage.RETRIEVAL.value)) == 0
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.stage == Stage.ROUTER.value,
            AuditEvent.request_id.in_(taken.request_ids))) == 0
    with session_scope(store_url) as session:
        committed = commit(session, work(second, retaken))
    assert sorted(committed.onward) == sorted(taken.request_ids)
    with session_scope(store_url) as session:
        assert claim(session, key, first, lease_s=30).state == ClaimState.DONE
    with session_scope(store_url) as session:
        rows = session.execute(select(StageRun.output, StageRun.deliveries).where(
            StageRun.shard_id == key.hop.shard_id, StageRun.stage == Stage.ROUTER.value)).all()
        assert [tuple(r) for r in rows] == [({"by": "second"}, 2)] * 3
        payloads = session.scalars(select(AuditEvent.payload).where(
            AuditEvent.request_id.in_(taken.request_ids),
            AuditEvent.stage == Stage.ROUTER.value)).all()
        assert payloads == [{"by": "second"}] * 3
        opened = session.scalars(select(ShardStage.request_ids).where(
            ShardStage.shard_id == key.hop.shard_id,
            ShardStage.stage == Stage.RETRIEVAL.value)).all()
        assert [sorted(ids) for ids in opened] == [sorted(taken.request_ids)]


def test_a_resubmitted_key_finds_the_undelivered_first_stage_of_a_replay(
        store_url: str) -> None:
    """After a replay the request's current run is a new shard: a resubmit with its key
    re-dispatches that shard's first stage while no worker has received it, and the audit
    trail shows it waiting there."""
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope
    from workers.store.models import Request
    from workers.store.operators import audit_trail, replay

    with session_scope(store_url) as session:
        request_id, _ = admit_one(session, _line("replayed", key="key-3"), VERSIONS,
                                  DriftPolicy.STRICT, Lane.ONLINE)
    with session_scope(store_url) as session:  # it ended (say it failed) before routing
        session.execute(update(Request).where(Request.id == request_id)
                        .values(status="failed"))
    with session_scope(store_url) as session:
        replayed = replay(session, request_id, Stage.ROUTER, VERSIONS,
                          follow_current_versions=False)
    assert replayed.hop.run == 1
    with session_scope(store_url) as session:
        again, dispatches = admit_one(session, _line("replayed", key="key-3"), VERSIONS,
                                      DriftPolicy.STRICT, Lane.ONLINE)
        waiting = audit_trail(session, request_id)["waiting"]
    assert again == request_id and dispatches == [replayed]
    assert [(s.stage, s.run, s.status, s.deliveries) for s in waiting] == [
        ("router", 1, "pending", 0)]


def test_a_request_cancelled_while_waiting_replays_from_the_stage_that_held_it(
        store_url: str) -> None:
    """Routed, then cancelled while its retrieval shard stage was pending: a replay from
    retrieval reuses the routing (retrieval held it); one from generation, which it never
    reached, is refused."""
    from schemas.stages import ItemResult
    from workers.store.admission import AdmissionError, admit_job
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job, replay
    from workers.store.stage_runs import LeaseOwner, StageCommit, StageKey, claim, commit

    with session_scope(store_url) as session:
        admitted = admit_job(session, name="cancel.jsonl", content=uuid.uuid4().bytes,
                             lines=[_line("waits")], malformed=[], line_numbers=[1],
                             versions=VERSIONS, drift_policy=DriftPolicy.STRICT, shard_size=4)
    key = StageKey(admitted.dispatches[0].hop, Stage.ROUTER)
    owner = LeaseOwner("host", 1, "router")
    with session_scope(store_url) as session:
        lease = claim(session, key, owner, lease_s=30).lease
    assert lease is not None
    (request_id,) = lease.request_ids
    with session_scope(store_url) as session:
        commit(session, StageCommit(key, owner, lease, [ItemResult(
            request_id=request_id, output={"answer_class": "grounded_answer"})], [], {}, 0.1))
    with session_scope(store_url) as session:
        assert cancel_job(session, admitted.job_id) == 1
    with session_scope(store_url) as session, \
            pytest.raises(AdmissionError, match="never reached generation"):
        replay(session, request_id, Stage.GENERATION, VERSIONS, follow_current_versions=False)
    with session_scope(store_url) as session:
        replayed = replay(session, request_id, Stage.RETRIEVAL, VERSIONS,
                          follow_current_versions=False)
    assert (replayed.stage, replayed.hop.run) == (Stage.RETRIEVAL, 1)


def test_bulk_insert_writes_what_an_insert_writes_and_refuses_incomplete_rows(
        store_url: str) -> None:
    """Postgres takes the rows by COPY, SQLite by executemany: the same values come back
    (JSON, None as JSON null, enum members, aware timestamps); a row that leaves out a
    column with a model default is refused rather than stored with NULL."""
    from schemas.events import EventKind
    from workers.store.admission import admit_one
    from workers.store.bulk import insert_rows
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, Request

    with session_scope(store_url) as session:
        request_id, _ = admit_one(session, _line("bulk-1"), VERSIONS, DriftPolicy.STRICT)
    now = utcnow()
    rows = [{"request_id": request_id, "stage": "router", "run": 0, "round": 0,
             "kind": EventKind.ROUTE_DECISION, "payload": {"quote": "it's \"x\"\n\t\\", "n": 1.5,
                                                           "nested": [None, {"k": True}],
                                                           "text": "ünïcode ✓"},
             "created_at": now},
            {"request_id": request_id, "stage": None, "run": 0, "round": 1,
             "kind": EventKind.DRIFT, "payload": None, "created_at": now}]
    with session_scope(store_url) as session:
        insert_rows(session.connection(), AuditEvent.__table__, rows)
    with session_scope(store_url) as session:
        stored = session.execute(select(AuditEvent.stage, AuditEvent.round, AuditEvent.kind,
                                        AuditEvent.payload, AuditEvent.created_at)
                                 .where(AuditEvent.request_id == request_id,
                                        AuditEvent.kind != "admitted")
                                 .order_by(AuditEvent.id)).all()
        assert [(s.stage, s.round, s.kind, s.payload) for s in stored] == [
            ("router", 0, "route_decision", rows[0]["payload"]), (None, 1, "drift", None)]
        assert all(abs((s.created_at.replace(tzinfo=now.tzinfo) - now).total_seconds()) < 1e-3
                   for s in stored)
    with session_scope(store_url) as session, pytest.raises(ValueError, match="created_at"):
        insert_rows(session.connection(), Request.__table__, [{"id": "req-x"}])


def test_bulk_insert_raises_a_duplicate_as_sqlalchemy_does(store_url: str) -> None:
    from sqlalchemy.exc import IntegrityError

    from workers.store.admission import admit_one
    from workers.store.bulk import insert_rows
    from workers.store.engine import session_scope
    from workers.store.models import Tenant

    with session_scope(store_url) as session:
        admit_one(session, _line("dup-1"), VERSIONS, DriftPolicy.STRICT)
    with session_scope(store_url) as session, pytest.raises(IntegrityError):
        insert_rows(session.connection(), Tenant.__table__,
                    [{"id": "acme", "created_at": utcnow()}])


def test_any_of_matches_exactly_the_listed_ids_with_one_statement_for_any_length(
        store_url: str) -> None:
    """A shard's id list binds as one parameter (an array on Postgres, JSON on SQLite): the
    rows listed and no others, none for an empty list, one compiled statement for all."""
    from workers.store.admission import admit_one
    from workers.store.among import any_of
    from workers.store.engine import get_engine, session_scope
    from workers.store.models import Request

    with session_scope(store_url) as session:
        ids = [admit_one(session, _line(f"any-{i}"), VERSIONS, DriftPolicy.STRICT)[0]
               for i in range(4)]
    statements = []
    engine = get_engine(store_url)

    def found(wanted: list[str]) -> set[str]:
        with session_scope(store_url) as session:
            query = select(Request.id).where(any_of(Request.id, wanted))
            statements.append(str(query.compile(dialect=engine.dialect)))
            return set(session.scalars(query))

    assert found(ids[:3] + ["req-unknown", ids[0]]) == set(ids[:3])
    assert found([ids[3]]) == {ids[3]}
    assert found([]) == set()
    assert found(["it's", 'a "quote"', "\\"]) == set()  # values bind, never spliced
    assert len(set(statements)) == 1


def test_any_of_finds_values_that_an_array_literal_would_have_to_quote(store_url: str) -> None:
    """On Postgres the list travels as an array's text: quotes, backslashes, commas, braces,
    blanks, an empty string, a percent sign and the word NULL must each still match exactly
    itself, bound or written into the statement (compiled with `literal_binds`)."""
    from workers.store.among import any_of
    from workers.store.bulk import insert_rows
    from workers.store.engine import get_engine
    from workers.store.models import StageRun

    awkward = ['a "quote"', "back\\slash", "x,y}", "{z", " blank ", "", "NULL", "it's", "50%"]
    plain = ["req-1", "req-2"]
    with get_engine(store_url).begin() as connection:
        insert_rows(connection, StageRun.__table__, [
            {"request_id": value, "shard_id": "shard-1", "stage": "router", "run": 0,
             "round": 0, "status": "done", "deliveries": 1, "created_at": utcnow(),
             "output": {}} for value in awkward + plain])
        query = select(StageRun.request_id).where(any_of(StageRun.request_id,
                                                         [*awkward, "null", "back"]))
        assert sorted(connection.scalars(query)) == sorted(awkward)
        inline = str(query.compile(dialect=connection.dialect,
                                   compile_kwargs={"literal_binds": True}))
        assert "it''s" in inline  # the values are in the text, quoted
        assert sorted(connection.exec_driver_sql(inline).scalars()) == sorted(awkward)
        assert list(connection.scalars(
            select(StageRun.request_id).where(any_of(StageRun.request_id, plain[:1])))) \
            == ["req-1"]


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_any_of_reaches_the_postgres_planner_as_one_constant_array(store_url: str) -> None:
    """The list's parameter is typed `VARCHAR[]` itself, so the server reads the literal once
    and plans with a constant. Text cast to an array in the statement is no constant (the
    cast is only stable): a sequential scan read the whole literal again for every row."""
    from workers.store.among import any_of
    from workers.store.engine import get_engine
    from workers.store.models import Request

    with get_engine(store_url).connect() as connection:
        connection.connection.dbapi_connection.prepare_threshold = 0  # type: ignore[union-attr]
        assert list(connection.scalars(select(Request.id)
                                       .where(any_of(Request.id, ["req-a", 'b "c'])))) == []
        name, types = connection.exec_driver_sql(
            "SELECT name, parameter_types::text FROM pg_prepared_statements "
            "WHERE statement LIKE 'SELECT requests.id%%'").one()
        assert types == '{"character varying[]"}'
        connection.exec_driver_sql("SET enable_indexscan = off")
        connection.exec_driver_sql("SET enable_bitmapscan = off")
        plan = "\n".join(connection.exec_driver_sql(
            f"EXPLAIN EXECUTE {name}('{{\"req-x\",\"req-y\"}}')").scalars())
        assert "Seq Scan" in plan
        assert "= ANY ('{req-x,req-y}'::" in plan, plan


def test_bulk_update_writes_each_rows_values_only_where_its_clauses_hold(store_url: str) -> None:
    """One UPDATE reading a jsonb map of the rows on Postgres, an executemany on SQLite: each
    row gets its own values (text, JSON, NULL, timestamps, integers), a row the extra clause
    excludes and a request not listed keep theirs, and the count says how many changed."""
    from workers.store.admission import admit_one
    from workers.store.bulk import update_rows
    from workers.store.engine import session_scope
    from workers.store.models import Request

    with session_scope(store_url) as session:
        ids = [admit_one(session, _line(f"upd-{i}"), VERSIONS, DriftPolicy.STRICT)[0]
               for i in range(4)]
        session.execute(update(Request).where(Request.id == ids[2]).values(run=1))
    now = utcnow()
    rows = [{"id": rid, "status": "failed", "finished_at": now, "error_class": "E'x",
             "output": f"out \"{n}\"\n\t\\", "citations": [f"c{n}", {"k": None}],
             "prompt_tokens": n, "error_message": None} for n, rid in enumerate(ids[:3])]
    with session_scope(store_url) as session:
        assert update_rows(session.connection(), Request.__table__, "id", rows,
                           Request.run == 0) == 2
        assert update_rows(session.connection(), Request.__table__, "id", []) == 0
    with session_scope(store_url) as session:
        stored = {r.id: r for r in session.execute(
            select(Request.id, Request.status, Request.finished_at, Request.error_class,
                   Request.output, Request.citations, Request.prompt_tokens)
            .where(Request.id.in_(ids)))}
    for n, rid in enumerate(ids[:2]):
        row = stored[rid]
        assert (row.status, row.error_class, row.output, row.citations, row.prompt_tokens) == (
            "failed", "E'x", f"out \"{n}\"\n\t\\", [f"c{n}", {"k": None}], n)
        assert abs((row.finished_at.replace(tzinfo=now.tzinfo) - now).total_seconds()) < 1e-3
    for rid in (ids[2], ids[3]):  # excluded by the clause (run 1), not listed
        assert (stored[rid].status, stored[rid].output, stored[rid].finished_at) == (
            "queued", None, None)


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_a_bulk_update_joins_nothing_so_its_cost_stays_linear_in_the_rows(
        store_url: str) -> None:
    """The plan Postgres makes for a shard's outcomes, with statistics that say almost no
    request is active (a store in service): it reads the requests by their ids and nothing
    else, where a join to the rows ran as a nested loop reading every row once per request."""
    import sqlalchemy as sa
    from sqlalchemy import event

    from workers.store.admission import admit_job
    from workers.store.bulk import update_rows
    from workers.store.engine import get_engine, session_scope
    from workers.store.models import Request

    lines = [_line(f"plan-{i}") for i in range(400)]
    with session_scope(store_url) as session:
        admitted = admit_job(session, name="plan.jsonl", content=uuid.uuid4().bytes,
                             lines=lines, malformed=[], line_numbers=list(range(1, 401)),
                             versions=VERSIONS, drift_policy=DriftPolicy.FOLLOW, shard_size=64)
        ids = list(session.scalars(select(Request.id).where(Request.job_id == admitted.job_id)
                                   .order_by(Request.id)))
        session.execute(update(Request).where(Request.id.in_(ids[64:]))
                        .values(status="succeeded"))
    engine = get_engine(store_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE requests")
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith("UPDATE requests"):
            seen.append((statement, parameters))

    rows = [{"id": rid, "status": "abstained", "finished_at": utcnow(), "output": "o"}
            for rid in ids[:64]]
    event.listen(engine, "before_cursor_execute", capture)
    try:
        with session_scope(store_url) as session:
            assert update_rows(session.connection(), Request.__table__, "id", rows,
                               sa.or_(Request.status == "queued",
                                      Request.status == "running")) == 64
            statement, parameters = seen[-1]
            plan = "\n".join(r[0] for r in session.connection().exec_driver_sql(
                "EXPLAIN " + statement, parameters))
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    assert "Update on requests" in plan
    assert not any(word in plan for word in ("Join", "Nested Loop", "Function Scan")), plan


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_a_shard_read_prepared_while_its_table_was_small_still_uses_the_index_when_it_grows(
        store_url: str) -> None:
    """psycopg prepares a statement after a few runs; Postgres would then keep one generic
    plan for the connection's life, a sequential scan planned on a few rows. The store's
    connections plan each run for its arguments, so the same read uses the index later."""
    from sqlalchemy import text

    from workers.store.among import any_of
    from workers.store.bulk import insert_rows
    from workers.store.engine import get_engine
    from workers.store.models import StageRun

    now = utcnow()

    def rows(first: int, count: int) -> list[dict[str, Any]]:
        return [{"request_id": f"req-{n:08d}", "shard_id": "shard-1", "stage": "router",
                 "run": 0, "round": 0, "status": "done", "deliveries": 1, "created_at": now,
                 "output": {"n": n}} for n in range(first, first + count)]

    engine = get_engine(store_url)
    with engine.begin() as connection:
        insert_rows(connection, StageRun.__table__, rows(0, 20))
    wanted = [f"req-{n:08d}" for n in (3, 7, 11)]
    query = select(StageRun.output).where(any_of(StageRun.request_id, wanted))
    with engine.connect() as reader:
        for _ in range(15):  # prepared, and past the server's five custom plans
            assert len(reader.execute(query).all()) == 3
            reader.commit()
        with engine.begin() as writer:
            insert_rows(writer, StageRun.__table__, rows(20, 20_000))
        scans = text("SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables "
                     "WHERE relname = 'stage_runs'")  # this backend's counts not yet flushed
        before = reader.execute(scans).one()
        assert len(reader.execute(query).all()) == 3
        after = reader.execute(scans).one()
        assert after.seq_scan == before.seq_scan  # a generic plan would scan all 20,020
        assert after.idx_scan > before.idx_scan


def test_version_tuples_are_stored_once_named_by_requests_and_stage_runs_and_trailed(
        store_url: str) -> None:
    """Admission stores the pinned tuple once and every request names it; two shard stages
    served by that same tuple add no row; another tuple adds one; each stage run names its
    own, and the audit trail reads the pin and the served tuples back."""
    from schemas.stages import ItemResult
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope
    from workers.store.models import Request, StageRun, StoredVersionTuple
    from workers.store.operators import audit_trail
    from workers.store.stage_runs import LeaseOwner, StageCommit, StageKey, claim, commit
    from workers.store.tuples import versions_id

    lines = [_line(f"v-{i}") for i in range(4)]
    with session_scope(store_url) as session:
        admitted = admit_job(session, name="served.jsonl", content=uuid.uuid4().bytes,
                             lines=lines, malformed=[], line_numbers=[1, 2, 3, 4],
                             versions=VERSIONS, drift_policy=DriftPolicy.FOLLOW, shard_size=2)
    newer = VERSIONS.model_copy(update={"router": "r2"}).model_dump()
    owner = LeaseOwner("host", 1, "task")
    served_by = {}
    for dispatch, versions in zip(admitted.dispatches, (VERSIONS.model_dump(), newer),
                                  strict=True):
        for stage in (Stage.ROUTER, Stage.RETRIEVAL):
            key = StageKey(dispatch.hop, stage)
            with session_scope(store_url) as session:
                lease = claim(session, key, owner, lease_s=30).lease
            assert lease is not None
            results = [ItemResult(request_id=rid, output={}) for rid in lease.request_ids]
            with session_scope(store_url) as session:
                commit(session, StageCommit(key, owner, lease, results, [], versions, 0.1))
            served_by.update({rid: versions for rid in lease.request_ids})
    with session_scope(store_url) as session:
        stored = dict(session.execute(select(StoredVersionTuple.id, StoredVersionTuple.versions)).all())
        named = session.execute(select(StageRun.request_id, StageRun.served_versions_id)).all()
        pins = set(session.scalars(select(Request.pinned_versions_id)))
        trail = audit_trail(session, named[0].request_id)
    assert stored == {versions_id(VERSIONS.model_dump()): VERSIONS.model_dump(),
                      versions_id(newer): newer}
    assert pins == {versions_id(VERSIONS.model_dump())}
    assert trail["pinned_versions"] == VERSIONS.model_dump()
    assert len(named) == 8
    assert all(vid == versions_id(served_by[rid]) for rid, vid in named)
    assert trail["tuples"][trail["events"][0].payload["versions_id"]] == VERSIONS.model_dump()
    assert [trail["tuples"][s.served_versions_id] for s in trail["stage_runs"]] == [
        served_by[named[0].request_id]] * 2


def test_version_tuples_read_by_id_come_back_whole_when_the_memo_is_full(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that mixes ids read before with new ones returns every stored one, also when
    the per-process memo is cleared to make room; an id the store lacks is left out."""
    from workers.store import tuples
    from workers.store.engine import session_scope

    stored = [VERSIONS.model_copy(update={"model": f"m-{uuid.uuid4().hex}"}).model_dump()
              for _ in range(3)]
    with session_scope(store_url) as session:
        ids = [tuples.store_versions(session.connection(), v, utcnow()) for v in stored]
    monkeypatch.setattr(tuples, "_READ_MAX_TUPLES", 2)
    with session_scope(store_url) as session:
        assert tuples.versions_by_id(session.connection(), ids[:1]) == {ids[0]: stored[0]}
        got = tuples.versions_by_id(session.connection(), [*ids, None, "vt-not-stored"])
        assert got == dict(zip(ids, stored, strict=True))
        assert tuples.versions_by_id(session.connection(), [ids[0]]) == {ids[0]: stored[0]}


def test_a_job_line_whose_key_a_stored_request_holds_is_refused_not_admitted(
        store_url: str, tmp_path: Path) -> None:
    from ops.jobs import export_job
    from workers.settings import Settings
    from workers.store.admission import admit_one, job_counts, stored_malformed
    from workers.store.engine import session_scope
    from workers.store.models import Request

    # Given a request submitted online under key k-1
    with session_scope(store_url) as session:
        online, _ = admit_one(session, _line("online", key="k-1"), VERSIONS, DriftPolicy.FOLLOW)
    lines = [_line("a", key="k-1"), _line("b", key="k-2"), _line("c")]
    content = uuid.uuid4().bytes
    # When a job file whose first line reuses that key is admitted, twice
    first = _admit_all(store_url, lines, content)
    again = _admit_all(store_url, lines, content)
    # Then the line is refused, once, naming the request that holds the key; the others run
    refused = [m for m in first.malformed if m.error_class == "IdempotencyKeyReused"]
    assert [(m.line_no, m.custom_id) for m in refused] == [(1, "a")]
    assert online in refused[0].reason
    assert again.malformed == first.malformed
    with session_scope(store_url) as session:
        assert job_counts(session, first.job_id) == {"queued": 2}
        assert len(stored_malformed(session, first.job_id)) == 1
        admitted = session.scalars(select(Request.custom_id).where(
            Request.job_id == first.job_id)).all()
    assert sorted(admitted) == ["b", "c"]
    # And the export lists the refused line among the errors, with its class
    _, errors_path = export_job(Settings(database_url=store_url, data_dir=tmp_path),
                                first.job_id, tmp_path / "out")
    errors = [json.loads(line) for line in errors_path.read_text().splitlines()]
    assert errors[0]["line"] == 1 and errors[0]["error_class"] == "IdempotencyKeyReused"


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_two_jobs_admitted_at_once_with_one_key_admit_it_once(store_url: str) -> None:
    from workers.store.admission import admit_job
    from workers.store.engine import get_engine, session_scope
    from workers.store.models import Request

    second: list[Any] = []
    # Given a job whose line holds key k-race, admitted but not committed yet
    with session_scope(store_url) as session:
        first = admit_job(session, name="one.jsonl", content=uuid.uuid4().bytes,
                          lines=[_line("one", key="k-race")], malformed=[], line_numbers=[1],
                          versions=VERSIONS, drift_policy=DriftPolicy.FOLLOW, shard_size=2)
        # When another job with the same key and another line is admitted meanwhile: its
        # look for the key's holder finds none, and its insert waits on the first's commit
        other = threading.Thread(target=lambda: second.append(_admit_all(
            store_url, [_line("two", key="k-race"), _line("three")], uuid.uuid4().bytes)))
        other.start()
        wait_for_a_lock_wait(get_engine(store_url), "the second admission")
    other.join(timeout=30)
    # Then the second job refuses its line as a reused key instead of failing whole
    [admitted] = second
    assert [(m.line_no, m.error_class) for m in admitted.malformed] == [
        (1, "IdempotencyKeyReused")]
    with session_scope(store_url) as session:
        stored = session.execute(select(Request.custom_id, Request.job_id, Request.id)).all()
    assert sorted((c, j) for c, j, _ in stored) == [("one", first.job_id),
                                                    ("three", admitted.job_id)]
    holder = next(rid for c, _, rid in stored if c == "one")
    assert f"held by request {holder}" in admitted.malformed[0].reason


def test_a_key_held_by_a_different_request_is_refused_online(store_url: str) -> None:
    from workers.store.admission import AdmissionError, admit_one
    from workers.store.engine import session_scope

    with session_scope(store_url) as session:
        first, _ = admit_one(session, _line("t-1", key="k-9"), VERSIONS, DriftPolicy.FOLLOW)
    with session_scope(store_url) as session:
        same, _ = admit_one(session, _line("t-1", key="k-9"), VERSIONS, DriftPolicy.FOLLOW)
    other = RequestLine.model_validate({
        "custom_id": "t-1", "tenant": "acme", "grants": ["public"], "idempotency_key": "k-9",
        "request": {"kind": "answer", "question": "Delete every ticket?"}})

    assert same == first
    for line in (_line("t-2", key="k-9"), other):
        with pytest.raises(AdmissionError, match=f"held by request {first}"), \
                session_scope(store_url) as session:
            admit_one(session, line, VERSIONS, DriftPolicy.FOLLOW)
