"""Recovery paths around the stage commits: replays after repair rounds, a cancel that meets
a commit, a commit of a superseded run, a validation redelivered before it sent its drafts
back, and which errors are retried. Real databases, no broker, no workers."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import select, text

from schemas.stages import ItemResult, Outcome
from schemas.status import Lane, Stage, Status
from tests.services import wait_for_a_lock_wait
from tests.workers.shards import VERSIONS, admit_answers, claim_stage, commit_stage

pytestmark = pytest.mark.integration


def _onward(_: int, rid: str) -> ItemResult:
    return ItemResult(request_id=rid, output={"stage": "output"})


def _through_generation(store_url: str, name: str) -> tuple[str, Any]:
    """A one-request job routed, retrieved and drafted (round 0); its id and router hop."""
    job_id, (dispatch,) = admit_answers(store_url, 1, 1, name)
    for stage in (Stage.ROUTER, Stage.RETRIEVAL, Stage.GENERATION):
        commit_stage(store_url, dispatch.hop, stage, _onward)
    return job_id, dispatch.hop


def _round(hop: Any, number: int) -> Any:
    return hop.model_copy(update={"round": number})


def test_a_replay_from_validation_after_a_repair_round_judges_the_last_draft(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import StageRun
    from workers.store.operators import replay

    # Given a draft sent back once, redrafted, and then failed by validation
    _, hop = _through_generation(store_url, "repaired")
    commit_stage(store_url, hop, Stage.VALIDATION,
                 lambda _, rid: ItemResult(request_id=rid, output={"verdict": 0}, repair=True))
    commit_stage(store_url, _round(hop, 1), Stage.GENERATION,
                 lambda _, rid: ItemResult(request_id=rid, output={"draft": "second"}))
    commit_stage(store_url, _round(hop, 1), Stage.VALIDATION, lambda _, rid: ItemResult(
        request_id=rid, output={"verdict": 1},
        outcome=Outcome(status=Status.FAILED, error_class="Unsupported", message="no")))
    with session_scope(store_url) as session:
        (request_id,) = session.scalars(select(StageRun.request_id).distinct()).all()
    # When it is replayed from validation
    with session_scope(store_url) as session:
        replayed = replay(session, request_id, Stage.VALIDATION, VERSIONS,
                          follow_current_versions=False)
    # Then the new run starts from the second draft, one output per earlier stage
    with session_scope(store_url) as session:
        copied = session.execute(select(StageRun.stage, StageRun.round, StageRun.output).where(
            StageRun.run == replayed.hop.run)).all()
    assert sorted((stage, round_) for stage, round_, _ in copied) == [
        ("generation", 0), ("retrieval", 0), ("router", 0)]
    assert {stage: output for stage, _, output in copied}["generation"] == {"draft": "second"}


def test_a_replay_past_a_stage_that_ended_the_request_in_a_later_round_is_refused(
        store_url: str) -> None:
    from workers.store.admission import AdmissionError
    from workers.store.engine import session_scope
    from workers.store.models import StageRun
    from workers.store.operators import replay

    # Given a draft sent back, whose redraft failed in generation (round 1)
    _, hop = _through_generation(store_url, "redraft-failed")
    commit_stage(store_url, hop, Stage.VALIDATION,
                 lambda _, rid: ItemResult(request_id=rid, output={}, repair=True))
    commit_stage(store_url, _round(hop, 1), Stage.GENERATION, lambda _, rid: ItemResult(
        request_id=rid, output={"error": "oom"},
        outcome=Outcome(status=Status.FAILED, error_class="OutOfMemory", message="oom")))
    with session_scope(store_url) as session:
        (request_id,) = session.scalars(select(StageRun.request_id).distinct()).all()
    # Then validation, which judged only the first draft, cannot be replayed past it
    with session_scope(store_url) as session, pytest.raises(
            AdmissionError, match="generation ended the request .failed. in round 1"):
        replay(session, request_id, Stage.VALIDATION, VERSIONS, follow_current_versions=False)
    with session_scope(store_url) as session:
        assert replay(session, request_id, Stage.GENERATION, VERSIONS,
                      follow_current_versions=False).hop.run == 1


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)
def test_a_cancel_that_meets_a_commit_ending_a_request_leaves_its_outcome(
        store_url: str) -> None:
    from workers.store.engine import get_engine, session_scope
    from workers.store.models import AuditEvent, Request
    from workers.store.operators import cancel_job
    from workers.store.stage_runs import StageCommit, commit

    job_id, hop = _through_generation(store_url, "meets")
    key, owner, lease, _ = claim_stage(store_url, hop, Stage.VALIDATION)
    (request_id,) = lease.request_ids
    cancelled: list[int] = []
    # Given a validation commit that has ended the request but not committed yet
    with session_scope(store_url) as session:
        commit(session, StageCommit(key, owner, lease, [ItemResult(
            request_id=request_id, output={}, final_text="done",
            outcome=Outcome(status=Status.SUCCEEDED))], [], {}, 0.1))
        # When the job is cancelled meanwhile: the cancel waits on the request's row
        canceller = threading.Thread(target=lambda: cancelled.append(
            _cancel(store_url, job_id, cancel_job)))
        canceller.start()
        wait_for_a_lock_wait(get_engine(store_url), "the cancel")
    canceller.join(timeout=30)
    # Then the commit's outcome stands, and nothing was cancelled or recorded as cancelled
    assert cancelled == [0]
    with session_scope(store_url) as session:
        status, output = session.execute(select(Request.status, Request.output)
                                         .where(Request.id == request_id)).one()
        kinds = session.scalars(select(AuditEvent.kind)
                                .where(AuditEvent.request_id == request_id)).all()
    assert (status, output) == ("succeeded", "done")
    assert "cancelled" not in kinds


def _cancel(store_url: str, job_id: str, cancel_job: Any) -> int:
    from workers.store.engine import session_scope

    with session_scope(store_url) as session:
        count: int = cancel_job(session, job_id)
        return count


def test_a_commit_of_a_superseded_run_leaves_the_replayed_request_queued(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import Request
    from workers.store.operators import cancel_job, replay
    from workers.store.stage_runs import StageCommit, commit

    job_id, (dispatch,) = admit_answers(store_url, 1, 1, "superseded")
    # Given run 0's router, which loaded the request while it was queued
    key, owner, lease, states = claim_stage(store_url, dispatch.hop, Stage.ROUTER)
    (request_id,) = lease.request_ids
    # When the job is cancelled and the request replayed (run 1, queued) before it commits
    with session_scope(store_url) as session:
        cancel_job(session, job_id)
    with session_scope(store_url) as session:
        replay(session, request_id, Stage.ROUTER, VERSIONS, follow_current_versions=False)
    with session_scope(store_url) as session:
        commit(session, StageCommit(key, owner, lease, [_onward(0, request_id)], [], {}, 0.1,
                                    frozenset(states)))
    # Then the new run's request is still queued: no stage of run 1 has started
    with session_scope(store_url) as session:
        assert session.execute(select(Request.status, Request.run)
                               .where(Request.id == request_id)).one() == ("queued", 1)


def test_a_validation_redelivered_before_it_sent_drafts_back_finds_them(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageKey, claim, repair_waiting

    _, hop = _through_generation(store_url, "unsent")
    key = StageKey(hop, Stage.VALIDATION)
    # Given a validation commit that sent its draft back: generation round 1 is pending
    commit_stage(store_url, hop, Stage.VALIDATION,
                 lambda _, rid: ItemResult(request_id=rid, output={}, repair=True))
    with session_scope(store_url) as session:
        waiting = repair_waiting(session, key)
    # When generation claims that round, the repair is no longer waiting to be sent
    with session_scope(store_url) as session:
        assert claim(session, StageKey(_round(hop, 1), Stage.GENERATION),
                     LeaseOwner("host", 1, "generation"), lease_s=30).lease is not None
        taken = repair_waiting(session, key)

    assert waiting == (Lane.BATCH.value, 1)
    assert taken is None
    with session_scope(store_url) as session:  # no other stage sends drafts back
        assert repair_waiting(session, StageKey(hop, Stage.GENERATION)) is None


@pytest.mark.unit
@pytest.mark.parametrize("error", [
    "redis.exceptions.TimeoutError", "redis.exceptions.ConnectionError",
    "sqlalchemy.exc.TimeoutError", "sqlalchemy.exc.DisconnectionError",
    "sqlalchemy.exc.OperationalError", "kombu.exceptions.OperationalError",
    "tasks.engine.types.BackendUnavailable"])
def test_the_drivers_timeouts_and_lost_connections_are_retried(error: str) -> None:
    import importlib

    from workers.base import TRANSIENT_ERRORS

    module, _, name = error.rpartition(".")
    assert issubclass(getattr(importlib.import_module(module), name), TRANSIENT_ERRORS)


@pytest.mark.unit
def test_a_backend_that_answers_but_cannot_serve_the_configuration_is_not_retried() -> None:
    from tasks.engine.types import BackendMisconfigured
    from workers.base import TRANSIENT_ERRORS

    assert not issubclass(BackendMisconfigured, TRANSIENT_ERRORS)


def test_a_stage_failing_for_good_leaves_a_request_cancelled_meanwhile_as_it_was(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import AuditEvent, Request, StageRun
    from workers.store.stage_runs import fail_claimed

    _, (dispatch,) = admit_answers(store_url, 2, 2, "fails-for-good")
    key, owner, lease, _ = claim_stage(store_url, dispatch.hop, Stage.ROUTER)
    going, cancelled = lease.request_ids
    # Given a shard's router whose second request was cancelled after the claim
    with session_scope(store_url) as session:
        session.execute(text("update requests set status = 'failed', error_class = "
                             "'Cancelled' where id = :id"), {"id": cancelled})
    # When the stage fails permanently
    with session_scope(store_url) as session:
        fail_claimed(session, key, owner, lease, Outcome(
            status=Status.FAILED, error_class="KeyError", message="'rules'"))
    # Then only the active request fails, on the record; the cancelled one is untouched
    with session_scope(store_url) as session:
        statuses = {rid: (status, error) for rid, status, error in session.execute(
            select(Request.id, Request.status, Request.error_class))}
        runs = dict(session.execute(select(StageRun.request_id, StageRun.outcome_status)).all())
        failed_events = session.scalars(select(AuditEvent.request_id).where(
            AuditEvent.kind == "stage_failed")).all()
    assert statuses == {going: ("failed", "KeyError"), cancelled: ("failed", "Cancelled")}
    assert runs == {going: "failed", cancelled: None}
    assert failed_events == [going]
