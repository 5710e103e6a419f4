"""How the stage commits rewrite requests: failures stay findable newest first (both backends),
and on Postgres every status update that does not fail a request is a heap-only tuple, one
that writes no index entry. Real databases, no broker, no workers."""

from __future__ import annotations

from typing import Any

import pytest

from schemas.stages import Outcome
from schemas.status import Stage, Status
from tests.workers.shards import VERSIONS, admit_answers, commit_router

pytestmark = pytest.mark.integration

def _failed(reason: str) -> Outcome:
    return Outcome(status=Status.FAILED, error_class=reason, message=reason)


def test_failures_are_listed_newest_first_until_a_later_run_ends_otherwise(
        store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.models import Request
    from workers.store.operators import cancel_job, failed_requests, replay

    job_id, dispatches = admit_answers(store_url, 3, 3, "upd")
    other_job, other = admit_answers(store_url, 1, 1, "upd")
    # Given a shard whose first request fails, whose second is refused and whose third goes on
    commit_router(store_url, dispatches[0], {
        0: _failed("RouterBroke"),
        1: Outcome(status=Status.REFUSED, error_class="Refused", message="rule")}.get)
    # and, later, the job cancelled (the third fails too) and another job's request failing
    with session_scope(store_url) as session:
        assert cancel_job(session, job_id) == 1
    commit_router(store_url, other[0], {0: _failed("Elsewhere")}.get)

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
    commit_router(store_url, dispatch, {0: Outcome(status=Status.REFUSED,
                                                   error_class="Refused", message="rule")}.get)
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

    _, dispatches = admit_answers(store_url, 16, 8, "upd")
    # When a first stage commits a shard of 8 requests that all go on (queued -> running),
    # then each new version is a heap-only tuple: no index entry
    assert commit_router(store_url, dispatches[0], {}.get, count=updates) == (8, 8)
    # When a shard's requests end: 4 refused, 2 succeeded, 2 failed
    ends: dict[int, Outcome | None] = {n: Outcome(status=Status.REFUSED, error_class="Refused",
                                                  message="rule") for n in range(4)}
    ends |= {4: Outcome(status=Status.SUCCEEDED), 5: Outcome(status=Status.SUCCEEDED),
             6: _failed("Broke"), 7: _failed("Broke")}
    # Then only the two failures (which set failed_at, an indexed column) get index entries
    assert commit_router(store_url, dispatches[1], ends.get, count=updates) == (8, 6)
