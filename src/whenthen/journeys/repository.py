from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Integer, bindparam, delete, func, insert, literal_column, select, update

from whenthen.journeys.model import JournalEntry, State, Status
from whenthen.journeys.tables import (
    date_schedules,
    enrollment_journal,
    enrollments,
    journey_versions,
    journeys,
)
from whenthen.storage.driver import (
    StoredValues,
    copy_rows,
    execute,
    execute_each,
    json_dumps,
    json_text,
    statements,
    write_rows,
)
from whenthen.storage.plans import in_index_order


def _locking(conn: Connection, stmt: Any, *, skip_locked: bool = False) -> Any:
    if conn.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=skip_locked)
    return stmt


# ---- journeys and versions ---------------------------------------------------------------


def journey_by_key(conn: Connection, ws: str, key: str, *, lock: bool = False) -> Any:
    stmt = select(journeys).where(journeys.c.workspace_id == ws, journeys.c.key == key)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


_JOURNEY_BY_ID = select(journeys).where(journeys.c.id == bindparam("b_id"))


def journey_by_id(conn: Connection, journey_id: str) -> Any:
    return conn.execute(_JOURNEY_BY_ID, {"b_id": journey_id}).first()


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


#: Built once: every pipeline batch asks.
_ACTIVE_JOURNEYS = select(journeys).where(
    journeys.c.workspace_id == bindparam("ws"),
    journeys.c.status == "active",
    journeys.c.active_version.is_not(None),
)


def active_journeys(conn: Connection, ws: str) -> list[Any]:
    """(journey row, its active version number) of the workspace's active journeys."""
    return list(conn.execute(_ACTIVE_JOURNEYS, {"ws": ws}))


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


#: A person entering a journey (every triggering event) is one insert at the driver's
#: level, as the states and journal rows below; ``failures`` keeps its server default.
_INSERT_ENROLLMENT_SQL = statements(
    "INSERT INTO enrollments (id, workspace_id, journey_id, version, profile_id, status, node,"
    " wake_at, entered_at, ended_at, steps, context, reason, entry_key, updated_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s)"
)


def insert_enrollment(conn: Connection, **row: Any) -> None:
    """One new enrollment (the keywords of :func:`enrollment_values`)."""
    insert_enrollments(conn, [enrollment_values(conn, **row)])


def enrollment_values(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    version: int,
    profile_id: str,
    state: State,
    entry_key: str | None,
    now: datetime,
) -> tuple[Any, ...]:
    """A new enrollment's row in stored form, for :func:`insert_enrollments`."""
    at = StoredValues(conn).at
    return (
        state.enrollment_id,
        ws,
        journey_id,
        version,
        profile_id,
        state.status.value,
        state.node,
        at(state.wake_at),
        at(state.entered_at),
        at(now) if state.status.ended else None,
        state.steps,
        json_text(conn, dict(state.context)),
        state.reason,
        entry_key,
        at(now),
    )


def insert_enrollments(conn: Connection, rows: list[tuple[Any, ...]]) -> None:
    """New enrollments from :func:`enrollment_values`: one statement for one, else one
    executemany (psycopg sends the rows in one round trip)."""
    if len(rows) == 1:
        execute(conn, _INSERT_ENROLLMENT_SQL, rows[0])
    elif rows:
        execute_each(conn, _INSERT_ENROLLMENT_SQL, rows)


#: Enrollment states and journal rows are written at the driver's level (one executemany on
#: the DBAPI cursor, as ``tracking.repository.append``): SQLAlchemy's per-row parameter
#: work (``construct_params``, a bind processor per value) cost more than the statements on
#: the timer step's hot path (docs/design/journeys.md, "Timers"). The values are put in the
#: form the column types store, by those types' own bind processors, so nothing reads back
#: differently; ``tests/integration/test_timer_driver_writes.py`` compares the stored rows
#: with SQLAlchemy's own statements. (State update, journal insert) per dialect, written out.
_DRIVER_SQL = {
    "sqlite": (
        "UPDATE enrollments SET status = ?, node = ?, wake_at = ?, ended_at = ?, steps = ?,"
        " context = ?, reason = ?, updated_at = ? WHERE id = ?",
        "INSERT INTO enrollment_journal (workspace_id, journey_id, enrollment_id, profile_id, at,"
        " kind, node, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    ),
    # One statement reading the batch from one JSON document (``jsonb_to_recordset``): an
    # executemany is a statement per row even in psycopg's pipeline mode, and arrays are
    # dumped value by value in Python; both were slower than SQLAlchemy's multi-row insert.
    # ``ORDINALITY`` keeps the journal's ids in the rows' order.
    "postgresql": (
        "UPDATE enrollments AS e SET status = v.status, node = v.node, wake_at = v.wake_at,"
        " ended_at = v.ended_at, steps = v.steps, context = v.context, reason = v.reason,"
        " updated_at = v.updated_at"
        " FROM jsonb_to_recordset(%s::jsonb) AS v(status text, node text, wake_at timestamptz,"
        " ended_at timestamptz, steps int, context jsonb, reason text, updated_at timestamptz,"
        " id text)"
        " WHERE e.id = v.id",
        "INSERT INTO enrollment_journal (workspace_id, journey_id, enrollment_id, profile_id, at,"
        " kind, node, detail)"
        " SELECT workspace_id, journey_id, enrollment_id, profile_id, at, kind, node, detail"
        " FROM ROWS FROM (jsonb_to_recordset(%s::jsonb) AS (workspace_id text, journey_id text,"
        " enrollment_id text, profile_id text, at timestamptz, kind text, node text,"
        " detail jsonb)) WITH ORDINALITY"
        " AS v(workspace_id, journey_id, enrollment_id, profile_id, at, kind, node, detail, n)"
        " ORDER BY n",
    ),
}

_STATE_KEYS = ("status", "node", "wake_at", "ended_at", "steps", "context", "reason", "updated_at", "id")
_JOURNAL_KEYS = ("workspace_id", "journey_id", "enrollment_id", "profile_id", "at", "kind", "node", "detail")


def state_params(state: State, now: datetime) -> dict[str, Any]:
    return {
        "b_id": state.enrollment_id,
        "b_status": state.status.value,
        "b_node": state.node,
        "b_wake_at": state.wake_at,
        "b_ended_at": now if state.status.ended else None,
        "b_steps": state.steps,
        "b_context": dict(state.context),
        "b_reason": state.reason,
        "b_updated_at": now,
    }


def save_state(conn: Connection, state: State, now: datetime) -> None:
    save_states(conn, [state_params(state, now)])


def save_states(conn: Connection, params: Sequence[dict[str, Any]]) -> None:
    """Many ``save_state`` at once (one executemany), from :func:`state_params`."""
    if not params:
        return
    if conn.dialect.name == "postgresql" and len({p["b_id"] for p in params}) < len(params):
        # One UPDATE ... FROM applies one row per enrollment: keep each one's last, as a
        # statement per row would leave it.
        params = list({p["b_id"]: p for p in params}.values())
    stored = StoredValues(conn)
    at, dumps = stored.at, stored.dumps
    values = [
        (
            p["b_status"],
            p["b_node"],
            at(p["b_wake_at"]),
            at(p["b_ended_at"]),
            p["b_steps"],
            dumps(p["b_context"]),
            p["b_reason"],
            at(p["b_updated_at"]),
            p["b_id"],
        )
        for p in params
    ]
    write_rows(conn, _DRIVER_SQL[conn.dialect.name][0], _STATE_KEYS, values)


def enrollment(conn: Connection, enrollment_id: str, *, lock: bool = False) -> Any:
    stmt = select(enrollments).where(enrollments.c.id == enrollment_id)
    return conn.execute(_locking(conn, stmt) if lock else stmt).first()


_ACTIVE_FOR_PROFILE = (
    select(enrollments)
    .where(
        enrollments.c.workspace_id == bindparam("b_ws"),
        enrollments.c.profile_id == bindparam("b_profile"),
        enrollments.c.status == Status.ACTIVE.value,
    )
    .order_by(enrollments.c.entered_at, enrollments.c.id)
)
_ACTIVE_FOR_PROFILE_LOCKED = _ACTIVE_FOR_PROFILE.with_for_update()


def active_for_profile(conn: Connection, ws: str, profile_id: str) -> list[Any]:
    stmt = _ACTIVE_FOR_PROFILE_LOCKED if conn.dialect.name == "postgresql" else _ACTIVE_FOR_PROFILE
    return list(conn.execute(stmt, {"b_ws": ws, "b_profile": profile_id}))


def active_for_journey(conn: Connection, journey_id: str, limit: int) -> list[Any]:
    stmt = (
        select(enrollments)
        .where(enrollments.c.journey_id == journey_id, enrollments.c.status == Status.ACTIVE.value)
        .order_by(enrollments.c.id)
        .limit(limit)
    )
    return list(conn.execute(_locking(conn, stmt)))


#: The columns the timer step uses (its state, where it belongs, its failures): the
#: others' result processing (two more timestamps a row) is skipped.
_DUE_COLUMNS = [
    enrollments.c[name]
    for name in (
        "id",
        "workspace_id",
        "journey_id",
        "version",
        "profile_id",
        "status",
        "node",
        "wake_at",
        "entered_at",
        "steps",
        "context",
        "reason",
        "failures",
    )
]
_DUE = (
    select(*_DUE_COLUMNS)
    .where(
        enrollments.c.status == Status.ACTIVE.value,
        enrollments.c.wake_at.is_not(None),
        enrollments.c.wake_at <= bindparam("b_now"),
    )
    .order_by(enrollments.c.wake_at)
    .limit(bindparam("b_limit", type_=Integer))
)
_DUE_LOCKED = _DUE.with_for_update(skip_locked=True)


def due(conn: Connection, now: datetime, limit: int) -> list[Any]:
    """Active enrollments whose timer has fallen due, oldest first (the columns of
    ``_DUE_COLUMNS``); locked, skipping rows another worker holds (PostgreSQL). Read in
    ``ix_enrollments_due``'s order, stopping at ``limit`` however many are due."""
    stmt = _DUE_LOCKED if conn.dialect.name == "postgresql" else _DUE
    with in_index_order(conn):
        return list(conn.execute(stmt, {"b_now": now, "b_limit": limit}))


_NEXT_WAKE = select(func.min(enrollments.c.wake_at)).where(
    enrollments.c.status == literal_column("'active'"), enrollments.c.wake_at.is_not(None)
)


def next_wake(conn: Connection) -> datetime | None:
    """The earliest timer of an active enrollment (one probe of ``ix_enrollments_due``:
    the predicate is the partial index's, written as literals)."""
    found = conn.execute(_NEXT_WAKE).scalar()
    return found if isinstance(found, datetime) else None


_PREVIOUS_ENTRIES = select(enrollments.c.entry_key, enrollments.c.entered_at, enrollments.c.status).where(
    enrollments.c.journey_id == bindparam("b_journey"), enrollments.c.profile_id == bindparam("b_profile")
)


def previous_entries(conn: Connection, journey_id: str, profile_id: str) -> list[Any]:
    return list(conn.execute(_PREVIOUS_ENTRIES, {"b_journey": journey_id, "b_profile": profile_id}))


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


# A person's journal rows are found through their enrollments (every journal row belongs
# to an enrollment of the same person: they are written, moved and deleted together):
# ``ix_enrollments_profile_status`` then ``ix_enrollment_journal_enrollment``. The journal
# has no index on the person, and ``profile_id = ?`` on it was a scan of the whole
# journal for every merge the pipeline applies (70 ms at 400,000 journal rows on SQLite,
# growing with it, under the write lock). Date schedules are keyed (journey, person): they
# are found by the workspace's journeys and the ids, not by a scan.
def _enrollments_of(ws: str, profile_ids: Sequence[str]) -> Any:
    return select(enrollments.c.id).where(
        enrollments.c.workspace_id == ws, enrollments.c.profile_id.in_(list(profile_ids))
    )


def reassign_profile(conn: Connection, ws: str, from_id: str, into_id: str) -> None:
    conn.execute(
        update(enrollment_journal)
        .where(enrollment_journal.c.enrollment_id.in_(_enrollments_of(ws, [from_id])))
        .values(profile_id=into_id)
    )
    conn.execute(
        update(enrollments)
        .where(enrollments.c.workspace_id == ws, enrollments.c.profile_id == from_id)
        .values(profile_id=into_id)
    )


def delete_for_profiles(conn: Connection, ws: str, profile_ids: Sequence[str]) -> None:
    ids = list(profile_ids)
    conn.execute(
        delete(enrollment_journal).where(enrollment_journal.c.enrollment_id.in_(_enrollments_of(ws, ids)))
    )
    conn.execute(
        delete(enrollments).where(enrollments.c.workspace_id == ws, enrollments.c.profile_id.in_(ids))
    )
    conn.execute(
        delete(date_schedules).where(
            date_schedules.c.journey_id.in_(select(journeys.c.id).where(journeys.c.workspace_id == ws)),
            date_schedules.c.profile_id.in_(ids),
            date_schedules.c.workspace_id == ws,
        )
    )


def journal_rows(
    *, ws: str, journey_id: str, enrollment_id: str, profile_id: str, entries: Sequence[JournalEntry]
) -> list[dict[str, Any]]:
    return [
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
    ]


def write_journal(
    conn: Connection,
    *,
    ws: str,
    journey_id: str,
    enrollment_id: str,
    profile_id: str,
    entries: Sequence[JournalEntry],
) -> None:
    if entries:
        insert_journal_rows(
            conn,
            journal_rows(
                ws=ws,
                journey_id=journey_id,
                enrollment_id=enrollment_id,
                profile_id=profile_id,
                entries=entries,
            ),
        )


def insert_journal_rows(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Journal rows of many enrollments at once, from :func:`journal_rows`: on SQLite one
    executemany, on PostgreSQL one ``COPY`` (the timer step writes three rows a wake-up)."""
    if not rows:
        return
    stored = StoredValues(conn)
    at = stored.at
    postgres = conn.dialect.name == "postgresql"
    dumps = json_dumps(conn) if postgres else stored.dumps
    values = [
        (
            r["workspace_id"],
            r["journey_id"],
            r["enrollment_id"],
            r["profile_id"],
            at(r["at"]),
            r["kind"],
            r["node"],
            dumps(r["detail"]),
        )
        for r in rows
    ]
    if postgres:
        copy_rows(conn, "enrollment_journal", _JOURNAL_KEYS, values)
    else:
        write_rows(conn, _DRIVER_SQL[conn.dialect.name][1], _JOURNAL_KEYS, values)


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


#: Built once: the timer step asks on every worker pass, mostly to hear there are none.
_DUE_SCHEDULES = (
    select(date_schedules)
    .where(date_schedules.c.due_at <= bindparam("now"))
    .order_by(date_schedules.c.due_at)
    .limit(bindparam("limit"))
)
_DUE_SCHEDULES_CLAIMED = _DUE_SCHEDULES.with_for_update(skip_locked=True)


def due_schedules(conn: Connection, now: datetime, limit: int) -> list[Any]:
    stmt = _DUE_SCHEDULES_CLAIMED if conn.dialect.name == "postgresql" else _DUE_SCHEDULES
    return list(conn.execute(stmt, {"now": now, "limit": limit}))
