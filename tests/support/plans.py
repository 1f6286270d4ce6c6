"""The statements code sends, and how SQLite plans them: for tests that pin a plan."""

from __future__ import annotations

from typing import Any, Self

from sqlalchemy import Connection, Engine, event


class Statements:
    """Every statement sent through ``target`` (an engine, or one connection) while
    active, with its parameters, as the driver got them (executemany calls left out)."""

    def __init__(self, target: Engine | Connection) -> None:
        self.target = target
        self.seen: list[tuple[str, Any]] = []

    def __enter__(self) -> Self:
        event.listen(self.target, "before_cursor_execute", self._capture)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.target, "before_cursor_execute", self._capture)

    def _capture(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if not many:
            self.seen.append((statement, parameters))


def sqlite_plan(conn: Connection, statement: str, parameters: Any) -> list[str]:
    """The steps of SQLite's ``EXPLAIN QUERY PLAN`` for a captured statement."""
    return [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]
