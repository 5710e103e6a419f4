"""Waiting for a job: on Postgres a commit that ends requests wakes the waiter (NOTIFY); on
SQLite the waiter counts at its interval. Real databases, no broker, no workers."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from schemas.requests import RequestLine
from schemas.status import DriftPolicy
from schemas.versions import VersionTuple

pytestmark = pytest.mark.integration

VERSIONS = VersionTuple(model="m", prompt="p", router="r", index="i", tool_schemas="t",
                        validators="v", decoding="d", runtime="rt")


def _job(store_url: str, count: int = 3) -> str:
    from workers.store.admission import admit_job
    from workers.store.engine import session_scope

    lines = [RequestLine.model_validate({
        "custom_id": f"wait-{i}", "tenant": "acme", "grants": ["public"],
        "request": {"kind": "answer", "question": "How do I roll back a deploy?"}})
        for i in range(count)]
    with session_scope(store_url) as session:
        return admit_job(session, name="wait.jsonl", content=uuid.uuid4().bytes, lines=lines,
                         malformed=[], line_numbers=list(range(1, count + 1)), versions=VERSIONS,
                         drift_policy=DriftPolicy.FOLLOW, shard_size=2).job_id


def test_a_listener_hears_committed_ends_only_on_postgres(store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job
    from workers.store.progress import EndedListener

    job_id = _job(store_url)
    postgres = store_url.startswith("postgresql")
    with EndedListener(store_url, min_gap_s=0) as ended:
        # Given a transaction that ends the job's requests and then rolls back
        with pytest.raises(RuntimeError), session_scope(store_url) as session:
            assert cancel_job(session, job_id) == 3
            raise RuntimeError("roll back")
        # Then nobody hears of it: the wait runs out
        started = time.monotonic()
        assert ended.wait(0.3) is False
        assert time.monotonic() - started >= 0.3
        # When the same work commits
        with session_scope(store_url) as session:
            assert cancel_job(session, job_id) == 3
        # Then a listener on Postgres hears it; SQLite has no notifications to hear
        assert ended.wait(10 if postgres else 0.1) is postgres


def test_wait_for_job_wakes_when_the_last_requests_end(store_url: str) -> None:
    from ops.jobs import wait_for_job
    from workers.settings import Settings
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job

    job_id = _job(store_url)
    postgres = store_url.startswith("postgresql")
    settings = Settings(database_url=store_url)
    seen: list[tuple[int, int]] = []
    counted = threading.Event()

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        counted.set()

    def end_the_job() -> None:
        counted.wait(20)  # after the waiter's first count
        with session_scope(store_url) as session:
            cancel_job(session, job_id)

    ender = threading.Thread(target=end_the_job)
    ender.start()
    started = time.monotonic()
    # A count a minute apart on Postgres: only the commit's notification can end the wait
    # inside the 20 s limit. SQLite counts every 0.1 s.
    done = wait_for_job(settings, job_id, progress, timeout_s=20,
                        poll_s=60 if postgres else 0.1)
    ender.join()
    assert done is True
    assert time.monotonic() - started < 20
    assert seen[0] == (0, 3) and seen[-1] == (3, 3)


def _online_request(store_url: str) -> tuple[str, Any]:
    """An upstream request admitted as a shard of one; its id and first dispatch."""
    from workers.store.admission import admit_one
    from workers.store.engine import session_scope

    line = RequestLine.model_validate({
        "custom_id": f"ends-{uuid.uuid4().hex[:6]}", "tenant": "acme", "grants": ["public"],
        "request": {"kind": "answer", "question": "How do I roll back a deploy?"}})
    with session_scope(store_url) as session:
        request_id, dispatches = admit_one(session, line, VERSIONS, DriftPolicy.FOLLOW)
    return request_id, dispatches[0]


def _refuse_at_the_router(store_url: str, dispatch: Any, announce: bool = True) -> None:
    """Commit the router stage of `dispatch`'s shard with every request refused."""
    from schemas.stages import ItemResult, Outcome
    from schemas.status import Stage, Status
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageCommit, StageKey, claim, commit

    key = StageKey(dispatch.hop, Stage.ROUTER)
    owner = LeaseOwner("host", 1, "router")
    with session_scope(store_url) as session:
        lease = claim(session, key, owner, lease_s=30).lease
    assert lease is not None
    refused = Outcome(status=Status.REFUSED, error_class="Refused", message="rule")
    with session_scope(store_url) as session:
        commit(session, StageCommit(key, owner, lease, [
            ItemResult(request_id=rid, output={}, outcome=refused) for rid in lease.request_ids],
            [], {}, 0.1, announce=announce))


@pytest.mark.parametrize("announce", [True, False])
def test_a_stage_commit_that_ends_requests_notifies_unless_told_not_to(
        store_url: str, announce: bool) -> None:
    from workers.store.progress import EndedListener

    _, dispatch = _online_request(store_url)
    postgres = store_url.startswith("postgresql")
    with EndedListener(store_url, min_gap_s=0) as ended:
        # When the router commits the shard's one request as refused
        _refuse_at_the_router(store_url, dispatch, announce)
        # Then a listener hears it on Postgres, unless the commit was told not to announce
        assert ended.wait(5 if postgres and announce else 0.3) is (postgres and announce)


def test_a_listener_returns_no_sooner_than_its_gap_after_the_last_return(
        store_url: str) -> None:
    from workers.store.progress import EndedListener

    postgres = store_url.startswith("postgresql")
    with EndedListener(store_url, min_gap_s=0.5) as ended:
        ended.wait(0)
        first = time.monotonic()
        # When requests end right after a return
        _refuse_at_the_router(store_url, _online_request(store_url)[1])
        # Then the next wait still returns only once the gap has passed, having heard them
        assert ended.wait(10 if postgres else 0) is postgres
        assert time.monotonic() - first >= 0.5


def test_the_client_wait_returns_on_the_commit_that_ends_the_request(store_url: str) -> None:
    from ops.client import SluiceClient
    from workers.settings import Settings

    request_id, dispatch = _online_request(store_url)
    client = SluiceClient(Settings(database_url=store_url))
    postgres = store_url.startswith("postgresql")
    looked, read = threading.Event(), client.result

    def result(rid: str) -> Any:
        found = read(rid)
        looked.set()  # the request ends only after the client has seen it queued
        return found

    client.result = result  # type: ignore[method-assign]

    def end_it() -> None:
        looked.wait(20)
        _refuse_at_the_router(store_url, dispatch)

    ender = threading.Thread(target=end_it)
    ender.start()
    # A look a minute apart on Postgres: only the commit's notification ends the wait well
    # inside the 20 s limit (without it, the last look comes at the limit). SQLite looks
    # every 0.1 s.
    started = time.monotonic()
    result = client.wait(request_id, timeout_s=20, poll_s=60 if postgres else 0.1)
    ender.join()
    assert result["status"] == "refused"
    assert time.monotonic() - started < 15
