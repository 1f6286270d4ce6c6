"""A claim of ready outbox jobs reads the first ones in the ready index's order and
stops, however long the backlog (a big send queues a job per person): no sort of every
ready job, on SQLite and PostgreSQL, with and without the planner's statistics
(migration 0010; on ``available_at`` alone PostgreSQL sorted the whole backlog)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, select, text

from tests.support.plans import Statements, assert_walks_index
from whenthen.messaging import service
from whenthen.messaging.tables import outbox
from whenthen.storage import Database

NOW = datetime(2026, 12, 7, 9, tzinfo=UTC)
BACKLOG = 20_000
LIMIT = 200


def _fill(conn: Connection) -> None:
    """BACKLOG ready jobs over the hour before NOW, four at each second (the id breaks
    the ties), one done and one not yet available."""
    conn.execute(
        text(
            "INSERT INTO outbox (workspace_id, kind, payload, available_at, attempts, created_at, done_at) "
            "VALUES ('ws', 'email', '{}', :at, 0, :at, :done)"
        ),
        [{"at": NOW - timedelta(seconds=3600 - i // 4), "done": None} for i in range(BACKLOG)]
        + [
            {"at": NOW - timedelta(hours=2), "done": NOW},
            {"at": NOW + timedelta(hours=1), "done": None},
        ],
    )


@pytest.mark.parametrize("analysed", [False, True])
def test_a_claim_reads_the_first_ready_jobs_in_index_order(db: Database, analysed: bool) -> None:
    with db.write() as conn:
        _fill(conn)
        if analysed:
            conn.exec_driver_sql("ANALYZE")
        expected = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT id FROM outbox WHERE done_at IS NULL AND available_at <= :now "
                    "ORDER BY available_at, id LIMIT :n"
                ),
                {"now": NOW, "n": LIMIT},
            )
        ]
    with db.write() as conn, Statements(conn) as seen:
        claimed = service.claim(conn, NOW, limit=LIMIT, lease=timedelta(minutes=5))
    assert [job.id for job in claimed] == expected
    # The claim's statements again, in one transaction, the read explained.
    nodes = assert_walks_index(db, seen, table="outbox", index="ix_outbox_ready", limit=LIMIT)
    if db.engine.dialect.name == "postgresql":
        # Read, locked and hidden in one statement: each job found again by its key.
        [probe] = [n for n in nodes if n.get("Index Name") == "pk_outbox"]
        assert (probe["Node Type"], probe["Actual Loops"]) == ("Index Scan", LIMIT), probe
    with db.read() as conn:
        hidden = conn.execute(select(outbox.c.id, outbox.c.available_at).where(outbox.c.attempts > 0)).all()
    assert {r.id for r in hidden} == set(expected)
    assert {r.available_at for r in hidden} == {NOW + timedelta(minutes=5)}
    assert [job.attempts for job in claimed] == [0] * LIMIT  # the attempts before this one
