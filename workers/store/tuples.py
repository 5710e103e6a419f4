"""Version tuples, each stored once: requests name the tuple pinned at admission by id, stage
runs the tuple that served them.

A tuple is the same for every request of a job and for every item of a shard stage (and
usually for days). Stored in each row, its JSON (about 560 bytes) was a third of a stage
run's bytes and half a request's, written again by every status update of the request and
read again by every stage. A tuple's id is a hash of its content, so a stored tuple never
changes and a process may keep the ones it has read.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select

from workers.store.among import any_of
from workers.store.bulk import upsert
from workers.store.models import StoredVersionTuple

# id -> tuple, of those this process has read: a handful over a process's life. An id names
# the same content in any store, so what was read from one serves for all. Readers take a
# snapshot of what they need; the lock keeps a clear and a refill from interleaving.
_read: dict[str, dict[str, Any]] = {}
_read_lock = threading.Lock()
_READ_MAX_TUPLES = 256


def versions_id(versions: dict[str, Any]) -> str:
    """The tuple's id: a hash of its canonical JSON (the same tuple, the same id)."""
    canonical = orjson.dumps(versions, option=orjson.OPT_SORT_KEYS)
    return "vt-" + hashlib.sha256(canonical).hexdigest()[:24]


def store_versions(connection: Connection, versions: dict[str, Any], now: datetime) -> str:
    """Store the tuple unless it is stored already; its id."""
    key = versions_id(versions)
    connection.execute(upsert(connection, StoredVersionTuple.__table__)
                       .values(id=key, versions=versions, created_at=now)
                       .on_conflict_do_nothing(index_elements=["id"]))
    return key


def versions_by_id(connection: Connection,
                   ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """id -> tuple, for the ids given that the store holds (None skipped); those read before
    come from memory. Treat the tuples returned as read-only: they are shared."""
    wanted = {i for i in ids if i}
    found = {i: known for i in wanted if (known := _read.get(i)) is not None}
    missing = sorted(wanted - found.keys())
    if missing:
        c = StoredVersionTuple.__table__.c
        fresh = {row.id: row.versions for row in connection.execute(
            select(c.id, c.versions).where(any_of(c.id, missing)))}
        with _read_lock:
            if len(_read) + len(fresh) > _READ_MAX_TUPLES:
                _read.clear()
            _read.update(fresh)
        found.update(fresh)
    return found
