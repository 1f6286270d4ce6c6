"""The message log and the outbox: what journeys decided to send, queued in the same
transaction as the decision, performed after the commit by the dispatcher. Never commits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from whenthen.messaging.tables import messages, outbox


def _insert_message(conn: Connection, row: dict[str, Any]) -> bool:
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT DO NOTHING.
    result = conn.execute(
        dialect.insert(messages)
        .values(**row)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(messages.c.id)
    )
    return result.first() is not None


def enqueue(
    conn: Connection,
    *,
    ws: str,
    channel: str,
    message_id: str,
    idempotency_key: str,
    profile_id: str,
    journey_id: str | None,
    enrollment_id: str | None,
    node: str | None,
    payload: Mapping[str, Any],
    now: datetime,
) -> bool:
    """Queue one message (email or webhook call). Returns False when a message with this
    idempotency key exists already: it is never queued twice."""
    created = _insert_message(
        conn,
        {
            "id": message_id,
            "workspace_id": ws,
            "profile_id": profile_id,
            "journey_id": journey_id,
            "enrollment_id": enrollment_id,
            "node": node,
            "channel": channel,
            "idempotency_key": idempotency_key,
            "status": "queued",
            "links": [],
            "attempts": 0,
            "created_at": now,
        },
    )
    if created:
        conn.execute(
            insert(outbox).values(
                workspace_id=ws,
                kind=channel,
                payload={"message_id": message_id, **payload},
                available_at=now,
                attempts=0,
                created_at=now,
            )
        )
    return created


def enqueue_job(conn: Connection, ws: str, kind: str, payload: Mapping[str, Any], now: datetime) -> int:
    """Queue a non-message job (e.g. a signal fan-out) for the dispatcher."""
    result = conn.execute(
        insert(outbox)
        .values(
            workspace_id=ws, kind=kind, payload=dict(payload), available_at=now, attempts=0, created_at=now
        )
        .returning(outbox.c.id)
    )
    return int(result.scalar_one())


def claim(conn: Connection, now: datetime, *, limit: int, lease: timedelta) -> list[Any]:
    """Take up to ``limit`` ready jobs and hide them for ``lease`` while they run.

    A job whose worker dies is retried when the lease ends (at-least-once)."""
    stmt = (
        select(outbox)
        .where(outbox.c.done_at.is_(None), outbox.c.available_at <= now)
        .order_by(outbox.c.available_at, outbox.c.id)
        .limit(limit)
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    rows = list(conn.execute(stmt))
    if rows:
        conn.execute(
            update(outbox)
            .where(outbox.c.id.in_([r.id for r in rows]))
            .values(available_at=now + lease, attempts=outbox.c.attempts + 1)
        )
    return rows


def finish_job(conn: Connection, job_id: int, now: datetime) -> None:
    conn.execute(update(outbox).where(outbox.c.id == job_id).values(done_at=now, last_error=None))


def retry_job(conn: Connection, job_id: int, at: datetime, error: str) -> None:
    conn.execute(update(outbox).where(outbox.c.id == job_id).values(available_at=at, last_error=error[:2000]))


def fail_job(conn: Connection, job_id: int, now: datetime, error: str) -> None:
    conn.execute(update(outbox).where(outbox.c.id == job_id).values(done_at=now, last_error=error[:2000]))


def replace_payload(conn: Connection, job_id: int, payload: Mapping[str, Any], at: datetime) -> None:
    conn.execute(update(outbox).where(outbox.c.id == job_id).values(payload=dict(payload), available_at=at))


def message(conn: Connection, message_id: str) -> Any:
    return conn.execute(select(messages).where(messages.c.id == message_id)).first()


def record(conn: Connection, message_id: str, **values: Any) -> None:
    conn.execute(update(messages).where(messages.c.id == message_id).values(**values))


def log_for_profile(conn: Connection, ws: str, profile_ids: Sequence[str], limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(messages.c.workspace_id == ws, messages.c.profile_id.in_(list(profile_ids)))
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def log_for_journey(conn: Connection, ws: str, journey_id: str, limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(messages.c.workspace_id == ws, messages.c.journey_id == journey_id)
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def mailbox(conn: Connection, ws: str, limit: int) -> list[Any]:
    return list(
        conn.execute(
            select(messages)
            .where(
                messages.c.workspace_id == ws, messages.c.channel == "email", messages.c.status == "captured"
            )
            .order_by(messages.c.created_at.desc(), messages.c.id)
            .limit(limit)
        )
    )


def reassign_profile(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(messages)
        .where(messages.c.workspace_id == ws, messages.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def delete_for(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    conn.execute(
        delete(messages).where(messages.c.workspace_id == ws, messages.c.profile_id.in_(list(profile_ids)))
    )
