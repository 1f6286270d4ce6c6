"""The log's append writes values in the columns' stored form at the driver's level;
what it stores must read back through the ORM types exactly as SQLAlchemy's own insert
of the same row would, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from whenthen.bootstrap import Container
from whenthen.storage import Database
from whenthen.storage.migrate import upgrade
from whenthen.tracking import repository
from whenthen.tracking.tables import events

PAYLOAD: dict[str, Any] = {
    "event": "Order Completed",
    "properties": {"total": 12.5, "name": "caf\u00e9 \u4e2d\u6587", "nested": {"list": [1, None, True]}},
    "emoji": "\U0001f600",
}


def _row(message_id: str, ts: datetime, **over: Any) -> tuple[Any, ...]:
    values: dict[str, Any] = {
        "workspace_id": "ws-append",
        "message_id": message_id,
        "type": "track",
        "event": "Order Completed",
        "user_id": "u-1",
        "anonymous_id": None,
        "timestamp": ts,
        "received_at": ts + timedelta(milliseconds=3),
        "payload": PAYLOAD,
        "partition": 7,
        "state": repository.PENDING,
        **over,
    }
    return tuple(values[c] for c in repository.APPEND_COLUMNS)


def _read(c: Container, message_id: str) -> dict[str, Any]:
    with c.db.read() as conn:
        row = conn.execute(select(events).where(events.c.message_id == message_id)).mappings().one()
    return dict(row)


def test_append_stores_what_the_orm_insert_stores(container: Container) -> None:
    times = [
        datetime(2026, 12, 1, 22, 0, 0, tzinfo=UTC),  # no microseconds
        datetime(2026, 12, 1, 22, 0, 0, 123456, tzinfo=UTC),
        datetime(2001, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=8))),  # not UTC
    ]
    for i, ts in enumerate(times):
        with container.db.write() as conn:
            assert repository.append(conn, [_row(f"fast-{i}", ts, user_id=None, anonymous_id="a-1")]) == 1
            orm = dict(
                zip(
                    repository.APPEND_COLUMNS,
                    _row(f"orm-{i}", ts, user_id=None, anonymous_id="a-1"),
                    strict=True,
                )
            )
            conn.execute(insert(events), [orm])
        fast, slow = _read(container, f"fast-{i}"), _read(container, f"orm-{i}")
        for row in (fast, slow):
            del row["seq"], row["message_id"]
        assert fast == slow
        assert fast["timestamp"] == ts
        assert fast["timestamp"].tzinfo is not None
        assert fast["payload"] == PAYLOAD
        # The stored time text sorts and compares like the ORM's (range reads use it).
        with container.db.read() as conn:
            found = conn.execute(
                select(events.c.message_id).where(
                    events.c.message_id.in_([f"fast-{i}", f"orm-{i}"]), events.c.timestamp == ts
                )
            ).scalars()
            assert sorted(found) == [f"fast-{i}", f"orm-{i}"]


def test_append_counts_only_new_rows(container: Container) -> None:
    ts = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
    with container.db.write() as conn:
        assert repository.append(conn, [_row("m-1", ts), _row("m-2", ts)]) == 2
    with container.db.write() as conn:
        # A known id, a new one, and the new one again within the same call.
        assert repository.append(conn, [_row("m-1", ts), _row("m-3", ts), _row("m-3", ts)]) == 1
        assert repository.append(conn, []) == 0
    with container.db.read() as conn:
        stored = conn.execute(select(events.c.message_id).order_by(events.c.seq)).scalars().all()
    assert stored == ["m-1", "m-2", "m-3"]


def _append_many(url: str, tag: str, count: int) -> None:
    db = Database(url)
    try:
        ts = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
        for i in range(count):
            with db.write() as conn:
                repository.append(conn, [_row(f"{tag}-{i}-{j}", ts) for j in range(5)])
    finally:
        db.dispose()


def test_sqlite_writers_of_several_processes_queue_and_lose_nothing(tmp_path: Path) -> None:
    """Processes queue on the writers' lock file (no busy-handler sleeps, no 'database is
    locked'); every row of each arrives."""
    url = f"sqlite:///{tmp_path / 'multi.db'}"
    db = Database(url)
    upgrade(db)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(url, f"p{n}", 60)) for n in range(3)]
    for p in procs:
        p.start()
    _append_many(url, "main", 60)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with db.read() as conn:
        assert len(conn.execute(select(events.c.seq)).all()) == 4 * 60 * 5
    db.dispose()
    assert (tmp_path / "multi.db.writer-lock").exists()
