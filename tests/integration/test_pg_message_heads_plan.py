"""The dispatcher's read of its batch's messages (``messaging.service.heads_by_id``)
finds each id through the messages' primary key on PostgreSQL, whatever the planner
knows: a fresh table without statistics, and the same table analysed. With
``id = ANY(:ids)`` a planner that took the table for small scanned every message and
compared each with every id of the batch (280 ms a batch of 200 at 10,000 messages).
On both databases it answers the heads of the ids that exist."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, insert

from tests.support.plans import relation_scans
from whenthen.messaging import service
from whenthen.messaging.tables import messages
from whenthen.storage import Database
from whenthen.storage.id_lists import ArrayLiteral

NOW = datetime(2026, 12, 7, 8, tzinfo=UTC)
MESSAGES = 5000


def _fill(db: Database) -> None:
    with db.write() as conn:
        conn.execute(
            insert(messages),
            [
                {"id": f"msg_{i:06}", "workspace_id": f"ws-{i % 2}", "profile_id": f"prf_{i % 700:05}",
                 "channel": "email", "idempotency_key": f"key-{i}",
                 "status": "queued" if i % 3 else "sent", "links": [], "created_at": NOW}
                for i in range(MESSAGES)
            ],
        )  # fmt: skip


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    _fill(db)
    yield db
    db.dispose()


def _explain(conn: Connection, ids: list[str]) -> dict[str, Any]:
    sql = service._HEADS["postgresql"].stmt.compile(dialect=conn.dialect).string
    params = {"ids": ArrayLiteral().process_bind_param(ids, conn.dialect)}
    [(doc,)] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).all()
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


IDS = [f"msg_{i:06}" for i in range(7, MESSAGES, 25)] + ["msg_missing"]


@pytest.mark.parametrize("analysed", [False, True])
def test_each_id_is_found_through_the_primary_key(pg: Database, analysed: bool) -> None:
    if analysed:
        with pg.write() as conn:
            conn.exec_driver_sql("ANALYZE messages")
    with pg.read() as conn:
        plan = _explain(conn, IDS)
    scans = list(relation_scans(plan, {"messages"}))
    assert scans, plan
    for scan in scans:
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
        assert scan.get("Rows Removed by Filter", 0) == 0, scan
        # One probe per id asked for, each finding at most its one row.
        assert scan["Actual Loops"] == len(IDS), scan


def test_heads_of_the_ids_that_exist(db: Database) -> None:
    _fill(db)
    with db.read() as conn:
        heads = service.heads_by_id(conn, IDS)
        assert service.heads_by_id(conn, []) == {}
    expected = {
        f"msg_{i:06}": service.MessageHead(
            f"msg_{i:06}", f"ws-{i % 2}", f"prf_{i % 700:05}", "queued" if i % 3 else "sent"
        )
        for i in range(7, MESSAGES, 25)
    }
    assert heads == expected
