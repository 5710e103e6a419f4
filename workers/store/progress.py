"""Requests ending, announced: a transaction that ends requests notifies Postgres listeners,
so whoever waits for a job wakes when its requests end instead of polling the store.

NOTIFY is transactional: a listener hears it once the commit is visible, never before it
and never for a transaction rolled back, so a count made on waking sees what woke it. One
channel serves every job; each notification says whose requests ended and how many
(`Ended`), so a job's waiter can tell when the last of them has ended without reading the
store in between, and ignores other jobs. SQLite has no such thing: a waiter there polls at
its interval.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers.store.engine import get_engine

CHANNEL = "sluice_requests_ended"
log = logging.getLogger("sluice.progress")


@dataclass(frozen=True)
class Ended:
    """What one notification says: `count` requests of job `job_id` ended (job None: requests
    of no job, such as upstream systems' online ones). A count of None says that requests of
    the job ended without saying how many: a waiter must look. Requests of no job are named
    (`request_ids`) when there are at most `NAMED_AT_MOST` of them, so that a waiter for one
    of them looks only when it is named; none named means any may have ended.

    The payload is `count:job_id`, or `count::id,id,...` for named requests of no job."""

    job_id: str | None
    count: int | None
    request_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.request_ids and self.job_id is not None:
            raise ValueError("only requests of no job are named")

    def payload(self) -> str:
        count = "?" if self.count is None else str(self.count)
        if self.request_ids:
            return f"{count}::{','.join(self.request_ids)}"
        return f"{count}:{self.job_id or ''}"

    @classmethod
    def parse(cls, payload: str) -> Ended | None:
        """The notification's news, or None where it says nothing readable (an empty
        payload, as earlier versions sent): requests of some job ended."""
        count, colon, rest = payload.partition(":")
        if not colon or not (count == "?" or count.isdigit()):
            return None
        number = None if count == "?" else int(count)
        if rest.startswith(":"):
            return cls(None, number, tuple(n for n in rest[1:].split(",") if n))
        return cls(rest or None, number)

    def may_concern(self, request_id: str, job_id: str | None) -> bool:
        """Whether request `request_id` of job `job_id` (None: of no job) may be among
        those that ended."""
        return self.job_id == job_id and (not self.request_ids or request_id in self.request_ids)


# Postgres caps a payload at 8000 bytes. Request ids are at most 32 characters (the
# column's size): 100 of them with their commas take 3300.
NAMED_AT_MOST = 100


def announce_ended(session: Session, ended: Ended | None = None) -> None:
    """Tell listeners, when this transaction commits, that requests ended in it: `ended` says
    whose and how many, None that it is not known. Call it once per transaction: Postgres
    folds a transaction's identical notifications into one, and a waiter would then miss
    the second count."""
    if session.get_bind().dialect.name == "postgresql":
        payload = ended.payload() if ended is not None else ""
        session.execute(select(func.pg_notify(CHANNEL, payload)))


def _listening_conninfo(url: str) -> str | None:
    """The psycopg connection string of the store at `url`, or None for a store without
    notifications (SQLite)."""
    engine_url = get_engine(url).url
    if engine_url.get_backend_name() != "postgresql":
        return None
    return engine_url.set(drivername="postgresql").render_as_string(hide_password=False)


class EndedListener:
    """Waits until requests end somewhere (Postgres) or an interval passes (SQLite), on a
    connection of its own. `wait` never returns sooner than `min_gap_s` after the previous
    return: a job that ends a request every few milliseconds is looked at at most that
    often, and the notifications that came meanwhile wake it once (those still in flight
    when it reads may wake it once more)."""

    def __init__(self, url: str, min_gap_s: float = 0.02) -> None:
        self.min_gap_s = min_gap_s
        self._last = float("-inf")
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None
        conninfo = _listening_conninfo(url)
        if conninfo is not None:
            conn = psycopg.connect(conninfo, autocommit=True)
            try:
                conn.execute(f"LISTEN {CHANNEL}")
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    def wait(self, timeout_s: float) -> list[Ended | None]:
        """Block until requests ended or `timeout_s` passed: what every notification heard
        says (None for one that names nothing), empty after a timeout."""
        gap = max(0.0, self._last + self.min_gap_s - time.monotonic())
        time.sleep(gap)
        left = max(0.0, timeout_s - gap)
        heard: list[Ended | None] = []
        if self._conn is None:
            time.sleep(left)
        else:  # what came during the gap is there at once; then what else has arrived by now
            notes = list(self._conn.notifies(timeout=left, stop_after=1))
            if notes:
                notes += self._conn.notifies(timeout=0.0)
            heard = [Ended.parse(n.payload) for n in notes]
        self._last = time.monotonic()
        return heard

    def close(self) -> None:
        """Stop listening (closes the connection; idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> EndedListener:
        return self

    def __exit__(self, _type: type[BaseException] | None, _exc: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()


class _Hub:
    """One LISTEN connection of a process to one store, shared by the process's waiters (see
    `hearing`). Its thread hands every notification to every waiter. After it connects again
    (the connection was lost, and notifications with it) it hands each waiter a None, which
    says to look; meanwhile waiters read at their interval. With no waiter for `IDLE_S` it
    closes the connection and stops; the next waiter starts another thread."""

    IDLE_S = 30.0
    RETRY_S = (1.0, 30.0)  # first and longest wait before connecting again (doubling)
    # libpq options: a connection the network silently dropped (a proxy's idle cut without
    # a reset) fails within about a minute instead of listening to nothing for ever.
    CONNECT = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30,
               "keepalives_interval": 10, "keepalives_count": 3}

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._lock = threading.Lock()
        self._waiters: set[_Waiter] = set()
        self._thread: threading.Thread | None = None
        self._idle_since: float | None = None

    def join(self) -> _Waiter:
        waiter = _Waiter()
        with self._lock:
            self._waiters.add(waiter)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sluice-ended-hub",
                                                daemon=True)
                self._thread.start()
        return waiter

    def leave(self, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)

    def _hand_out(self, news: list[Ended | None]) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.put(news)

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                with psycopg.connect(self._conninfo, autocommit=True,
                                     application_name=HUB_APPLICATION, **self.CONNECT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    failures = 0
                    self._hand_out([None])  # whatever ended before this LISTEN went unheard
                    self._listen(conn)
                return
            except Exception:  # noqa: BLE001 -- whatever it was, the waiters must not hang
                if self._retire_if_idle(idle_s=0.0):  # nobody waits: no need to connect again
                    return
                failures += 1
                retry_s = min(self.RETRY_S[0] * 2 ** (failures - 1), self.RETRY_S[1])
                # Once per outage: the next failures of the same outage only wait longer.
                if failures == 1:
                    log.warning("the shared listener lost its connection; connecting again "
                                "(waiters read at their interval meanwhile)", exc_info=True)
                time.sleep(retry_s)

    def _listen(self, conn: psycopg.Connection[Any]) -> None:
        """Hand out what `conn` hears until nobody has waited for `IDLE_S`."""
        while not self._retire_if_idle(idle_s=self.IDLE_S):
            for note in conn.notifies(timeout=1.0):
                self._hand_out([Ended.parse(note.payload)])

    def _retire_if_idle(self, idle_s: float) -> bool:
        """True when this thread is to stop: no waiter has been there for `idle_s` (the
        hub then forgets the thread, and the next waiter starts another), or the hub
        already forgot it."""
        with self._lock:
            if self._thread is not threading.current_thread():
                return True
            if self._waiters:
                self._idle_since = None
                return False
            now = time.monotonic()
            if self._idle_since is None:
                self._idle_since = now
            if now - self._idle_since < idle_s:
                return False
            self._thread, self._idle_since = None, None
            return True


class _Waiter:
    """What one waiter has been handed and not yet taken."""

    KEEP_AT_MOST = 1000  # news a waiter has not taken; past it, one None (look) stands for all

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._news: list[Ended | None] = []

    def put(self, news: list[Ended | None]) -> None:
        with self._ready:
            self._news = self._news + news if len(self._news) < self.KEEP_AT_MOST else [None]
            self._ready.notify()

    def wait(self, timeout_s: float) -> list[Ended | None]:
        """What was handed since the last call, as soon as there is any, or [] after
        `timeout_s`."""
        with self._ready:
            if not self._news:
                self._ready.wait(max(0.0, timeout_s))
            news, self._news = self._news, []
        return news


class PollingOnly:
    """A store without notifications (SQLite): a wait hears nothing and lasts its timeout."""

    def wait(self, timeout_s: float) -> list[Ended | None]:
        time.sleep(max(0.0, timeout_s))
        return []


class Hearing(Protocol):
    def wait(self, timeout_s: float) -> list[Ended | None]:
        """What was heard since the last call, as soon as there is any (None: look), or []
        after `timeout_s`."""


HUB_APPLICATION = "sluice-ended-hub"
_hubs: dict[str, _Hub] = {}
_hubs_lock = threading.Lock()


def _forget_hubs_in_child() -> None:
    """A forked child has none of its parent's threads: it starts hubs of its own."""
    global _hubs_lock
    _hubs.clear()
    _hubs_lock = threading.Lock()


# Registered at import: a process that forks (a prefork pool) may have waited before.
os.register_at_fork(after_in_child=_forget_hubs_in_child)


@contextmanager
def hearing(url: str) -> Iterator[Hearing]:
    """Hear requests end, on the process's one listening connection to the store (Postgres).

    `EndedListener` holds a connection of its own for as long as it waits, which one job's
    waiter can afford and an upstream system waiting for many requests at once from one
    process cannot: each wait would hold a connection that workers need too (Postgres
    allows 100 by default). Here every wait of the process shares one. On SQLite a wait
    hears nothing and lasts its timeout."""
    conninfo = _listening_conninfo(url)
    if conninfo is None:
        yield PollingOnly()
        return
    with _hubs_lock:
        hub = _hubs.get(conninfo)
        if hub is None:
            hub = _hubs[conninfo] = _Hub(conninfo)
    waiter = hub.join()
    try:
        yield waiter
    finally:
        hub.leave(waiter)
