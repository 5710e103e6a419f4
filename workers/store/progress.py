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

import time
from dataclasses import dataclass
from types import TracebackType

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers.store.engine import get_engine

CHANNEL = "sluice_requests_ended"


@dataclass(frozen=True)
class Ended:
    """What one notification says: `count` requests of job `job_id` ended (job None: requests
    of no job, such as upstream systems' online ones). A count of None says that requests of
    the job ended without saying how many: a waiter must look."""

    job_id: str | None
    count: int | None

    def payload(self) -> str:
        return f"{'?' if self.count is None else self.count}:{self.job_id or ''}"

    @classmethod
    def parse(cls, payload: str) -> Ended | None:
        """The notification's news, or None where it says nothing readable (an empty
        payload, as earlier versions sent): requests of some job ended."""
        count, colon, job_id = payload.partition(":")
        if not colon or not (count == "?" or count.isdigit()):
            return None
        return cls(job_id or None, None if count == "?" else int(count))


def announce_ended(session: Session, ended: Ended | None = None) -> None:
    """Tell listeners, when this transaction commits, that requests ended in it: `ended` says
    whose and how many, None that it is not known. Call it once per transaction: Postgres
    folds a transaction's identical notifications into one, and a waiter would then miss
    the second count."""
    if session.get_bind().dialect.name == "postgresql":
        payload = ended.payload() if ended is not None else ""
        session.execute(select(func.pg_notify(CHANNEL, payload)))


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
        engine_url = get_engine(url).url
        if engine_url.get_backend_name() == "postgresql":
            conninfo = engine_url.set(drivername="postgresql")
            conn = psycopg.connect(conninfo.render_as_string(hide_password=False),
                                   autocommit=True)
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
