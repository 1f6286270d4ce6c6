"""Steering SQLite's planner, which has no statistics.

SQLite prefers the index that matches the most equality terms of a WHERE clause, and a
primary key that starts with ``workspace_id`` matches ``workspace_id = ?`` as well as a
person's index matches ``profile_id = ?``. Chosen wrongly, one person's rows are found
by walking every row of the workspace. Writing a term as ``+column`` (unary plus) is
SQLite's documented way to keep it from being searched in an index; the row is still
tested. PostgreSQL gets the plain column (its planner has statistics).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, String
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import UnaryExpression


def tested_only(dialect_name: str, column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``column`` as a term SQLite tests on each row but never searches an index for."""
    if dialect_name == "postgresql":
        return column
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=String())
