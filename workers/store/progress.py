"""Requests ending, announced: a transaction that ends requests notifies Postgres listeners,
so whoever waits for a job wakes when its requests end instead of polling the store.

NOTIFY is transactional: a listener hears it once the commit is visible, never before it
and never for a transaction rolled back, so a count made on waking sees what woke it. One
channel serves every job (the notification names none; a waiter counts its own job), and
Postgres folds a transaction's repeats into one. SQLite has no such thing: a waiter there
polls at its interval.
"""

from __future__ import annotations

import time
from types import TracebackType

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from workers.store.engine import get_engine

CHANNEL = "sluice_requests_ended"


def announce_ended(session: Session) -> None:
    """Tell listeners, when this transaction commits, that requests ended in it."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_notify(CHANNEL, "")))


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

    def wait(self, timeout_s: float) -> bool:
        """Block until requests ended (True) or `timeout_s` passed (False)."""
        gap = max(0.0, self._last + self.min_gap_s - time.monotonic())
        time.sleep(gap)
        left = max(0.0, timeout_s - gap)
        if self._conn is None:
            time.sleep(left)
            heard = False
        else:  # what came during the gap is there at once; the rest waits for the next call
            heard = bool(list(self._conn.notifies(timeout=left, stop_after=1)))
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
