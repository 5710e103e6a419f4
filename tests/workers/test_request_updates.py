"""How the stage commits rewrite requests: failures stay findable newest first (both backends),
and on Postgres every status update that does not fail a request is a heap-only tuple, one
that writes no index entry. Real databases, no broker, no workers."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from schemas.requests import RequestLine
from schemas.stages import ItemResult, Outcome
from schemas.status import DriftPolicy, Stage, Status
from schemas.versions import VersionTuple

pytestmark = pytest.mark.integration

VERSIONS = VersionTuple(model="m", prompt="p", router="r", index="i", tool_schemas="t",
                        validators="v", decoding="d", runtime="rt")


def _job(store_url: str, count: int, shard_size: int) -> tuple[str, list[Any]]:
    """A job of `count` answer requests; its id and its router dispatches."""
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope

    lines = [RequestLine.model_validate({
        "custom_id": f"upd-{i}", "tenant": "acme", "grants": ["public"],
        "request": {"kind": "answer", "question": "How do I roll back a deploy?"}})
        for i in range(count)]
    with session_scope(store_url) as session:
        admitted = admit_job(session, name="updates.jsonl", content=uuid.uuid4().bytes,
                             lines=lines, malformed=[], line_numbers=list(range(1, count + 1)),
                             versions=VERSIONS, drift_policy=DriftPolicy.FOLLOW,
                             shard_size=shard_size)
    return admitted.job_id, admitted.dispatches


def _commit_router(store_url: str, dispatch: Any, outcomes: dict[int, Outcome | None],
                   count: Callable[[Any], tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """Commit the router stage of `dispatch`'s shard: its n-th request ends with
    `outcomes[n]` (none: it goes on). With `count(session)`, a tuple of counters, return
    how much the commit's statements added to each, read in the commit's transaction."""
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageCommit, StageKey, claim, commit

    key = StageKey(dispatch.hop, Stage.ROUTER)
    owner = LeaseOwner("host", 1, "router")
    with session_scope(store_url) as session:
        lease = claim(session, key, owner, lease_s=30).lease
    assert lease is not None
    results = [ItemResult(request_id=rid, output={}, outcome=outcomes.get(n))
               for n, rid in enumerate(lease.request_ids)]
    queued = frozenset(lease.request_ids)  # the router is the first stage of these runs
    with session_scope(store_url) as session:
        before = count(session) if count is not None else ()
        commit(session, StageCommit(key, owner, lease, results, [], {}, 0.1, queued))
        after = count(session) if count is not None else ()
    return tuple(a - b for a, b in zip(after, before, strict=True))


def _failed(reason: str) -> Outcome:
    return Outcome(status=Status.FAILED, error_class=reason, message=reason)


def test_failures_are_listed_newest_first_until_a_later_run_ends_otherwise(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import Request
    from workers.store.operators import cancel_job, failed_requests, replay

    job_id, dispatches = _job(store_url, 3, 3)
    other_job, other = _job(store_url, 1, 1)
    # Given a shard whose first request fails, whose second is refused and whose third goes on
    _commit_router(store_url, dispatches[0], {
        0: _failed("RouterBroke"),
        1: Outcome(status=Status.REFUSED, error_class="Refused", message="rule")})
    # and, later, the job cancelled (the third fails too) and another job's request failing
    with session_scope(store_url) as session:
        assert cancel_job(session, job_id) == 1
    _commit_router(store_url, other[0], {0: _failed("Elsewhere")})

    def listed(job: str | None = None) -> list[tuple[str, str | None]]:
        with session_scope(store_url) as session:
            return [(r.custom_id, r.error_class) for r in failed_requests(session, job)]

    # Then the failures are listed, the latest first, and the refusal is not
    assert listed() == [("upd-0", "Elsewhere"), ("upd-2", "Cancelled"), ("upd-0", "RouterBroke")]
    assert listed(job_id) == [("upd-2", "Cancelled"), ("upd-0", "RouterBroke")]
    # When the first failure is replayed, it is no failure while its new run is under way
    with session_scope(store_url) as session:
        first = session.query(Request).filter_by(job_id=job_id, custom_id="upd-0").one()
        dispatch = replay(session, first.id, Stage.ROUTER, VERSIONS, False)
        first_id = first.id
    assert listed(job_id) == [("upd-2", "Cancelled")]
    # And once that run is refused, it is no failure at all
    _commit_router(store_url, dispatch, {0: Outcome(status=Status.REFUSED,
                                                    error_class="Refused", message="rule")})
    assert listed(job_id) == [("upd-2", "Cancelled")]
    with session_scope(store_url) as session:
        again = session.get(Request, first_id)
        assert again is not None and again.status == Status.REFUSED
        assert again.failed_at is None and again.finished_at is not None
    assert listed(other_job) == [("upd-0", "Elsewhere")]


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # heap-only tuples
def test_status_updates_that_do_not_fail_a_request_write_no_index_entry(
        store_url: str) -> None:
    import sqlalchemy as sa

    def updates(session: Any) -> tuple[int, ...]:
        """Rows of requests this backend updated and has not reported yet, and how many of
        them heap-only."""
        return tuple(session.execute(sa.text(
            "SELECT pg_stat_get_xact_tuples_updated('requests'::regclass), "
            "pg_stat_get_xact_tuples_hot_updated('requests'::regclass)")).one())

    _, dispatches = _job(store_url, 16, 8)
    # When a first stage commits a shard of 8 requests that all go on (queued -> running),
    # then each new version is a heap-only tuple: no index entry
    assert _commit_router(store_url, dispatches[0], {}, updates) == (8, 8)
    # When a shard's requests end: 4 refused, 2 succeeded, 2 failed
    ends: dict[int, Outcome | None] = {n: Outcome(status=Status.REFUSED, error_class="Refused",
                                                  message="rule") for n in range(4)}
    ends |= {4: Outcome(status=Status.SUCCEEDED), 5: Outcome(status=Status.SUCCEEDED),
             6: _failed("Broke"), 7: _failed("Broke")}
    # Then only the two failures (which set failed_at, an indexed column) get index entries
    assert _commit_router(store_url, dispatches[1], ends, updates) == (8, 6)
