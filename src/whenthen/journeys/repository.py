from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from whenthen.journeys.model import JournalEntry, State, Status
from whenthen.journeys.tables import (
    date_schedules,
    enrollment_journal,
    enrollments,
    journey_versions,
    journeys,
)


def _locking(conn: Connection, stmt: Any, *, skip_locked: bool = False) -> Any:
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt


# ---- journeys and versions ---------------------------------------------------------------


def journey_by_key(conn: Connection, ws: str, key: str, *, lock: bool = False) -> Any:
    stmt = select(journeys).where(journeys.c.workspace_id == ws, journeys.c.key == key)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


def journey_by_id(conn: Connection, journey_id: str) -> Any:
    return conn.execute(select(journeys).where(journeys.c.id == journey_id)).first()


def list_journeys(conn: Connection, ws: str) -> list[Any]:
    return list(conn.execute(select(journeys).where(journeys.c.workspace_id == ws).order_by(journeys.c.key)))


def insert_journey(conn: Connection, row: dict[str, Any]) -> None:
    conn.execute(insert(journeys).values(**row))


def update_journey(conn: Connection, journey_id: str, **values: Any) -> None:
    conn.execute(update(journeys).where(journeys.c.id == journey_id).values(**values))


def versions(conn: Connection, journey_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(journey_versions)
            .where(journey_versions.c.journey_id == journey_id)
            .order_by(journey_versions.c.version)
        )
    )


def version(conn: Connection, journey_id: str, number: int) -> Any:
    return conn.execute(
        select(journey_versions).where(
            journey_versions.c.journey_id == journey_id, journey_versions.c.version == number
        )
    ).first()


def insert_version(
    conn: Connection, journey_id: str, number: int, definition: dict[str, Any], now: datetime
) -> None:
    conn.execute(
        insert(journey_versions).values(
            journey_id=journey_id, version=number, definition=definition, published_at=None, created_at=now
        )
    )


def replace_draft(conn: Connection, journey_id: str, number: int, definition: dict[str, Any]) -> None:
    conn.execute(
        update(journey_versions)
        .where(
            journey_versions.c.journey_id == journey_id,
            journey_versions.c.version == number,
            journey_versions.c.published_at.is_(None),
        )
        .values(definition=definition)
    )


def mark_published(conn: Connection, journey_id: str, number: int, now: datetime) -> None:
    conn.execute(
        update(journey_versions)
        .where(journey_versions.c.journey_id == journey_id, journey_versions.c.version == number)
        .values(published_at=now)
    )


def active_journeys(conn: Connection, ws: str) -> list[Any]:
    """(journey row, its active version number) of the workspace's active journeys."""
    return list(
        conn.execute(
            select(journeys).where(
                journeys.c.workspace_id == ws,
                journeys.c.status == "active",
                journeys.c.active_version.is_not(None),
            )
        )
    )


# ---- enrollments --------------------------------------------------------------------------


def to_state(row: Any) -> State:
    return State(
        enrollment_id=row.id,
        status=Status(row.status),
        node=row.node,
        wake_at=row.wake_at,
        entered_at=row.entered_at,
        steps=row.steps,
        context=dict(row.context or {}),
        reason=row.reason,
    )


def insert_enrollment(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    version: int,
    profile_id: str,
    state: State,
    entry_key: str | None,
    now: datetime,
) -> None:
    conn.execute(
        insert(enrollments).values(
            id=state.enrollment_id,
            workspace_id=ws,
            journey_id=journey_id,
            version=version,
            profile_id=profile_id,
            status=state.status.value,
            node=state.node,
            wake_at=state.wake_at,
            entered_at=state.entered_at,
            ended_at=now if state.status.ended else None,
            steps=state.steps,
            context=dict(state.context),
            reason=state.reason,
            entry_key=entry_key,
            updated_at=now,
        )
    )


#: Built once: constructing ``update().values(**kw)`` per call cost ~5x the statement
#: itself on the timer and pipeline hot paths (docs/benchmarks.md).
_SAVE_STATE = (
    update(enrollments)
    .where(enrollments.c.id == bindparam("b_id"))
    .values(
        status=bindparam("b_status"),
        node=bindparam("b_node"),
        wake_at=bindparam("b_wake_at"),
        ended_at=bindparam("b_ended_at"),
        steps=bindparam("b_steps"),
        context=bindparam("b_context"),
        reason=bindparam("b_reason"),
        updated_at=bindparam("b_updated_at"),
    )
)


def save_state(conn: Connection, state: State, now: datetime) -> None:
    conn.execute(
        _SAVE_STATE,
        {
            "b_id": state.enrollment_id,
            "b_status": state.status.value,
            "b_node": state.node,
            "b_wake_at": state.wake_at,
            "b_ended_at": now if state.status.ended else None,
            "b_steps": state.steps,
            "b_context": dict(state.context),
            "b_reason": state.reason,
            "b_updated_at": now,
        },
    )


def enrollment(conn: Connection, enrollment_id: str, *, lock: bool = False) -> Any:
    stmt = select(enrollments).where(enrollments.c.id == enrollment_id)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


def active_for_profile(conn: Connection, ws: str, profile_id: str) -> list[Any]:
    stmt = (
        select(enrollments)
        .where(
            enrollments.c.workspace_id == ws,
            enrollments.c.profile_id == profile_id,
            enrollments.c.status == Status.ACTIVE.value,
        )
        .order_by(enrollments.c.entered_at, enrollments.c.id)
    )
    return list(conn.execute(_locking(conn, stmt)))


def active_for_journey(conn: Connection, journey_id: str, limit: int) -> list[Any]:
    stmt = (
        select(enrollments)
        .where(enrollments.c.journey_id == journey_id, enrollments.c.status == Status.ACTIVE.value)
        .order_by(enrollments.c.id)
        .limit(limit)
    )
    return list(conn.execute(_locking(conn, stmt)))


def due(conn: Connection, now: datetime, limit: int) -> list[Any]:
    """Active enrollments whose timer has fallen due, oldest first; locked, skipping rows
    another worker holds (PostgreSQL)."""
    stmt = (
        select(enrollments)
        .where(
            enrollments.c.status == Status.ACTIVE.value,
            enrollments.c.wake_at.is_not(None),
            enrollments.c.wake_at <= now,
        )
        .order_by(enrollments.c.wake_at)
        .limit(limit)
    )
    return list(conn.execute(_locking(conn, stmt, skip_locked=True)))


def previous_entries(conn: Connection, journey_id: str, profile_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollments.c.entry_key, enrollments.c.entered_at, enrollments.c.status).where(
                enrollments.c.journey_id == journey_id, enrollments.c.profile_id == profile_id
            )
        )
    )


def count_active(conn: Connection, journey_id: str) -> int:
    return int(
        conn.execute(
            select(func.count()).where(
                enrollments.c.journey_id == journey_id, enrollments.c.status == Status.ACTIVE.value
            )
        ).scalar_one()
    )


def enrollments_of_profile(conn: Connection, ws: str, profile_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollments)
            .where(enrollments.c.workspace_id == ws, enrollments.c.profile_id == profile_id)
            .order_by(enrollments.c.entered_at)
        )
    )


def reassign_profile(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(enrollments)
        .where(enrollments.c.workspace_id == ws, enrollments.c.profile_id == from_id)
        .values(profile_id=into_id)
    )
    conn.execute(
        update(enrollment_journal)
        .where(enrollment_journal.c.workspace_id == ws, enrollment_journal.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def delete_for_profiles(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    ids = list(profile_ids)
    conn.execute(
        delete(enrollment_journal).where(
            enrollment_journal.c.workspace_id == ws, enrollment_journal.c.profile_id.in_(ids)
        )
    )
    conn.execute(
        delete(enrollments).where(enrollments.c.workspace_id == ws, enrollments.c.profile_id.in_(ids))
    )
    conn.execute(
        delete(date_schedules).where(
            date_schedules.c.workspace_id == ws, date_schedules.c.profile_id.in_(ids)
        )
    )


def write_journal(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    enrollment_id: str,
    profile_id: str,
    entries: Sequence[JournalEntry],
) -> None:
    if not entries:
        return
    conn.execute(
        insert(enrollment_journal),
        [
            {
                "workspace_id": ws,
                "journey_id": journey_id,
                "enrollment_id": enrollment_id,
                "profile_id": profile_id,
                "at": e.at,
                "kind": e.kind,
                "node": e.node,
                "detail": dict(e.detail),
            }
            for e in entries
        ],
    )


def journal_of(conn: Connection, enrollment_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollment_journal)
            .where(enrollment_journal.c.enrollment_id == enrollment_id)
            .order_by(enrollment_journal.c.id)
        )
    )


def journal_counts(conn: Connection, journey_id: str) -> list[Any]:
    return list(
        conn.execute(
            select(enrollment_journal.c.kind, enrollment_journal.c.node, func.count().label("n"))
            .where(enrollment_journal.c.journey_id == journey_id)
            .group_by(enrollment_journal.c.kind, enrollment_journal.c.node)
        )
    )


# ---- date schedules ---------------------------------------------------------------------


def upsert_schedule(
    conn: Connection, ws: str, journey_id: str, profile_id: str, due_at: datetime | None
) -> None:
    conn.execute(
        delete(date_schedules).where(
            date_schedules.c.journey_id == journey_id, date_schedules.c.profile_id == profile_id
        )
    )
    if due_at is not None:
        conn.execute(
            insert(date_schedules).values(
                journey_id=journey_id, profile_id=profile_id, workspace_id=ws, due_at=due_at
            )
        )


def due_schedules(conn: Connection, now: datetime, limit: int) -> list[Any]:
    stmt = (
        select(date_schedules)
        .where(date_schedules.c.due_at <= now)
        .order_by(date_schedules.c.due_at)
        .limit(limit)
    )
    return list(conn.execute(_locking(conn, stmt, skip_locked=True)))
