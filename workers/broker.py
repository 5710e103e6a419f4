"""The embedded broker: kombu's SQLAlchemy transport on SQLite, online lanes drained first.

kombu's virtual transports poll their queues round-robin; Sluice needs every worker to take
online work before batch work, so this channel tries `*.online` queues first on every poll.
Registered as the `sluicesql` transport alias (`sluicesql+sqlite:///path/broker.db`).
"""

from __future__ import annotations

from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport.sqlalchemy import Channel as SQLChannel
from kombu.transport.sqlalchemy import Transport as SQLTransport
from sqlalchemy import event

from workers.store.engine import SQLITE_BUSY_TIMEOUT_MS

POLLING_INTERVAL_S = 0.05


def lane_rank(queue: str) -> int:
    return 0 if queue.endswith(".online") else 1


class OnlineFirstCycle:
    """Tries every consumed queue on each poll, online lanes first."""

    def __init__(self, fun: Callable[..., Any], resources: list[str], predicate: type[Exception]):
        self.fun = fun
        self.resources = resources
        self.predicate = predicate

    def get(self, callback: Callable[..., Any], **kwargs: Any) -> Any:
        for queue in sorted(self.resources, key=lane_rank):
            try:
                return self.fun(queue, callback, **kwargs)
            except self.predicate:
                continue
        raise self.predicate()

    def close(self) -> None:
        self.resources = []


class OnlineFirstChannel(SQLChannel):
    def _reset_cycle(self) -> None:
        self._cycle = OnlineFirstCycle(self._get_and_deliver, self._active_queues, Empty)

    def _engine_from_config(self) -> Any:
        engine = super()._engine_from_config()
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


class Transport(SQLTransport):
    Channel = OnlineFirstChannel
    polling_interval = POLLING_INTERVAL_S


def register() -> None:
    TRANSPORT_ALIASES.setdefault("sluicesql", "workers.broker:Transport")
