"""The statements code sends, and how SQLite plans them: for tests that pin a plan."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Self

from sqlalchemy import Connection, Engine, event

from whenthen.storage.driver import recorded


class Statements:
    """Every statement sent through ``target`` (an engine, or one connection) while
    active, with its parameters, as the driver got them (executemany calls left out);
    and the reads run by a ``storage.driver.DriverQuery`` meanwhile, on any connection
    (they go to the driver's cursor, past SQLAlchemy's events: ``driver.recorded``)."""

    def __init__(self, target: Engine | Connection) -> None:
        self.target = target
        self.seen: list[tuple[str, Any]] = []
        self._driver = recorded(self.seen)

    def __enter__(self) -> Self:
        event.listen(self.target, "before_cursor_execute", self._capture)
        self._driver.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.target, "before_cursor_execute", self._capture)
        self._driver.__exit__(None, None, None)

    def _capture(
        self, conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if not many:
            self.seen.append((statement, parameters))


def sqlite_plan(conn: Connection, statement: str, parameters: Any) -> list[str]:
    """The steps of SQLite's ``EXPLAIN QUERY PLAN`` for a captured statement."""
    return [str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)]


def assert_walks_index(
    db: Any, seen: Statements, *, table: str, index: str, limit: int
) -> list[dict[str, Any]]:
    """The one ``SELECT`` (or ``WITH``: a claim that reads and updates in one statement)
    captured in ``seen`` (a queue read) reads ``table`` through ``index`` in its order,
    with no sort step, and (PostgreSQL, run again under ``EXPLAIN ANALYZE`` after the
    settings sent before it, in a transaction rolled back) reads at most twice ``limit``
    rows however many qualify. Returns the PostgreSQL plan's nodes (none on SQLite)."""
    [(read, parameters)] = [(q, p) for q, p in seen.seen if q.lstrip().startswith(("SELECT", "WITH"))]
    before = [q for q, _ in seen.seen[: [q for q, _ in seen.seen].index(read)]]
    settings = [q for q in before if q.lstrip().startswith("SET")]
    with db.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            steps = sqlite_plan(conn, read, parameters)
            assert any(index in s for s in steps), steps
            assert not any("TEMP B-TREE" in s for s in steps), steps
            return []
        try:
            for setting in settings:
                conn.exec_driver_sql(setting)
            [(doc,)] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + read, parameters).all()
        finally:
            conn.rollback()
    nodes = _nodes(doc[0]["Plan"])
    assert not [n for n in nodes if "Sort" in n["Node Type"]], nodes
    [scan] = [n for n in nodes if n.get("Relation Name") == table and n.get("Index Name") == index]
    assert scan["Node Type"] == "Index Scan", scan
    assert scan["Actual Rows"] <= 2 * limit, scan
    others = [n for n in nodes if n.get("Relation Name") == table and n is not scan]
    assert all(n["Node Type"] in ("Index Scan", "ModifyTable") for n in others), others
    return nodes


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan] + [n for child in plan.get("Plans", []) for n in _nodes(child)]


def relation_scans(plan: dict[str, Any], tables: set[str]) -> Iterator[dict[str, Any]]:
    """The nodes of a PostgreSQL ``EXPLAIN (FORMAT JSON)`` plan that read one of ``tables``."""
    if plan.get("Relation Name") in tables:
        yield plan
    for child in plan.get("Plans", []):
        yield from relation_scans(child, tables)
