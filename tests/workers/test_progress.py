"""Waiting for a job: on Postgres a commit that ends requests wakes the waiter (NOTIFY); on
SQLite the waiter counts at its interval. Real databases, no broker, no workers."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from schemas.requests import RequestLine
from schemas.stages import Outcome
from schemas.status import DriftPolicy, Status
from tests.services import wait_until
from tests.workers.shards import VERSIONS, admit_answers, commit_router

pytestmark = pytest.mark.integration


def _job(store_url: str, count: int = 3, shard_size: int = 2) -> str:
    return admit_answers(store_url, count, shard_size, "wait")[0]


def test_a_listener_hears_committed_ends_only_on_postgres(store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job
    from workers.store.progress import Ended, EndedListener

    job_id = _job(store_url)
    postgres = store_url.startswith("postgresql")
    with EndedListener(store_url, min_gap_s=0) as ended:
        # Given a transaction that ends the job's requests and then rolls back
        with pytest.raises(RuntimeError), session_scope(store_url) as session:
            assert cancel_job(session, job_id) == 3
            raise RuntimeError("roll back")
        # Then nobody hears of it: the wait runs out
        started = time.monotonic()
        assert ended.wait(0.3) == []
        assert time.monotonic() - started >= 0.3
        # When the same work commits
        with session_scope(store_url) as session:
            assert cancel_job(session, job_id) == 3
        # Then a listener on Postgres hears that requests of the job ended (a cancel does not
        # say how many); SQLite has no notifications to hear
        assert ended.wait(10 if postgres else 0.1) == ([Ended(job_id, None)] if postgres else [])


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


def _refuse_at_the_router(store_url: str, dispatch: Any, announce: bool = True,
                          refused: int | None = None, name_jobs: bool = True) -> None:
    """Commit the router stage of `dispatch`'s shard with its first `refused` requests
    (default: all) refused and the rest going on."""
    refusal = Outcome(status=Status.REFUSED, error_class="Refused", message="rule")
    commit_router(store_url, dispatch,
                  lambda n: refusal if refused is None or n < refused else None,
                  announce, name_jobs)


@pytest.mark.parametrize("announce", [True, False])
def test_a_stage_commit_that_ends_requests_notifies_unless_told_not_to(
        store_url: str, announce: bool) -> None:
    from workers.store.progress import Ended, EndedListener

    request_id, dispatch = _online_request(store_url)
    postgres = store_url.startswith("postgresql")
    with EndedListener(store_url, min_gap_s=0) as ended:
        # When the router commits the shard's one request (of no job) as refused
        _refuse_at_the_router(store_url, dispatch, announce)
        # Then a listener hears it on Postgres, by id, unless the commit was told not to
        # announce
        heard = ended.wait(5 if postgres and announce else 0.3)
        assert heard == ([Ended(None, 1, (request_id,))] if postgres and announce else [])


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
        assert bool(ended.wait(10 if postgres else 0)) is postgres
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


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_a_stage_commit_says_whose_requests_ended_and_how_many(store_url: str) -> None:
    from workers.store.progress import Ended, EndedListener

    job_id, dispatches = admit_answers(store_url, 3, 3)
    with EndedListener(store_url, min_gap_s=0) as ended:
        # When the router ends two of the shard's three requests and passes one on
        _refuse_at_the_router(store_url, dispatches[0], refused=2)
        # Then the listener hears that two requests of that job ended
        assert ended.wait(5) == [Ended(job_id, 2)]


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_a_job_waiter_reads_the_store_only_when_its_jobs_news_leaves_nothing(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ops.jobs
    from ops.jobs import wait_for_job
    from workers.settings import Settings

    job_id, dispatches = admit_answers(store_url, 3, 1)
    _, elsewhere = admit_answers(store_url, 2, 1)
    reads: list[str] = []

    def counted_read(name: str) -> Any:
        real = getattr(ops.jobs, name)

        def read(*args: Any) -> Any:
            reads.append(name)
            return real(*args)
        return read

    for name in ("job_counts", "job_active"):
        monkeypatch.setattr(ops.jobs, name, counted_read(name))
    seen: list[tuple[int, int]] = []
    counted = threading.Event()

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        counted.set()

    def end_requests() -> None:
        counted.wait(20)  # after the waiter's first count
        for dispatch in elsewhere + dispatches:  # another job's first, then this one's
            _refuse_at_the_router(store_url, dispatch)

    ender = threading.Thread(target=end_requests)
    ender.start()
    # Counts a minute apart: only the news of the commits can end the wait in time
    done = wait_for_job(Settings(database_url=store_url), job_id, progress, timeout_s=20,
                        poll_s=60)
    ender.join()
    # Then the job's ends were taken off its count as they came, the other job's were
    # ignored, and the store was read twice: the first count and the one that found none left
    assert done is True
    assert seen[0] == (0, 3) and seen[-2:] == [(3, 3), (3, 3)]
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert reads == ["job_counts", "job_counts"]


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_news_that_does_not_say_how_many_makes_a_job_waiter_look(store_url: str) -> None:
    from ops.jobs import wait_for_job
    from workers.settings import Settings

    job_id, dispatches = admit_answers(store_url, 2, 2)
    counted = threading.Event()

    def end_them() -> None:
        counted.wait(20)
        # as a stage that fails as a whole commits: its requests' jobs were never loaded
        _refuse_at_the_router(store_url, dispatches[0], name_jobs=False)

    ender = threading.Thread(target=end_them)
    ender.start()
    started = time.monotonic()
    # A count a minute apart: only the look the news asks for ends the wait in time
    done = wait_for_job(Settings(database_url=store_url), job_id,
                        lambda _done, _total: counted.set(), timeout_s=20, poll_s=60)
    ender.join()
    assert done is True and time.monotonic() - started < 15


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_a_commit_counts_the_requests_it_ended_not_those_it_was_given(store_url: str) -> None:
    from workers.store.engine import session_scope
    from workers.store.operators import cancel_job
    from workers.store.progress import Ended, EndedListener

    job_id, dispatches = admit_answers(store_url, 2, 2)
    with EndedListener(store_url, min_gap_s=0) as ended:
        # When the job is cancelled, and then the router commits its requests as refused
        with session_scope(store_url) as session:
            assert cancel_job(session, job_id) == 2
        _refuse_at_the_router(store_url, dispatches[0])
        # Then the cancel said the job's requests ended; the commit, which changed none of
        # them (the cancel had ended them), says none did
        heard = ended.wait(5)
        heard += [] if len(heard) > 1 else ended.wait(5)
        assert heard == [Ended(job_id, None), Ended(job_id, 0)]


@pytest.mark.unit
def test_news_names_requests_of_no_job_and_reads_older_payloads() -> None:
    from workers.store.progress import Ended

    named = Ended(None, 2, ("req-a", "req-b"))
    assert named.payload() == "2::req-a,req-b" and Ended.parse(named.payload()) == named
    assert Ended.parse(Ended("job-1", 3).payload()) == Ended("job-1", 3)
    assert Ended.parse("1:") == Ended(None, 1)  # as commits sent it before names
    assert Ended.parse("?:job:with:colons") == Ended("job:with:colons", None)
    assert Ended.parse("") is None
    with pytest.raises(ValueError, match="no job"):
        Ended("job-1", 1, ("req-a",))
    # A request may be among the ended when the news is of its job (None: of no job) and
    # names it or names nobody
    assert named.may_concern("req-a", None) and not named.may_concern("req-c", None)
    assert Ended(None, 1).may_concern("req-c", None)
    assert not Ended("job-1", 3).may_concern("req-a", None)
    assert Ended("job-1", 3).may_concern("req-a", "job-1")
    assert not Ended("job-2", 3).may_concern("req-a", "job-1")


def _listening(store_url: str) -> list[int]:
    """The backends of this process's shared listener on the test's database."""
    from sqlalchemy import text

    from workers.store.engine import session_scope
    from workers.store.progress import HUB_APPLICATION

    with session_scope(store_url) as session:
        return list(session.scalars(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = :name"), {"name": HUB_APPLICATION}))


class _CountingClient:
    """The Python client with its store reads counted, in the order they came."""

    def __init__(self, store_url: str, **settings: Any) -> None:
        from ops.client import SluiceClient
        from workers.settings import Settings

        self.client = SluiceClient(Settings(database_url=store_url, **settings))
        self.reads: list[str] = []
        read = self.client.result

        def result(request_id: str) -> Any:
            self.reads.append(request_id)
            return read(request_id)

        self.client.result = result  # type: ignore[method-assign]

    def waiting(self, request_id: str, results: dict[str, Any],
                poll_s: float | None = 60) -> threading.Thread:
        """A thread that waits for `request_id`, by default reading the store a minute apart
        at most: a wait that ends well within the minute ended on news."""
        def wait() -> None:
            results[request_id] = self.client.wait(request_id, timeout_s=60, poll_s=poll_s)

        thread = threading.Thread(target=wait)
        thread.start()
        return thread


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_the_client_waits_of_a_process_share_one_listening_connection(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.store import progress

    monkeypatch.setattr(progress._Hub, "IDLE_S", 0.5)
    online = dict(_online_request(store_url) for _ in range(6))
    client = _CountingClient(store_url)
    results: dict[str, Any] = {}
    started = time.monotonic()
    # Given six waits under way in threads of this process, each past its first read
    threads = [client.waiting(request_id, results) for request_id in online]
    wait_until(lambda: set(client.reads) == set(online), 20, 0.05)
    # Then one connection listens for all of them
    assert len(_listening(store_url)) == 1
    # When each request ends
    for dispatch in online.values():
        _refuse_at_the_router(store_url, dispatch)
    for thread in threads:
        thread.join(60)
    # Then each wait returned its request's end, on the news, not at its next read
    assert {rid: r["status"] for rid, r in results.items()} == dict.fromkeys(online, "refused")
    assert time.monotonic() - started < 30
    # And with nobody left waiting, the listener hangs up
    wait_until(lambda: not _listening(store_url), 10, 0.05, "the listener to hang up")


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_a_client_wait_reads_the_store_only_on_news_that_may_concern_its_request(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.store import progress

    (mine, my_dispatch), *others = [_online_request(store_url) for _ in range(4)]
    # What the wait is handed, and when it is back waiting for more, in order
    steps: list[int | str] = []
    hand = progress._Waiter.wait

    def wait(self: Any, timeout_s: float) -> list[Any]:
        steps.append("waiting")
        news = hand(self, timeout_s)
        steps.append(len(news))
        return news

    monkeypatch.setattr(progress._Waiter, "wait", wait)
    client = _CountingClient(store_url)
    results: dict[str, Any] = {}
    started = time.monotonic()
    thread = client.waiting(mine, results)
    # Given the wait's first read, and its second on the listener's first word (look:
    # whatever ended before it listened went unheard)
    wait_until(lambda: len(client.reads) == 2 and steps[-1] == "waiting", 20, 0.05)
    # When three other requests of no job end, each commit naming its own
    for _, dispatch in others:
        _refuse_at_the_router(store_url, dispatch)
    # Then the wait takes the three pieces of news and waits on without reading
    wait_until(lambda: sum(n for n in steps if n != "waiting") >= 4 and steps[-1] == "waiting",
               20, 0.05)
    assert client.reads == [mine, mine]
    # When its own request ends, it reads once more and returns, on the news
    _refuse_at_the_router(store_url, my_dispatch)
    thread.join(60)
    assert client.reads == [mine] * 3 and results[mine]["status"] == "refused"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_a_client_wait_for_a_request_of_a_job_wakes_on_the_jobs_news(store_url: str) -> None:
    from sqlalchemy import select

    from workers.store.engine import session_scope
    from workers.store.models import Request

    # A batch line replayed with `sluice replay --wait` is waited for by the client
    job_id, (dispatch,) = admit_answers(store_url, 1, 1)
    with session_scope(store_url) as session:
        request_id = session.scalars(select(Request.id).where(Request.job_id == job_id)).one()
    client = _CountingClient(store_url)
    results: dict[str, Any] = {}
    started = time.monotonic()
    thread = client.waiting(request_id, results)
    wait_until(lambda: client.reads, 20, 0.05)
    # When the router ends it (the commit's news names its job, not the request)
    _refuse_at_the_router(store_url, dispatch)
    thread.join(60)
    # Then the wait returned on that news
    assert results[request_id]["status"] == "refused"
    assert time.monotonic() - started < 30


def test_a_client_wait_reads_often_where_commits_do_not_notify(store_url: str) -> None:
    request_id, dispatch = _online_request(store_url)
    client = _CountingClient(store_url, notify_ends=False)
    results: dict[str, Any] = {}
    thread = client.waiting(request_id, results, poll_s=None)  # the default interval
    wait_until(lambda: client.reads, 20, 0.05)
    # When the request ends in a commit that tells no listener
    ended = time.monotonic()
    _refuse_at_the_router(store_url, dispatch, announce=False)
    thread.join(60)
    # Then the wait still sees it within its short interval (0.2 s), not the 5 s one that
    # serves where commits notify
    assert results[request_id]["status"] == "refused"
    assert time.monotonic() - ended < 3


@pytest.mark.parametrize("empty_store_url", ["postgres"], indirect=True)  # NOTIFY
def test_the_shared_listener_connects_again_when_its_connection_is_killed(
        store_url: str) -> None:
    from sqlalchemy import text

    from workers.store.engine import session_scope

    request_id, dispatch = _online_request(store_url)
    client = _CountingClient(store_url)
    results: dict[str, Any] = {}
    started = time.monotonic()
    thread = client.waiting(request_id, results)
    (first,) = wait_until(lambda: _listening(store_url), 20, 0.05)
    # When the listening connection is killed (a Postgres restart, an operator)
    with session_scope(store_url) as session:
        assert session.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
    # Then another one listens in its place, and the wait still ends on the commit's news
    wait_until(lambda: [pid for pid in _listening(store_url) if pid != first], 20, 0.05)
    _refuse_at_the_router(store_url, dispatch)
    thread.join(60)
    assert results[request_id]["status"] == "refused"
    assert time.monotonic() - started < 30


@pytest.mark.unit
def test_a_commit_names_at_most_so_many_requests_of_no_job() -> None:
    from workers.store.progress import NAMED_AT_MOST, Ended
    from workers.store.stage_runs import _news

    ids = [f"req-{n:028d}" for n in range(NAMED_AT_MOST + 1)]
    # Up to the cap, requests of no job are named; past it, none are (every waiter looks)
    assert _news(frozenset({None}), NAMED_AT_MOST, ids[:-1]) == Ended(None, NAMED_AT_MOST,
                                                                       tuple(ids[:-1]))
    assert _news(frozenset({None}), len(ids), ids) == Ended(None, len(ids))
    # The named payload fits Postgres's 8000 bytes with ids as long as the column allows
    assert len(Ended(None, NAMED_AT_MOST, tuple(ids[:-1])).payload()) < 8000
    # A job's news names no request; claimed requests of several jobs make no news to tell
    assert _news(frozenset({"job-1"}), 2, ids[:2]) == Ended("job-1", 2)
    assert _news(frozenset({"job-1", None}), 2, ids[:2]) is None
