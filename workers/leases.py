"""Renewing the leases a worker process holds, from one thread per process.

A stage renews its shard stage's lease every third of the lease's length while it computes,
so that the reconciler takes over only the work of a process that stopped. One thread per
process serves every lease the process holds: a stage task only adds its lease on entry and
removes it on exit, instead of starting and joining a thread of its own. Starting and joining
one took 130-230 us per stage in a quiet process, and about 15.7 ms where another thread of the
process keeps the interpreter busy (the threads pool's other tasks, a generation engine's
scheduler): the new thread waits a switch interval (5 ms) for the interpreter lock to start,
to see its stop event and to be joined. Entering and leaving the keeper take 2-5 us either
way (ops/bench_leases.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from workers.store import stage_runs as runs
from workers.store.engine import session_scope

log = logging.getLogger("sluice.leases")


@dataclass(eq=False)  # held in a set by identity: two holds of one lease stay two
class _Held:
    url: str
    lease_id: int
    owner: runs.LeaseOwner
    lease_s: float
    renew_at_s: float  # time.monotonic() of the next renewal

    def renew(self) -> None:
        try:
            with session_scope(self.url) as session:
                runs.renew_lease(session, self.lease_id, self.owner, self.lease_s)
        except Exception:  # a missed renewal only shortens the lease; the commit re-checks it
            log.warning("lease renewal failed for %s", self.owner, exc_info=True)


class LeaseKeeper:
    """Renews each held lease every third of its length, the first time a third of its
    length after it was added. Its thread starts on first use. A forked child (a prefork
    pool's) starts from an empty keeper: the parent's leases and thread stay the parent's.

    Renewals run one after another: a renewal that waits (on the row lock of a stage commit
    in progress) delays the others by as long, which a third of the lease leaves room for.
    One keeper serves a process for its life (`Runtime.leases`); its thread never stops.
    """

    def __init__(self) -> None:
        self._reset()
        keeper = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reset_in_child(keeper))

    def _reset(self) -> None:
        self._changed = threading.Condition()
        self._held: set[_Held] = set()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, url: str, lease_id: int, owner: runs.LeaseOwner,
                lease_s: float) -> Iterator[None]:
        """Renew the lease while the block runs."""
        held = _Held(url, lease_id, owner, lease_s, time.monotonic() + lease_s / 3)
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._renew_forever, name="lease-keeper",
                                          daemon=True)
                thread.start()
                self._thread = thread
            self._held.add(held)
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                # Gone when this process forked inside the block: the child's keeper is new.
                self._held.discard(held)

    @property
    def held(self) -> int:
        """The number of leases held now."""
        with self._changed:
            return len(self._held)

    def _renew_forever(self) -> None:
        while True:
            try:
                for held in self._next_due():
                    held.renew()  # outside the lock: entering or leaving never waits on it
            except Exception:  # the thread must outlive any one failure, or leases lapse
                log.exception("lease keeper: renewal round failed")
                time.sleep(0.1)

    def _next_due(self) -> list[_Held]:
        """Wait until some held lease is due; return those due, their next renewal set."""
        with self._changed:
            while True:
                now = time.monotonic()
                due = [h for h in self._held if h.renew_at_s <= now]
                if due:
                    for held in due:
                        held.renew_at_s = now + held.lease_s / 3
                    return due
                soonest = min((h.renew_at_s for h in self._held), default=None)
                self._changed.wait(None if soonest is None else soonest - now)


def _reset_in_child(keeper: weakref.ref[LeaseKeeper]) -> None:
    alive = keeper()
    if alive is not None:
        alive._reset()
