"""The lease keeper: one thread per process renews every lease the process holds, for as
long as it holds it, and a forked child renews its own."""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime

import pytest
from sqlalchemy import select

from tests.services import wait_until
from tests.workers.shards import admit_answers

pytestmark = pytest.mark.integration

LEASE_S = 3.0  # renewed every second


def _claimed(store_url: str, count: int) -> list[tuple[int, object]]:
    """`count` shard stages of a new job, each claimed under a lease of LEASE_S by an owner
    of its own: (lease id, owner)."""
    from schemas.status import Stage
    from workers.store.engine import session_scope
    from workers.store.stage_runs import LeaseOwner, StageKey, claim

    _, dispatches = admit_answers(store_url, count, shard_size=1,
                                  name=f"leases-{uuid.uuid4().hex[:8]}")
    leases = []
    for n, dispatch in enumerate(dispatches):
        owner = LeaseOwner("host", os.getpid(), f"task-{n}")
        with session_scope(store_url) as session:
            lease = claim(session, StageKey(dispatch.hop, Stage.ROUTER), owner, LEASE_S).lease
        assert lease is not None
        leases.append((lease.id, owner))
    return leases


def _expiry(store_url: str, lease_id: int) -> datetime:
    from workers.store.engine import session_scope
    from workers.store.models import ShardStage

    with session_scope(store_url) as session:
        expiry = session.scalar(select(ShardStage.lease_expires_at)
                                .where(ShardStage.id == lease_id))
    assert expiry is not None
    return expiry


def _renewed_twice(store_url: str, lease_id: int) -> bool:
    """True once the lease's expiry has moved on twice from when this was first called; an
    AssertionError if the lease lapses meanwhile (renewed too late, or not at all)."""
    from workers.store.timeutil import as_utc, utcnow

    seen = [_expiry(store_url, lease_id)]

    def check() -> bool:
        now = _expiry(store_url, lease_id)
        assert as_utc(now) > utcnow(), f"lease {lease_id} lapsed at {now}"
        if now > seen[-1]:
            seen.append(now)
        return len(seen) >= 3

    return bool(wait_until(check, timeout_s=20, poll_s=0.05, what=f"lease {lease_id} renewed"))


def _keeper_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "lease-keeper")


def test_one_thread_renews_every_held_lease_and_stops_at_release(store_url: str) -> None:
    from workers.leases import LeaseKeeper

    (first, first_owner), (second, second_owner) = _claimed(store_url, 2)
    keeper = LeaseKeeper()
    threads_before = _keeper_threads()
    # Given two leases held at once, each from a thread of its own (as the threads pool does)
    done = threading.Event()
    entered = threading.Barrier(3)

    def hold(lease_id: int, owner: object) -> None:
        with keeper.holding(store_url, lease_id, owner, LEASE_S):  # type: ignore[arg-type]
            entered.wait()
            done.wait(timeout=60)

    holders = [threading.Thread(target=hold, args=args)
               for args in ((first, first_owner), (second, second_owner))]
    for holder in holders:
        holder.start()
    entered.wait()
    # Then one thread renews both
    assert keeper.held == 2
    assert _renewed_twice(store_url, first) and _renewed_twice(store_url, second)
    assert _keeper_threads() == threads_before + 1
    # When the first is released, it is renewed no more, while the second still is
    done.set()
    for holder in holders:
        holder.join(timeout=10)
    assert keeper.held == 0
    (third, third_owner), = _claimed(store_url, 1)
    with keeper.holding(store_url, third, third_owner, LEASE_S):  # type: ignore[arg-type]
        assert _renewed_twice(store_url, third)  # a renewal begun before the release has landed
        released_at = _expiry(store_url, first)
        assert _renewed_twice(store_url, third)
    assert _expiry(store_url, first) == released_at
    assert _keeper_threads() == threads_before + 1  # the same thread served the third


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is what the prefork pool does")
def test_a_forked_child_renews_its_leases_with_a_thread_of_its_own(store_url: str) -> None:
    from workers.leases import LeaseKeeper
    from workers.store.engine import get_engine

    (parents, parent_owner), = _claimed(store_url, 1)
    keeper = LeaseKeeper()
    with keeper.holding(store_url, parents, parent_owner, LEASE_S):  # type: ignore[arg-type]
        assert _renewed_twice(store_url, parents)  # the parent's thread runs
        (childs, child_owner), = _claimed(store_url, 1)
        pid = os.fork()
        if pid == 0:  # the child: what a prefork pool child does with an inherited keeper
            code = 1
            try:
                get_engine(store_url).dispose(close=False)  # the parent's connections stay its
                with keeper.holding(store_url, childs, child_owner,  # type: ignore[arg-type]
                                    LEASE_S):
                    code = 0 if keeper.held == 1 and _renewed_twice(store_url, childs) else 2
            finally:
                os._exit(code)
        status = _wait_for_child(pid, timeout_s=60)
    assert os.waitstatus_to_exitcode(status) == 0


def _wait_for_child(pid: int, timeout_s: float) -> int:
    """The child's wait status; a child still running after `timeout_s` is killed and fails
    the test."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the forked child {pid} did not end within {timeout_s}s")


def test_a_renewal_that_fails_stops_no_other(store_url: str) -> None:
    from workers.leases import LeaseKeeper
    from workers.store.stage_runs import LeaseOwner

    (lease, owner), = _claimed(store_url, 1)
    keeper = LeaseKeeper()
    # Given a lease whose store cannot be reached, held beside one whose store can
    unreachable = "postgresql://postgres@127.0.0.1:1/none"
    with keeper.holding(unreachable, 1, LeaseOwner("host", os.getpid(), "lost"), LEASE_S), \
            keeper.holding(store_url, lease, owner, LEASE_S):  # type: ignore[arg-type]
        # Then the reachable one is renewed on time all the same
        assert _renewed_twice(store_url, lease)
