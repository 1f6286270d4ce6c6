"""The timer step's read of due enrollments walks ``ix_enrollments_due`` in order and
stops at its limit, however many are due, on SQLite and PostgreSQL, with and without
the planner's statistics (``storage.plans.in_index_order``, ADR 0016). Without it a
PostgreSQL planner with no statistics read every due enrollment and sorted them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, text

from tests.support.plans import Statements, assert_walks_index
from whenthen.journeys import repository
from whenthen.storage import Database

NOW = datetime(2026, 12, 7, 9, tzinfo=UTC)
DUE = 20_000
LIMIT = 200


def _fill(conn: Connection) -> None:
    """DUE active enrollments due over the hour before NOW (ten at each wake time), one
    ended, one waiting for later and one without a timer."""
    rows = [
        {"id": f"en{i:06d}", "status": "active", "wake": NOW - timedelta(seconds=3600 - i // 10)}
        for i in range(DUE)
    ] + [
        {"id": "ended", "status": "completed", "wake": NOW - timedelta(hours=2)},
        {"id": "later", "status": "active", "wake": NOW + timedelta(hours=1)},
        {"id": "no-timer", "status": "active", "wake": None},
    ]
    conn.execute(
        text(
            "INSERT INTO enrollments (id, workspace_id, journey_id, version, profile_id, status, "
            "node, wake_at, entered_at, steps, context, failures, updated_at) VALUES "
            "(:id, 'ws', 'jr', 1, :id, :status, 'wait', :wake, :entered, 0, '{}', 0, :entered)"
        ),
        [{**row, "entered": NOW - timedelta(days=1)} for row in rows],
    )


@pytest.mark.parametrize("analysed", [False, True])
def test_the_due_read_walks_the_timer_index_and_stops_at_its_limit(db: Database, analysed: bool) -> None:
    with db.write() as conn:
        _fill(conn)
        if analysed:
            conn.exec_driver_sql("ANALYZE")
    with db.write() as conn, Statements(conn) as seen:
        due = repository.due(conn, NOW, LIMIT)
        if db.engine.dialect.name == "postgresql":
            # The rest of the transaction is planned as before.
            assert conn.exec_driver_sql("SHOW enable_sort").scalar() == "on"
    assert [row.id for row in due] == [f"en{i:06d}" for i in range(LIMIT)]
    assert_walks_index(db, seen, table="enrollments", index="ix_enrollments_due", limit=LIMIT)
