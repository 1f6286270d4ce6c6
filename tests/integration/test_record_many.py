"""``messaging.record_many`` and ``close_jobs`` write at the driver's level; the rows must
read back as :func:`record` and the single-job functions (SQLAlchemy's statements) leave
them, on SQLite and PostgreSQL: every column a record writes, times in any zone, JSON with
non-ASCII text, a JSON null, a message recorded twice in one batch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from tests.support.workspace import make_workspace
from whenthen import messaging
from whenthen.bootstrap import Container
from whenthen.messaging import service
from whenthen.messaging.tables import messages, outbox

SENT_AT = datetime(2026, 12, 4, 22, 0, 0, 123456, tzinfo=timezone(timedelta(hours=8)))


def _records(tag: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (
            f"msg-{tag}-0",
            {
                "status": "sent",
                "reason": None,
                "recipient": "ana@example.com",
                "subject": "Caf\u00e9 \u4e2d\u6587",
                "body_html": "<p>\u00e9</p>",
                "body_text": "\u00e9",
                "links": ["https://example.com/a?x=1&y=\u00e9"],
                "attempts": 1,
                "response": {"smtp": "250 OK: queued \u00e9"},
                "sent_at": SENT_AT,
            },
        ),
        (f"msg-{tag}-1", {"status": "retrying", "reason": "421 try later", "attempts": 2}),
        (f"msg-{tag}-2", {"status": "skipped", "reason": "unsubscribed"}),
        (f"msg-{tag}-3", {"status": "sent", "response": None, "attempts": 1}),  # JSON null
        (f"msg-{tag}-1", {"status": "failed", "reason": "550 no such user", "attempts": 3}),  # again
    ]


def _queue(c: Container, ws: str, tag: str, now: datetime) -> list[int]:
    items = [
        messaging.Queued(
            ws=ws,
            channel="email",
            message_id=f"msg-{tag}-{n}",
            idempotency_key=f"key-{tag}-{n}",
            profile_id=f"p{n}",
            journey_id=None,
            enrollment_id=None,
            node=None,
            payload={"tag": tag},
        )
        for n in range(4)
    ]
    with c.db.write() as conn:
        assert messaging.enqueue_many(conn, items, now) == 4
        return [
            int(r.id) for r in conn.execute(select(outbox.c.id, outbox.c.payload)) if r.payload["tag"] == tag
        ]


def _messages(c: Container, tag: str) -> list[dict[str, Any]]:
    with c.db.read() as conn:
        rows = conn.execute(
            select(messages).where(messages.c.id.like(f"msg-{tag}-%")).order_by(messages.c.id)
        ).mappings()
        out = [dict(r) for r in rows]
    for row in out:
        row["id"] = row["id"].replace(tag, "T")
        row["idempotency_key"] = row["idempotency_key"].replace(tag, "T")
    return out


def _jobs(c: Container, ids: list[int]) -> list[tuple[Any, ...]]:
    with c.db.read() as conn:
        rows = conn.execute(
            select(outbox.c.done_at, outbox.c.available_at, outbox.c.last_error)
            .where(outbox.c.id.in_(ids))
            .order_by(outbox.c.id)
        )
        return [tuple(r) for r in rows]


def test_record_many_stores_what_record_stores(container: Container) -> None:
    ws = make_workspace(container)
    now = datetime(2026, 12, 4, 21, 0, tzinfo=UTC)
    _queue(container, ws.id, "one", now)
    _queue(container, ws.id, "many", now)
    with container.db.write() as conn:
        for mid, values in _records("one"):
            service.record(conn, mid, **values)
        service.record_many(conn, _records("many"))
    one, many = _messages(container, "one"), _messages(container, "many")
    assert one == many
    assert many[0]["sent_at"] == SENT_AT
    assert many[0]["links"] == ["https://example.com/a?x=1&y=\u00e9"]
    assert many[0]["response"] == {"smtp": "250 OK: queued \u00e9"}
    assert (many[1]["status"], many[1]["attempts"]) == ("failed", 3)  # the last record won
    assert (many[2]["status"], many[2]["reason"]) == ("skipped", "unsubscribed")


def test_close_jobs_stores_what_the_single_job_calls_store(container: Container) -> None:
    ws = make_workspace(container)
    now = datetime(2026, 12, 4, 21, 0, tzinfo=UTC)
    later = datetime(2026, 12, 4, 16, 30, 0, 5, tzinfo=timezone(timedelta(hours=-5)))
    one, many = _queue(container, ws.id, "one", now), _queue(container, ws.id, "many", now)
    with container.db.write() as conn:
        service.finish_job(conn, one[0], now)
        service.fail_job(conn, one[1], now, "x" * 2500)
        service.retry_job(conn, one[2], later, "421 \u00e9")
        service.finish_job(conn, one[3], now)
        service.close_jobs(
            conn,
            finished=[
                (many[0], now, None),
                (many[1], now, "x" * 2500),
                (many[3], later, "y"),
                (many[3], now, None),
            ],
            retried=[(many[2], later, "421 \u00e9")],
        )
    assert _jobs(container, one) == _jobs(container, many)
    [done, failed, retried, _] = _jobs(container, many)
    # Removed (a message's job once done): the row goes, the others stay as they were.
    with container.db.write() as conn:
        service.close_jobs(conn, finished=[], retried=[], removed=[many[0], many[3], many[3]])
    assert _jobs(container, many) == [failed, retried]
    assert done == (now, now, None)
    assert failed[2] == "x" * 2000
    assert retried[1] == later
    assert retried[0] is None
