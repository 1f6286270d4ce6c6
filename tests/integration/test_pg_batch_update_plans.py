"""Batch writes by key on PostgreSQL (the dispatcher's ``messaging.service.record_many``
and ``close_jobs``, the pipeline's ``tracking.repository.mark`` and
``profiles.repository.save_activities``: one ``UPDATE ... FROM`` or ``DELETE ... USING
jsonb_to_recordset`` each) find every row of the batch through the table's primary
key, whatever the planner knows: fresh tables without statistics, and the same tables
analysed (``storage.plans.by_key_probes``, ADR 0021).
Left to itself, the planner estimates the function's rows at 100 and, for a table it
takes for small, hashes the batch and reads the whole table."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import Connection, insert

from tests.support.plans import relation_scans
from whenthen.messaging import service
from whenthen.messaging.tables import messages, outbox
from whenthen.profiles import repository as profile_repo
from whenthen.storage import Database
from whenthen.storage.plans import by_key_probes
from whenthen.tracking import repository as tracking_repo

NOW = datetime(2026, 12, 8, 2, tzinfo=UTC)
ROWS = 10_000
BATCH = 200


@pytest.fixture
def pg(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    with db.write() as conn:
        conn.execute(
            insert(messages),
            [
                {"id": f"msg_{i:06}", "workspace_id": "ws", "profile_id": f"prf_{i % 700:05}",
                 "channel": "email", "idempotency_key": f"key-{i}", "status": "queued", "links": [],
                 "created_at": NOW}
                for i in range(ROWS)
            ],
        )  # fmt: skip
        conn.execute(
            insert(outbox),
            [
                {"workspace_id": "ws", "kind": "email", "payload": {"message_id": f"msg_{i:06}"},
                 "available_at": NOW, "attempts": 0, "created_at": NOW}
                for i in range(ROWS)
            ],
        )  # fmt: skip
        conn.exec_driver_sql(
            "INSERT INTO events (workspace_id, message_id, type, event, user_id, timestamp, received_at,"
            " payload, partition, state) SELECT 'ws', 'm' || i, 'track', 'Ping', 'u' || i, now(), now(),"
            " '{}', i %% 64, 0 FROM generate_series(1, %(n)s) i",
            {"n": ROWS},
        )
        conn.exec_driver_sql(
            "INSERT INTO profiles (id, workspace_id, traits, trait_times, event_count, created_at,"
            " updated_at, version) SELECT 'prf_' || lpad(i::text, 6, '0'), 'ws', '{}', '{}', 0, now(),"
            " now(), 1 FROM generate_series(0, %(n)s - 1) i",
            {"n": ROWS},
        )
    yield db
    db.dispose()


def _record(keys: tuple[str, ...]) -> tuple[str, str, list[dict[str, Any]]]:
    rows = [{"status": "sent", "reason": None, "id": f"msg_{i:06}"} for i in range(3, ROWS, ROWS // BATCH)]
    return "messages", service._record_sql_postgresql(keys), rows


def _finish() -> tuple[str, str, list[dict[str, Any]]]:
    rows = [{"done_at": NOW.isoformat(), "last_error": None, "id": i} for i in range(5, ROWS, ROWS // BATCH)]
    return "outbox", service._FINISH_POSTGRESQL, rows


def _retry() -> tuple[str, str, list[dict[str, Any]]]:
    later = (NOW + timedelta(minutes=1)).isoformat()
    rows = [{"available_at": later, "last_error": "421", "id": i} for i in range(7, ROWS, ROWS // BATCH)]
    return "outbox", service._RETRY_POSTGRESQL, rows


def _remove() -> tuple[str, str, list[dict[str, Any]]]:
    rows = [{"id": i} for i in range(9, ROWS, ROWS // BATCH)]
    return "outbox", service._REMOVE_POSTGRESQL, rows


def _mark() -> tuple[str, str, list[dict[str, Any]]]:
    rows = [{"state": 1, "profile_id": "prf_1", "seq": i} for i in range(11, ROWS, ROWS // BATCH)]
    return "events", tracking_repo._MARK_POSTGRESQL, rows


def _activity() -> tuple[str, str, list[dict[str, Any]]]:
    at = NOW.isoformat()
    rows = [
        {"timezone": None, "first_seen": at, "last_seen": at, "event_count": 3, "updated_at": at,
         "id": f"prf_{i:06}"}
        for i in range(13, ROWS, ROWS // BATCH)
    ]  # fmt: skip
    return "profiles", profile_repo._SAVE_ACTIVITIES_POSTGRESQL, rows


WRITES = {
    "pipeline: events marked": _mark,
    "pipeline: activities": _activity,
    "close_jobs: removed": _remove,
    "record_many": lambda: _record(("reason", "status")),
    "close_jobs: finished": _finish,
    "close_jobs: retried": _retry,
}


def _explain(conn: Connection, sql: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    document = orjson.dumps(rows).decode("utf-8")
    [(doc,)] = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, (document,)).all()
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


@pytest.mark.parametrize("analysed", [False, True])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_each_row_of_a_batch_is_found_through_the_primary_key(
    pg: Database, write: str, analysed: bool
) -> None:
    table, sql, rows = WRITES[write]()
    assert len(rows) == BATCH
    if analysed:
        with pg.write() as conn:
            conn.exec_driver_sql("ANALYZE")
    with pg.engine.connect() as conn:
        try:
            with by_key_probes(conn):
                plan = _explain(conn, sql, rows)
        finally:
            conn.rollback()
    [modify] = list(relation_scans(plan, {table}))[:1]
    assert modify["Node Type"] == "ModifyTable", modify
    assert modify["Actual Rows"] == 0, modify  # no RETURNING
    scans = [n for n in relation_scans(plan, {table}) if n["Node Type"] != "ModifyTable"]
    assert len(scans) == 1, scans
    [scan] = scans
    # One probe of the key per row of the batch, each finding its one row.
    assert scan["Node Type"] == "Index Scan", scan
    assert scan["Index Name"] == f"pk_{table}", scan
    assert scan["Actual Loops"] == BATCH, scan
