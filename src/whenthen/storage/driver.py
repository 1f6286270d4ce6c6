"""Writes at the driver's level for the hot paths (the log append, enrollment states and
journal rows, queued messages): SQLAlchemy's per-row parameter work (``construct_params``,
a bind processor per value) cost more than the statements themselves there.

The values are put in the form the column types store by those types' own bind
processors, so nothing reads back differently (each user has a test comparing its stored
rows with SQLAlchemy's own statements). SQLite takes one ``executemany``; PostgreSQL one
statement reading the rows from one JSON document (``jsonb_to_recordset``): psycopg's
``executemany`` sends a statement per row even in pipeline mode
(docs/adr/0006-sqlite-writers-and-driver-level-append.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Float, Numeric
from sqlalchemy.engine import Dialect

from whenthen.storage.metadata import UTCDateTime
from whenthen.storage.plans import by_key_probes


class StoredValues:
    """Turns Python values into the form a dialect's columns store: datetimes through
    ``UTCDateTime``'s bind processor (memoised: a batch's rows share ``now``); on SQLite
    JSON as text by the engine's serializer (on PostgreSQL it stays in the document)."""

    def __init__(self, conn: Connection) -> None:
        dialect = conn.dialect
        self.time = _time_processor(dialect)
        if dialect.name == "postgresql":
            self.dumps: Any = _same  # nested in the batch's one document (orjson, as the engine)
        else:
            self.dumps = _serializer(dialect)
        self.times: dict[datetime, Any] = {}

    def at(self, value: datetime | None) -> Any:
        if value is None:
            return None
        # Equal instants in other zones share the entry: both store the same UTC value.
        found = self.times.get(value, _UNSEEN)
        if found is _UNSEEN:
            found = self.times[value] = self.time(value)
        return found


_UNSEEN: Any = object()

#: ``UTCDateTime``'s bind processor per dialect name: one is made per batch written (per
#: tracking request), and adapting the type to the dialect each time is needless work.
_TIME_PROCESSORS: dict[str, Any] = {}


def _time_processor(dialect: Dialect) -> Any:
    found = _TIME_PROCESSORS.get(dialect.name)
    if found is None:
        found = _TIME_PROCESSORS[dialect.name] = (
            UTCDateTime().dialect_impl(dialect).bind_processor(dialect) or _same
        )
    return found


def _same(value: Any) -> Any:
    return value


def _json_text(value: Any) -> str:
    return json.dumps(value)


def _serializer(dialect: Dialect) -> Any:
    """The engine's JSON serializer (the standard library's when it has none)."""
    return getattr(dialect, "_json_serializer", None) or _json_text


def write_rows(conn: Connection, sql: str, keys: Sequence[str], values: list[tuple[Any, ...]]) -> int:
    """SQLite: one executemany of ``values``; PostgreSQL: one statement over the rows as
    one JSON array of objects with ``keys`` (its one parameter). Returns the rows the
    statement reported."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if conn.dialect.name == "postgresql":
            document = orjson.dumps([dict(zip(keys, row, strict=True)) for row in values])
            cursor.execute(sql, (document.decode("utf-8"),))
        else:
            cursor.executemany(sql, values)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def write_by_key(conn: Connection, sql: str, keys: Sequence[str], rows: list[tuple[Any, ...]]) -> int:
    """PostgreSQL: :func:`write_rows` through a statement that joins the batch's document
    with a table by key (``UPDATE t ... FROM jsonb_to_recordset(...) v WHERE t.key =
    v.key``, or ``DELETE ... USING``), each row's key last. The join is planned as one
    probe of the key per row (``storage.plans.by_key_probes``, ADR 0021), and a key given
    twice keeps its last row: one such statement applies one row per key, where a
    statement per row leaves the last. Returns the rows the statement reported."""
    if len({r[-1] for r in rows}) != len(rows):
        rows = list({r[-1]: r for r in rows}.values())
    with by_key_probes(conn):
        return write_rows(conn, sql, keys, rows)


def copy_rows(conn: Connection, table: str, columns: Sequence[str], values: list[tuple[Any, ...]]) -> None:
    """PostgreSQL only: insert ``values`` with ``COPY table (columns) FROM STDIN``, in
    their order (a serial key follows it), JSON values as text. For plain inserts of
    thousands of rows a batch (the timer step's journal): the server parses COPY's text
    rows in about half the time it takes to take the same rows apart from one JSON
    document (measured: 3,000 journal rows, 19 against 32 ms)."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in values:
                copy.write_row(row)
    finally:
        cursor.close()


def statements(sql: str) -> dict[str, str]:
    """A driver-level statement per dialect name, from its PostgreSQL text (``%s``
    placeholders, JSON parameters cast with ``::jsonb``): on SQLite ``?`` placeholders and
    no cast (JSON is stored as text)."""
    return {"postgresql": sql, "sqlite": _sqlite_form(sql).replace("::jsonb", "")}


def _sqlite_form(sql: str) -> str:
    return sql.replace("%s", "?")


def execute(conn: Connection, statements: dict[str, str], params: tuple[Any, ...]) -> int:
    """One write statement on the driver's own cursor, ``statements`` giving its text per
    dialect name (from :func:`statements`) and ``params`` values already in their stored
    form (``StoredValues``; JSON as text, :func:`json_text`). For a write on every event,
    where SQLAlchemy's execution (compiled parameters, a bind processor per value) cost
    more than the statement. Returns the rows the statement reported."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statements[conn.dialect.name], params)
        return int(cursor.rowcount)
    finally:
        cursor.close()


def execute_each(conn: Connection, statements: dict[str, str], values: list[tuple[Any, ...]]) -> None:
    """One write statement per row on the driver's own cursor (an executemany; psycopg
    sends the rows in one pipeline), ``statements`` from :func:`statements`, values in
    their stored form with JSON as text (:func:`json_dumps`). For updates by key of a few
    rows at a time: on PostgreSQL, :func:`write_rows`' join with the JSON document is
    planned as a hash join over a sequential scan of the table (the function's estimate
    is 100 rows) until the table has some 100,000 rows, 0.3-2 ms a statement; a row
    statement looks its key up in the index. For batches of hundreds of rows,
    :func:`write_by_key` (the join planned as one probe of the key per row) costs less on
    PostgreSQL (ADR 0021)."""
    if not values:
        return
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.executemany(statements[conn.dialect.name], values)
    finally:
        cursor.close()


def json_dumps(conn: Connection) -> Any:
    """The engine's JSON serializer, for JSON parameters cast to JSON in driver-level
    statements."""
    return _serializer(conn.dialect)


def json_text(conn: Connection, value: Any) -> str:
    """A JSON value as the engine writes it (its serializer), for a parameter cast to
    JSON in a driver-level statement."""
    return str(_serializer(conn.dialect)(value))


def first_row(conn: Connection, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The first row of a query written with ``%s`` placeholders, run on the driver's own
    cursor (``?`` on SQLite): for a look-up on every request, where SQLAlchemy's
    execution cost several times the query (the write key's, on each tracking request).
    Values come back as the driver gives them."""
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        if conn.dialect.name != "postgresql":
            sql = _sqlite_form(sql)
        cursor.execute(sql, params)
        row = cursor.fetchone()
        return tuple(row) if row is not None else None
    finally:
        cursor.close()


#: (SQL text, parameter names in order (positional drivers), result processors per
#: column, parameters the statement fixes itself, bind processors by parameter name).
_Compiled = tuple[str, tuple[str, ...] | None, list[Any], dict[str, Any], dict[str, Any]]


class DriverQuery:
    """A prebuilt SQLAlchemy ``select`` run on the driver's own cursor, its rows processed
    by the selected columns' own result processors (datetimes, JSON on SQLite): for a
    read on every event, where SQLAlchemy's execution cost more than the query. The
    statement is compiled once per dialect by SQLAlchemy itself, so its SQL is the one
    SQLAlchemy would send, and each parameter goes through its type's own bind processor
    (a list of ids as one JSON text or array literal, ``storage.id_lists``; a datetime
    as ``UTCDateTime`` stores it), as SQLAlchemy would. Not for expanding parameters."""

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self._compiled: dict[str, _Compiled] = {}

    def _for(self, dialect: Dialect) -> _Compiled:
        found = self._compiled.get(dialect.name)
        if found is None:
            compiled = self.stmt.compile(dialect=dialect)
            positional = tuple(compiled.positiontup) if compiled.positional else None
            processors = [_result_processor(c.type, dialect) for c in self.stmt.selected_columns]
            binders: dict[str, Any] = {}
            for name, bind in compiled.binds.items():
                if bind.expanding:
                    raise ValueError(f"DriverQuery cannot run the expanding parameter {name!r}")
                binder = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if binder is not None:
                    binders[name] = binder
            # Parameters the statement binds itself (e.g. SQLite's ``OFFSET`` after a
            # ``LIMIT``), with their values.
            fixed = {k: v for k, v in compiled.params.items() if v is not None}
            for name, binder in binders.items():
                if name in fixed:
                    fixed[name] = binder(fixed[name])
            found = self._compiled[dialect.name] = (compiled.string, positional, processors, fixed, binders)
        return found

    def _run(self, cursor: Any, dialect: Dialect, params: dict[str, Any]) -> list[Any]:
        sql, positional, processors, fixed, binders = self._for(dialect)
        values = {**fixed, **params} if fixed else dict(params)
        for name, binder in binders.items():
            if name in params:
                values[name] = binder(params[name])
        bound = tuple(values[n] for n in positional) if positional is not None else values
        if _LISTENERS:
            for listener in _LISTENERS:
                listener(sql, bound)
        cursor.execute(sql, bound)
        return processors

    def first(self, conn: Connection, params: dict[str, Any]) -> tuple[Any, ...] | None:
        rows = self._rows(conn, params, one=True)
        return rows[0] if rows else None

    def all(self, conn: Connection, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """Every row, each processed as :meth:`first` processes its one."""
        return self._rows(conn, params, one=False)

    def _rows(self, conn: Connection, params: dict[str, Any], *, one: bool) -> list[tuple[Any, ...]]:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            processors = self._run(cursor, conn.dialect, params)
            rows = cursor.fetchmany(1) if one else cursor.fetchall()
        finally:
            cursor.close()
        return _processed(rows, processors)


#: Called with each ``DriverQuery``'s SQL and bound parameters before it runs, while
#: :func:`recorded` is active.
_LISTENERS: list[Callable[[str, Any], None]] = []


@contextmanager
def recorded(seen: list[tuple[str, Any]]) -> Iterator[None]:
    """While active, every ``DriverQuery`` run (on any connection, in any thread) notes its
    SQL and bound parameters in ``seen`` first: for the tests and benches that explain
    what is sent. These reads go to the driver's cursor, past SQLAlchemy's events."""

    def note(sql: str, values: Any) -> None:
        seen.append((sql, values))

    _LISTENERS.append(note)
    try:
        yield
    finally:
        _LISTENERS.remove(note)


def _processed(rows: list[Any], processors: list[Any]) -> list[tuple[Any, ...]]:
    """The rows as tuples, each value through its column's processor (if it has one).
    Only the columns with a processor are touched: a generator over every column of every
    row cost more than the query on the reads of thousands of rows (a timer batch's)."""
    converted = [(i, p) for i, p in enumerate(processors) if p is not None]
    if not converted:
        return [tuple(row) for row in rows]
    if len(converted) == 1:
        [(i, p)] = converted
        return [(*row[:i], p(row[i]), *row[i + 1 :]) for row in rows]
    out: list[tuple[Any, ...]] = []
    for row in rows:
        values = list(row)
        for i, p in converted:
            values[i] = p(values[i])
        out.append(tuple(values))
    return out


#: The type codes the driver reports for a double precision and a numeric column: a
#: numeric type's result processor on PostgreSQL depends on which one the column is.
_PG_FLOAT, _PG_NUMERIC = 701, 1700


def _result_processor(type_: Any, dialect: Dialect) -> Any:
    """The column type's own result processor (the column type code it needs on
    PostgreSQL for numbers: double precision for a ``Float``, numeric otherwise)."""
    coltype = None
    if dialect.name == "postgresql" and isinstance(type_, (Float, Numeric)):
        coltype = _PG_FLOAT if isinstance(type_, Float) else _PG_NUMERIC
    return type_.dialect_impl(dialect).result_processor(dialect, coltype)
