"""One list of ids as one bound parameter, and statements prebuilt per dialect.

For reads and writes by many ids at once (segment batches, system events for many
people): an expanding ``IN (:a, :b, ...)`` renders and binds one placeholder per id on
every execution and gives a different statement text per list length (so psycopg
parses each afresh); here the list is one parameter and the statement one text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    ColumnElement,
    Dialect,
    Select,
    String,
    TypeDecorator,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
)
from sqlalchemy.dialects import postgresql


class JsonList(TypeDecorator[list[str]]):
    """A list of strings bound as one JSON array (read back with ``json_each``)."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> str | None:
        return None if value is None else orjson.dumps(list(value)).decode()


class ArrayLiteral(TypeDecorator[list[str]]):
    """A list of strings bound as one PostgreSQL array literal (``{"a","b"}``, cast to
    ``VARCHAR[]`` in the statement): psycopg's own list adapter spends ~3 us per element
    in Python, several times the literal's ``join``."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in value)
        return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


def array_param(name: str) -> ColumnElement[Any]:
    return cast(bindparam(name, type_=ArrayLiteral()), postgresql.ARRAY(String()))


def ids_in(dialect_name: str, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
    """``column`` is one of the strings of the list parameter ``name``, bound as ONE
    parameter: ``= ANY(:name)`` (a text array) on PostgreSQL, ``IN (SELECT value FROM
    json_each(:name))`` on SQLite. An expanding ``IN (:a, :b, ...)`` renders and binds one
    placeholder per id on every execution and gives a different statement text per list
    length (so psycopg parses each afresh): in a batch of timers that cost more than
    the statements themselves. Both forms probe the index on ``column`` per id."""
    if dialect_name == "postgresql":
        return column == any_(array_param(name))
    values: Select[Any] = select(literal_column("value")).select_from(
        func.json_each(bindparam(name, type_=JsonList()))
    )
    return column.in_(values)


_T = TypeVar("_T")

#: The dialects statements are prebuilt for.
DIALECTS = ("sqlite", "postgresql")


def per_dialect(build: Callable[[str], _T]) -> dict[str, _T]:
    """``build(dialect_name)`` for each dialect, done once at import (statements used in
    loops are prebuilt: constructing one costs more than a small execution)."""
    return {d: build(d) for d in DIALECTS}
