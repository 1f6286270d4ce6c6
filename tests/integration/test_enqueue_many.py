"""``messaging.enqueue_many`` writes at the driver's level; its messages and outbox jobs
must be stored exactly as ``enqueue`` (SQLAlchemy's statements) stores them, on SQLite and
PostgreSQL, keys already queued skipped and the jobs in the items' order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import select

from tests.support.workspace import make_workspace
from whenthen import messaging
from whenthen.bootstrap import Container
from whenthen.messaging.tables import messages, outbox

PAYLOAD: dict[str, Any] = {
    "email": {"subject": "Caf\u00e9 {{ traits.name }}", "text": "\u4e2d\u6587"},
    "n": 1.5,
}


def _queued(ws: str, n: int, tag: str) -> messaging.Queued:
    return messaging.Queued(
        ws=ws,
        channel="email",
        message_id=f"msg-{tag}-{n}",
        idempotency_key=f"key-{tag}-{n}",
        profile_id=f"p{n}",
        journey_id="j1" if n % 2 else None,
        enrollment_id=f"e{n}" if n % 2 else None,
        node="mail",
        payload={**PAYLOAD, "i": n},
    )


def _rows(c: Container, tag: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    with c.db.read() as conn:
        found = [
            dict(r)
            for r in conn.execute(
                select(messages).where(messages.c.id.like(f"msg-{tag}-%")).order_by(messages.c.id)
            ).mappings()
        ]
        jobs = [dict(r) for r in conn.execute(select(outbox).order_by(outbox.c.id)).mappings()]
    jobs = [j for j in jobs if str(j["payload"]["message_id"]).startswith(f"msg-{tag}-")]
    for row in found:
        row["id"] = row["id"].replace(tag, "T")
        row["idempotency_key"] = row["idempotency_key"].replace(tag, "T")
    for job in jobs:
        del job["id"]
        job["payload"]["message_id"] = job["payload"]["message_id"].replace(tag, "T")
    return found, jobs


def test_enqueue_many_stores_what_enqueue_stores(container: Container) -> None:
    ws = make_workspace(container)
    for now in (
        datetime(2026, 12, 1, 22, 0, tzinfo=UTC),
        datetime(2026, 12, 1, 22, 0, 0, 654321, tzinfo=timezone(timedelta(hours=-5))),
    ):
        tag = f"t{now.microsecond}"
        with container.db.write() as conn:
            for n in range(4):
                assert messaging.enqueue(conn, _queued(ws.id, n, f"one{tag}"), now)
            assert messaging.enqueue_many(conn, [_queued(ws.id, n, f"many{tag}") for n in range(4)], now) == 4
        assert _rows(container, f"one{tag}") == _rows(container, f"many{tag}")
        [first, *_] = _rows(container, f"many{tag}")[0]
        assert first["created_at"] == now
        assert first["links"] == []


def test_keys_already_queued_are_skipped_and_jobs_keep_the_items_order(container: Container) -> None:
    ws = make_workspace(container)
    now = datetime(2026, 12, 1, 22, 0, tzinfo=UTC)
    with container.db.write() as conn:
        assert messaging.enqueue_many(conn, [_queued(ws.id, n, "a") for n in (0, 1)], now) == 2
    with container.db.write() as conn:
        items = [_queued(ws.id, n, "a") for n in (5, 1, 3, 0, 4, 5)]  # 1 and 0 known, 5 twice
        assert messaging.enqueue_many(conn, items, now) == 3
        assert messaging.enqueue_many(conn, [], now) == 0
        assert messaging.enqueue_many(conn, [_queued(ws.id, n, "a") for n in (4, 0)], now) == 0  # all known
    with container.db.read() as conn:
        order = [r.payload["message_id"] for r in conn.execute(select(outbox).order_by(outbox.c.id))]
    assert order == ["msg-a-0", "msg-a-1", "msg-a-5", "msg-a-3", "msg-a-4"]
