"""Engines and sessions for the audit store; SQLite gets WAL and a busy timeout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000
# JSON columns hold every stage's output and every audit event's payload: orjson encodes and
# decodes them several times faster than the standard library, and writes the same JSON.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def json_text(value: Any) -> str:
    """A JSON column's text: SQLite stores what the serializer returns, and COPY writes text."""
    return orjson.dumps(value, option=_JSON_OPTIONS).decode()


def _json_bytes(value: Any) -> bytes:
    """psycopg sends bytes as they are."""
    return orjson.dumps(value, option=_JSON_OPTIONS)


def _normalise(url: str) -> str:
    """`postgresql://` means psycopg 3 here, not psycopg2."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _on_sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # SQLAlchemy's `begin` event issues BEGIN itself, instead of pysqlite's implicit one.
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@lru_cache(maxsize=8)
def get_engine(url: str) -> Engine:
    """One engine per URL per process."""
    url = _normalise(url)
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[1]).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                               json_serializer=json_text, json_deserializer=orjson.loads)
        event.listen(engine, "connect", _on_sqlite_connect)
        # Take the write lock at BEGIN, so a read-then-write never dead-ends on upgrade.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5,
                           json_serializer=_json_bytes, json_deserializer=orjson.loads)
    event.listen(engine, "connect", _on_postgres_connect)
    return engine


def _on_postgres_connect(dbapi_conn: Any, _record: Any) -> None:
    """Plan every statement for the arguments it runs with. psycopg prepares a statement on
    the server after a few executions, and Postgres may then keep one generic plan for the
    connection's life: a shard's `id = ANY(...)` planned while the table held a few hundred
    rows stays a sequential scan when it holds millions (nothing re-plans it until an
    ANALYZE, and never where autovacuum is off). A shard stage runs a handful of statements,
    so planning each costs microseconds per shard."""
    autocommit = dbapi_conn.autocommit
    dbapi_conn.autocommit = True
    dbapi_conn.execute("SET plan_cache_mode = force_custom_plan")
    dbapi_conn.autocommit = autocommit


@lru_cache(maxsize=8)
def _sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A short transaction: commit on success, roll back on any error."""
    session = _sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def create_schema(url: str) -> None:
    """Create every table directly (tests and the embedded mode; Alembic elsewhere)."""
    from workers.store.models import Base

    Base.metadata.create_all(get_engine(url))
