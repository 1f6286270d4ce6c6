"""Enrollment states and journal rows are written at the driver's level (the timer step's
batch, every ``save_state``); what they store must be exactly what SQLAlchemy's own
statements through the column types store, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, insert, select, text, update

from whenthen.bootstrap import Container
from whenthen.journeys import repository as repo
from whenthen.journeys.model import JournalEntry, State, Status
from whenthen.journeys.tables import enrollment_journal, enrollments

ENTERED = datetime(2026, 11, 1, 8, 0, 0, tzinfo=UTC)
CONTEXT: dict[str, Any] = {
    "messages": {"mail": "msg_0123"},
    "payload": {
        "name": "caf\u00e9 \u4e2d\u6587",
        "total": 12.5,
        "list": [1, None, True],
        "emoji": "\U0001f600",
    },
}
TIMES = [
    datetime(2026, 12, 1, 22, 0, 0, tzinfo=UTC),  # no microseconds
    datetime(2026, 12, 1, 22, 0, 0, 123456, tzinfo=UTC),
    datetime(2001, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=8))),  # not UTC
]


def _enroll(conn: Connection, enrollment_id: str) -> None:
    state = State(
        enrollment_id=enrollment_id,
        status=Status.ACTIVE,
        node="wait",
        wake_at=ENTERED + timedelta(days=30),
        entered_at=ENTERED,
        steps=1,
        context={},
        reason=None,
    )
    repo.insert_enrollment(
        conn,
        ws="ws-1",
        journey_id="jrn-1",
        version=1,
        profile_id="prf-1",
        state=state,
        entry_key=None,
        now=ENTERED,
    )


def _orm_save(conn: Connection, params: dict[str, Any]) -> None:
    """The statement ``save_state`` ran through SQLAlchemy before."""
    conn.execute(
        update(enrollments)
        .where(enrollments.c.id == params["b_id"])
        .values({k.removeprefix("b_"): v for k, v in params.items() if k != "b_id"})
    )


def _stored(conn: Connection, table: str, where: str, value: str) -> dict[str, Any]:
    """A row as the database holds it, without the column types' result processing."""
    row = conn.execute(text(f"SELECT * FROM {table} WHERE {where} = :v"), {"v": value}).mappings().one()
    return dict(row)


def test_saved_states_are_stored_as_through_sqlalchemy(container: Container) -> None:
    for i, now in enumerate(TIMES):
        fast_id, orm_id = f"enr_fast{i}", f"enr_orm{i}"
        for status, wake, reason in (
            (Status.ACTIVE, now + timedelta(days=3, microseconds=7), None),
            (Status.COMPLETED, None, "r\u00e9ason"),
        ):
            with container.db.write() as conn:
                if status is Status.ACTIVE:
                    _enroll(conn, fast_id)
                    _enroll(conn, orm_id)
                for eid, write in ((fast_id, "fast"), (orm_id, "orm")):
                    state = State(
                        enrollment_id=eid,
                        status=status,
                        node=None if status.ended else "mail",
                        wake_at=wake,
                        entered_at=ENTERED,
                        steps=3,
                        context=CONTEXT,
                        reason=reason,
                    )
                    params = repo.state_params(state, now)
                    if write == "fast":
                        repo.save_states(conn, [params])
                    else:
                        _orm_save(conn, params)
            with container.db.read() as conn:
                fast = _stored(conn, "enrollments", "id", fast_id)
                slow = _stored(conn, "enrollments", "id", orm_id)
                typed = conn.execute(select(enrollments).where(enrollments.c.id == fast_id)).mappings().one()
            del fast["id"], slow["id"]
            assert fast == slow
            assert typed["updated_at"] == now
            assert typed["wake_at"] == wake
            assert typed["context"] == CONTEXT
            assert typed["reason"] == reason


def test_journal_rows_are_stored_as_through_sqlalchemy(container: Container) -> None:
    entries = [
        JournalEntry(at=at, kind=kind, node=node, detail=detail)
        for at in TIMES
        for kind, node, detail in (
            ("woke", "wait", {}),
            ("send_email", "mail", {"message_id": "msg_1", "note": "\u4e2d\u6587"}),
            ("completed", None, {"reason": None}),
        )
    ]

    def rows(enrollment_id: str) -> list[dict[str, Any]]:
        return repo.journal_rows(
            ws="ws-1", journey_id="jrn-1", enrollment_id=enrollment_id, profile_id="prf-1", entries=entries
        )

    with container.db.write() as conn:
        _enroll(conn, "enr_fast")
        repo.insert_journal_rows(conn, rows("enr_fast"))
        conn.execute(insert(enrollment_journal), rows("enr_orm"))
    with container.db.read() as conn:
        order = "ORDER BY id"
        fast = [
            dict(r)
            for r in conn.execute(
                text(f"SELECT * FROM enrollment_journal WHERE enrollment_id = 'enr_fast' {order}")
            ).mappings()
        ]
        slow = [
            dict(r)
            for r in conn.execute(
                text(f"SELECT * FROM enrollment_journal WHERE enrollment_id = 'enr_orm' {order}")
            ).mappings()
        ]
        typed = repo.journal_of(conn, "enr_fast")
    # Chained: each row points to the one before it, the enrollment to the last (ADR 0018).
    ids = [row["id"] for row in fast]
    assert [row["prev_id"] for row in fast] == [None, *ids[:-1]]
    with container.db.read() as conn:
        assert repo.journal_tails(conn, ["enr_fast"]) == {"enr_fast": ids[-1]}
    for row in (*fast, *slow):
        del row["id"], row["enrollment_id"], row["prev_id"]
    assert fast == slow
    # In the order given (the journal is read by id).
    assert [(r.at, r.kind, r.node, r.detail) for r in typed] == [
        (e.at, e.kind, e.node, e.detail) for e in entries
    ]


def test_a_state_saved_twice_in_one_batch_keeps_the_last(container: Container) -> None:
    with container.db.write() as conn:
        _enroll(conn, "enr_twice")
        first = State(
            enrollment_id="enr_twice",
            status=Status.ACTIVE,
            node="mail",
            wake_at=TIMES[0],
            entered_at=ENTERED,
            steps=2,
            context={},
            reason=None,
        )
        last = State(
            enrollment_id="enr_twice",
            status=Status.COMPLETED,
            node=None,
            wake_at=None,
            entered_at=ENTERED,
            steps=3,
            context={"n": 2},
            reason=None,
        )
        repo.save_states(conn, [repo.state_params(first, TIMES[0]), repo.state_params(last, TIMES[1])])
    with container.db.read() as conn:
        row = repo.enrollment(conn, "enr_twice")
    assert (row.status, row.steps, row.context, row.updated_at, row.ended_at) == (
        "completed",
        3,
        {"n": 2},
        TIMES[1],
        TIMES[1],
    )


def test_many_new_enrollments_are_stored_as_one_is(container: Container) -> None:
    # Many rows go as one COPY on PostgreSQL (an executemany on SQLite), one row as one
    # statement: the stored rows must not differ.
    def values(conn: Connection, eid: str, i: int) -> tuple[Any, ...]:
        ended = i % 2 == 1
        state = State(
            enrollment_id=eid,
            status=Status.COMPLETED if ended else Status.ACTIVE,
            node=None if ended else "wait",
            wake_at=None if ended else TIMES[i % 3] + timedelta(days=1),
            entered_at=TIMES[i % 3],
            steps=i,
            context=CONTEXT if i % 3 else {},
            reason="r\u00e9ason\ttab\nline \\ back" if ended else None,
        )
        row = repo.enrollment_values(
            conn,
            ws="ws-1",
            journey_id="jrn-1",
            version=2,
            profile_id=f"prf-{i}",
            state=state,
            entry_key="cart-\u00e9" if i % 3 == 2 else None,
            now=TIMES[(i + 1) % 3],
        )
        return repo.with_tail(row, {eid: 100 + i} if i % 2 else {})

    with container.db.write() as conn:
        repo.insert_enrollments(conn, [values(conn, f"enr_many{i}", i) for i in range(6)])
        for i in range(6):
            repo.insert_enrollments(conn, [values(conn, f"enr_one{i}", i)])
    with container.db.read() as conn:
        for i in range(6):
            many = _stored(conn, "enrollments", "id", f"enr_many{i}")
            one = _stored(conn, "enrollments", "id", f"enr_one{i}")
            del many["id"], one["id"]
            assert many == one
        typed = conn.execute(select(enrollments).where(enrollments.c.id == "enr_many4")).mappings().one()
    assert typed["context"] == CONTEXT
    assert typed["entered_at"] == TIMES[1]
    assert typed["journal_tail"] is None
