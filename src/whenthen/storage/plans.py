"""Steering the planners: SQLite's, which has no statistics, and PostgreSQL's, which
may have none yet.

SQLite prefers the index that matches the most equality terms of a WHERE clause, and a
primary key that starts with ``workspace_id`` matches ``workspace_id = ?`` as well as a
person's index matches ``profile_id = ?``. Chosen wrongly, one person's rows are found
by walking every row of the workspace. Writing a term as ``+column`` (unary plus) is
SQLite's documented way to keep it from being searched in an index; the row is still
tested. PostgreSQL gets the plain column (its planner has statistics).

PostgreSQL's statistics can be missing (a table nobody analysed yet) or old (taken
before a big send queued its jobs). A queue read, "the first N due rows in the index's
order", is then planned as "read every due row, sort, keep N": a cost that grows with
the backlog. ``in_index_order`` plans such a read with sorting off, so the ordered index
is walked and the read stops at N (ADR 0016).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import ColumnElement, Connection, String
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression


def tested_only(dialect_name: str, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as a term SQLite tests on each row but never searches an index for."""
    if dialect_name == "postgresql":
        return column
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=String())


@contextmanager
def in_index_order(conn: Connection) -> Iterator[None]:
    """The statements run inside are planned without a sort step on PostgreSQL (a
    ``SET LOCAL`` for their transaction, back to the server's setting on leaving);
    nothing on SQLite.

    Only for reads whose ORDER BY an index gives: the planner then walks that index.
    When the body raises, the setting is left as it is: the transaction is failed (a
    statement on it would only raise again and hide the first error) and its rollback
    undoes a ``SET LOCAL``."""
    if conn.dialect.name != "postgresql":
        yield
        return
    conn.exec_driver_sql("SET LOCAL enable_sort = off")
    yield
    conn.exec_driver_sql("SET LOCAL enable_sort TO DEFAULT")


@contextmanager
def by_key_probes(conn: Connection) -> Iterator[None]:
    """The joins of the statements run inside are planned as nested loops on PostgreSQL
    (hash and merge joins off, for their transaction; the server's settings again on
    leaving); nothing on SQLite.

    For a write of a batch's rows by key from one parameter (``UPDATE t FROM
    jsonb_to_recordset(...) WHERE t.id = v.id``): the function's rows are estimated at
    100, and a planner that takes the table for small (up to some 100,000 rows) hashes
    the batch and scans the whole table (ADR 0021). With the joins that need it off, each
    row of the batch probes the key's index. Errors inside are left as in
    :func:`in_index_order`. Inside another ``by_key_probes`` it sends nothing: the
    outermost sets and resets, so a batch's writes share one pair of round trips."""
    if conn.dialect.name != "postgresql" or conn.info.get(_PROBING):
        yield  # SQLite; or inside another: the settings are on already, until it leaves
        return
    conn.exec_driver_sql("SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off")
    conn.info[_PROBING] = True
    try:
        yield
    finally:
        conn.info.pop(_PROBING, None)
    conn.exec_driver_sql("SET LOCAL enable_hashjoin TO DEFAULT; SET LOCAL enable_mergejoin TO DEFAULT")


#: ``Connection.info`` key: ``by_key_probes`` is active on the connection (a batch's
#: writes share one pair of settings round trips).
_PROBING = "whenthen.by_key_probes"
