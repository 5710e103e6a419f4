"""Writing many rows in one go: COPY and one-statement updates on Postgres, executemany
elsewhere.

Every stage commit appends a stage run per item and several audit events per item, and
admission a request and an event per line. As an executemany, each row is a statement of
its own: bound, planned and executed one at a time by the server, and built one at a time
by the driver. COPY streams the rows into the table in one command, under the same
constraints, triggers and transaction. The rows must be complete: a column left out gets
the database's default, not the model's (so one with a Python-side default is refused).
Updating a row per item (a validation commit ends its whole shard) is likewise one UPDATE,
each row reading its values from one jsonb map of the rows by key. `upsert` is the INSERT
that takes ON CONFLICT clauses, in either dialect.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from operator import itemgetter
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import JSON, Connection, Table, Text, bindparam, cast, func, insert, literal, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from workers.store.among import any_of
from workers.store.engine import json_text


def insert_rows(connection: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert `rows` (dicts with the same keys) into `table` in the connection's transaction."""
    if not rows:
        return
    columns = list(rows[0])
    unset = [c.name for c in table.columns if c.name not in rows[0] and c.default is not None]
    if unset:
        raise ValueError(f"rows for {table.name} leave out {unset}, which have model defaults")
    if connection.dialect.name != "postgresql":
        connection.execute(insert(table), list(rows))
        return
    # A JSON column gets its text, as SQLAlchemy's JSON type sends it (None as JSON null).
    encoded = [isinstance(table.columns[c].type, JSON) for c in columns]
    texts: dict[int, str] = {}  # by object: rows often share one value (a commit's versions)

    def as_text(value: Any) -> str:
        text = texts.get(id(value))  # every value stays alive in `rows` meanwhile
        if text is None:
            text = texts[id(value)] = json_text(value)
        return text

    binary = _binary_types(table, tuple(columns))
    statement = sql.SQL("COPY {} ({}) FROM STDIN{}").format(
        sql.Identifier(table.name), sql.SQL(", ").join(map(sql.Identifier, columns)),
        sql.SQL(" (FORMAT BINARY)" if binary else ""))
    driver = connection.connection.driver_connection
    assert driver is not None
    values_of = itemgetter(*columns)
    as_json = [i for i, is_json in enumerate(encoded) if is_json]
    try:
        with driver.cursor() as cursor, cursor.copy(statement) as copy:
            if binary:
                copy.set_types(binary)
            for row in rows:
                values = list(values_of(row)) if len(columns) > 1 else [row[columns[0]]]
                for i in as_json:
                    values[i] = as_text(values[i])
                copy.write_row(values)
    except psycopg.Error as exc:
        # As SQLAlchemy would raise it (IntegrityError for a duplicate...): callers that
        # catch those, e.g. around a savepoint, must not see the driver's own class.
        raise DBAPIError.instance(statement.as_string(driver), None, exc, psycopg.Error,
                                  dialect=connection.dialect) from exc


# Postgres types of the binary COPY format, by the column type's name in Postgres DDL. A JSON
# value goes as its text, which is what the binary form of `json` is.
_BINARY_TYPES = {"VARCHAR": "text", "TEXT": "text", "JSON": "text", "INTEGER": "int4",
                 "BIGINT": "int8", "SMALLINT": "int2", "FLOAT": "float8",
                 "DOUBLE PRECISION": "float8", "BOOLEAN": "bool",
                 "TIMESTAMP WITH TIME ZONE": "timestamptz",
                 "TIMESTAMP WITHOUT TIME ZONE": "timestamp"}
_POSTGRES = postgresql.dialect()


@lru_cache(maxsize=64)
def _binary_types(table: Table, columns: tuple[str, ...]) -> tuple[str, ...] | None:
    """The binary COPY types of `columns`, or None when one has a type not mapped here (the
    table is then copied as text). In the binary format the server reads each value as its
    type's bytes instead of parsing text, and the driver sends a string without escaping it:
    measured on stage-run rows (16 columns, 1 KB of JSON), 0.95 us of client CPU a row
    against 4.95 as text."""
    names = []
    for name in columns:
        ddl = table.columns[name].type.compile(dialect=_POSTGRES)
        # VARCHAR(n) is text whatever n; any other type with a parameter (FLOAT(24) is a
        # real, NUMERIC(10, 2) no float) is not mapped.
        binary = _BINARY_TYPES.get("VARCHAR" if ddl.startswith("VARCHAR(") else ddl)
        if binary is None:
            return None
        names.append(binary)
    return tuple(names)


def update_rows(connection: Connection, table: Table, key: str, rows: Sequence[dict[str, Any]],
                *where: Any) -> int:
    """For each row (dicts with the same keys): UPDATE `table` SET the row's other columns
    WHERE the `key` column equals the row's `key` value and every `where` clause holds.
    Returns the number of rows updated."""
    if not rows:
        return 0
    columns = [c for c in rows[0] if c != key]
    if connection.dialect.name != "postgresql":
        match = table.c[key] == bindparam(f"{key}_match")
        return connection.execute(
            update(table).where(match, *where).values({c: bindparam(c) for c in columns}),
            [{f"{key}_match": r[key], **{c: r[c] for c in columns}} for r in rows]).rowcount
    # One map from key to row, sent as jsonb: each row finds its values by its own key, so
    # the statement is linear in the shard whatever the planner thinks of the rows. (Joined
    # to json_to_recordset instead, the planner took the few active requests its statistics
    # promise for a one-row outer side and re-read the recordset for every request: 16.5 us
    # of server CPU per row at 64 rows, 50 at 256, against 4.9 and 8.5 this way.)
    given = bindparam("rows", {str(r[key]): r for r in rows}, type_=postgresql.JSONB)
    row = given.op("->", return_type=postgresql.JSONB)(cast(table.c[key], Text))
    values = {c: _json_value(row, c, table.c[c].type) for c in columns}
    # The id list: the rows are found by the key's index, not by a scan.
    return connection.execute(update(table).where(any_of(table.c[key], [r[key] for r in rows]),
                                                  *where).values(values)).rowcount


def _json_value(row: Any, name: str, type_: Any) -> Any:
    """Column `name` of a jsonb row, as `type_`; JSON null is SQL NULL, as json_to_recordset
    reads it."""
    if isinstance(type_, JSON):
        value = row.op("->", return_type=postgresql.JSONB)(literal(name, Text))
        return cast(func.nullif(value, cast(literal("null", Text), postgresql.JSONB)), type_)
    return cast(row.op("->>", return_type=Text)(literal(name, Text)), type_)


def upsert(bind: Session | Connection, target: Any) -> PgInsert | SqliteInsert:
    """An INSERT that can take ON CONFLICT clauses, in the store's dialect."""
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    if engine.dialect.name == "postgresql":
        return pg_insert(target)
    return sqlite_insert(target)
