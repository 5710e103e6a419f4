"""`column IN (a shard's ids)` as one bound list, not one parameter per id.

`column.in_(ids)` renders a placeholder per id: a statement text of its own for every list
length, which the driver parses again on every execution (psycopg caches the translation of
statements of up to 50 parameters only) and the server plans again. A shard stage reads and
writes its requests by id lists of the shard's size, several times per stage, so here the
list goes as one parameter: `= ANY ($1::VARCHAR[])` with an array literal on Postgres,
`IN (SELECT value FROM json_each(json array))` on SQLite. The statement text stays the same
for any length.

On Postgres the parameter is typed `VARCHAR[]` itself, so that the server reads the literal
once, when the statement is bound, and plans with the array as a constant of known length.
Text cast to an array in the statement (`CAST($1::VARCHAR AS VARCHAR[])`) is no constant:
the array input function is only stable, so the planner does not fold the cast, and a
sequential scan, which the planner picks where its statistics find a table small, parses
the whole literal again for every row it reads (the README has what that cost).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import String, bindparam
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import BindParameter, ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import Boolean, TypeDecorator, TypeEngine, UserDefinedType

from workers.store.engine import json_text


class _ArrayLiteral(UserDefinedType[str]):
    """A Postgres text array's literal, bound as it is and cast to `VARCHAR[]` at the
    placeholder (`$1::VARCHAR[]`): the driver sends the text untyped, and the cast types the
    parameter itself."""

    cache_ok = True
    render_bind_cast = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "VARCHAR[]"

    def literal_processor(self, dialect: Dialect) -> Callable[[str], str]:
        """The literal inline, for a statement compiled with `literal_binds` (one printed
        to be read, or run through the driver): quoted as the dialect quotes any string
        (`%` doubled where the driver takes `%` placeholders), cast as the placeholder is."""
        quoted = String().literal_processor(dialect)
        assert quoted is not None  # every dialect renders a string literal
        return lambda value: f"{quoted(value)}::VARCHAR[]"


class _StringList(TypeDecorator[list[str]]):
    """A list of strings as one parameter: a text array's literal on Postgres (see
    `_ArrayLiteral`), JSON text elsewhere."""

    impl = String
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return _ArrayLiteral()
        return dialect.type_descriptor(String())

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> Any:
        values = list(value or [])
        return array_literal(values) if dialect.name == "postgresql" else json_text(values)


def array_literal(values: list[str]) -> str:
    """Postgres's text form of a text array, every element quoted (so "NULL" stays a string).
    psycopg would dump a Python list element by element in Python, about 1 us per id more
    for a statement of 64 ids (driver and server together, measured)."""
    joined = '","'.join(values)
    if '"' in joined or "\\" in joined:
        joined = '","'.join(v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return '{"' + joined + '"}' if values else "{}"


class AnyOf(ColumnElement[bool]):
    """True where the column's value is one of the bound list's."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a predicate: no `= 1` after it where booleans are ints
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement),
                           ("values", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: ColumnElement[Any], values: Iterable[str]) -> None:
        self.column = column
        self.values: BindParameter[list[str]] = bindparam(None, list(values), type_=_StringList())

    @property
    def _from_objects(self) -> list[Any]:
        return self.column._from_objects


def any_of(column: Any, values: Iterable[str]) -> AnyOf:
    """`column IN values`, with `values` bound as one list (see the module's note)."""
    return AnyOf(column, values)


@compiles(AnyOf)
def _in_json_each(element: AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    return (f"{compiler.process(element.column, **kw)} IN "
            f"(SELECT value FROM json_each({compiler.process(element.values, **kw)}))")


@compiles(AnyOf, "postgresql")
def _equals_any(element: AnyOf, compiler: SQLCompiler, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} = ANY ({compiler.process(element.values, **kw)})"
