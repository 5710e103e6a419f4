"""The version tuples that served stage runs: each stored once, a stage run names it by id.

Every item of a shard stage records the versions that served it, and they are the same for
the whole shard stage (and usually for days). Stored in each row, the tuple's JSON was a
third of a stage run's bytes and of its insert cost; by id it is one short string.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from workers.store.among import any_of
from workers.store.models import ServedVersions


def versions_id(versions: dict[str, Any]) -> str:
    """The tuple's id: a hash of its canonical JSON (the same tuple, the same id)."""
    canonical = orjson.dumps(versions, option=orjson.OPT_SORT_KEYS)
    return "vt-" + hashlib.sha256(canonical).hexdigest()[:24]


def record_served(connection: Connection, versions: dict[str, Any], now: datetime) -> str | None:
    """Store the tuple unless it is stored already; its id (None for no versions)."""
    if not versions:
        return None
    key = versions_id(versions)
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as upsert
    else:
        from sqlalchemy.dialects.sqlite import insert as upsert
    connection.execute(upsert(ServedVersions.__table__)
                       .values(id=key, versions=versions, created_at=now)
                       .on_conflict_do_nothing(index_elements=["id"]))
    return key


def served_versions(session: Session, ids: Iterable[str | None]) -> dict[str, dict[str, Any]]:
    """id -> tuple, for the ids given (None skipped)."""
    wanted = sorted({i for i in ids if i})
    if not wanted:
        return {}
    rows = session.execute(select(ServedVersions.id, ServedVersions.versions)
                           .where(any_of(ServedVersions.id, wanted)))
    return {row.id: row.versions for row in rows}
