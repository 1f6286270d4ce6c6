"""One list of ids as one bound parameter, and statements prebuilt per dialect.

For reads and writes by many ids at once (segment batches, system events for many
people): an expanding ``IN (:a, :b, ...)`` renders and binds one placeholder per id on
every execution and gives a different statement text per list length (so psycopg
parses each afresh); here the list is one parameter and the statement one text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson
from sqlalchemy import (
    ColumnElement,
    Dialect,
    Select,
    String,
    Table,
    TypeDecorator,
    any_,
    bindparam,
    cast,
    func,
    literal_column,
    select,
    true,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.util import ClauseAdapter


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


def by_ids(
    dialect_name: str,
    table: Table,
    key: str,
    name: str,
    columns: Sequence[ColumnElement[Any]],
    *where: ColumnElement[bool],
    order_by: Sequence[str] = (),
    lock: bool = False,
) -> Select[Any]:
    """``SELECT columns FROM table WHERE table.key`` is one of the list parameter
    ``name`` ``AND where``: the rows of ``table`` whose ``key`` is among the ids.

    On SQLite ``ids_in``. On PostgreSQL each id is looked up on its own (a ``LATERAL``
    subquery per element of the id array, kept apart by ``OFFSET 0``): one index probe per
    id whatever the planner knows. With ``key = ANY(:ids)`` a planner that takes the
    table for small (no statistics yet, statistics from before it grew, or a mid-sized
    workspace) scans the rows and compares each with every id of the list: 200-1,200 ms
    a statement for 300 ids at 10,000 people (``tests/integration/test_pg_id_list_plans.py``).
    The result columns keep their names (``order_by`` names some of them); ``lock``: the
    rows locked, skipping those another transaction holds (``FOR UPDATE SKIP LOCKED``)."""
    if dialect_name != "postgresql":
        stmt = select(*columns).where(ids_in(dialect_name, table.c[key], name), *where)
        if order_by:
            stmt = stmt.order_by(*(stmt.selected_columns[n] for n in order_by))
        return stmt.with_for_update(skip_locked=True) if lock else stmt
    ids = func.unnest(array_param(name)).table_valued("id").render_derived(name=f"{name}_each")
    alias = table.alias(f"{table.name}_one")
    adapt = ClauseAdapter(alias).traverse
    inner = select(*(adapt(c) for c in columns)).where(alias.c[key] == ids.c.id, *(adapt(w) for w in where))
    if lock:
        inner = inner.with_for_update(skip_locked=True)
    probe = inner.offset(literal_column("0")).lateral(f"{table.name}_probe")
    stmt = select(*probe.c).select_from(ids.join(probe, true()))
    if order_by:
        stmt = stmt.order_by(*(probe.c[n] for n in order_by))
    return stmt


_T = TypeVar("_T")

#: The dialects statements are prebuilt for.
DIALECTS = ("sqlite", "postgresql")


def per_dialect(build: Callable[[str], _T]) -> dict[str, _T]:
    """``build(dialect_name)`` for each dialect, done once at import (statements used in
    loops are prebuilt: constructing one costs more than a small execution)."""
    return {d: build(d) for d in DIALECTS}
