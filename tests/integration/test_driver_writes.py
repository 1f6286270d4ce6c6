"""Writes made at the driver's level on the pipeline's per-event path (a person entering a
journey, a person's activity) store exactly what SQLAlchemy's own statements through the
column types store, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, delete, insert, select, text, update

from whenthen.bootstrap import Container
from whenthen.journeys import repository as journey_repo
from whenthen.journeys.model import State, Status
from whenthen.journeys.tables import enrollments
from whenthen.kernel.ids import ProfileId
from whenthen.profiles import repository as profile_repo
from whenthen.profiles.model import Identity, IdentityKind
from whenthen.profiles.tables import profiles
from whenthen.segments import membership
from whenthen.segments.tables import segment_history, segment_members, segment_timers

TIMES = [
    datetime(2026, 12, 1, 22, 0, 0, tzinfo=UTC),  # no microseconds
    datetime(2026, 12, 1, 22, 0, 0, 123456, tzinfo=UTC),
    datetime(2001, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=8))),  # not UTC
]
CONTEXT: dict[str, Any] = {
    "trigger": {"event": "Cart Updated", "properties": {"cart_id": "c\u00e9-1", "total": 12.5}},
    "messages": {},
    "payload": {"list": [1, None, True], "emoji": "\U0001f600", "cjk": "\u4e2d\u6587"},
}


def _raw(conn: Connection, table: str, key: str, value: str) -> dict[str, Any]:
    """A row as the database holds it, without the column types' result processing."""
    return dict(conn.execute(text(f"SELECT * FROM {table} WHERE {key} = :v"), {"v": value}).mappings().one())


def test_a_new_enrollment_is_stored_as_through_sqlalchemy(container: Container) -> None:
    cases = [
        (Status.ACTIVE, "wait", TIMES[1] + timedelta(days=2), None, "cart-1"),
        (Status.COMPLETED, None, None, "r\u00e9ason", None),
    ]
    for i, now in enumerate(TIMES):
        for j, (status, node, wake, reason, entry_key) in enumerate(cases):
            fast_id, orm_id = f"enr_fast{i}{j}", f"enr_orm{i}{j}"
            with container.db.write() as conn:
                for eid in (fast_id, orm_id):
                    state = State(eid, status, node, wake, now - timedelta(seconds=5), 2, CONTEXT, reason)
                    if eid == fast_id:
                        journey_repo.insert_enrollment(
                            conn,
                            ws="ws-1",
                            journey_id="jrn-1",
                            version=3,
                            profile_id="prf-1",
                            state=state,
                            entry_key=entry_key,
                            now=now,
                        )
                    else:  # the statement insert_enrollment ran through SQLAlchemy before
                        conn.execute(
                            insert(enrollments).values(
                                id=eid,
                                workspace_id="ws-1",
                                journey_id="jrn-1",
                                version=3,
                                profile_id="prf-1",
                                status=status.value,
                                node=node,
                                wake_at=wake,
                                entered_at=state.entered_at,
                                ended_at=now if status.ended else None,
                                steps=2,
                                context=dict(CONTEXT),
                                reason=reason,
                                entry_key=entry_key,
                                updated_at=now,
                            )
                        )
            with container.db.read() as conn:
                fast = _raw(conn, "enrollments", "id", fast_id)
                slow = _raw(conn, "enrollments", "id", orm_id)
                typed = conn.execute(select(enrollments).where(enrollments.c.id == fast_id)).mappings().one()
            del fast["id"], slow["id"]
            assert fast == slow
            assert typed["failures"] == 0  # the server default
            assert typed["context"] == CONTEXT
            assert typed["wake_at"] == wake
            assert typed["updated_at"] == now
            assert typed["ended_at"] == (now if status.ended else None)


def test_a_persons_activity_is_stored_as_through_sqlalchemy(container: Container) -> None:
    with container.db.write() as conn:
        for pid in ("prf_fast", "prf_orm"):
            profile_repo.insert_profile(conn, "ws-1", pid, TIMES[0])
    for i, now in enumerate(TIMES):
        with container.db.write() as conn:
            for pid in ("prf_fast", "prf_orm"):
                profile = profile_repo.get(conn, "ws-1", pid)
                assert profile is not None
                moved = replace(
                    profile,
                    timezone="Asia/Shanghai" if i % 2 else None,
                    first_seen=TIMES[2],
                    last_seen=now + timedelta(microseconds=i),
                    event_count=profile.event_count + 1,
                )
                if pid == "prf_fast":
                    profile_repo.save_activity(conn, moved, now)
                else:  # the statement save_activity ran through SQLAlchemy before
                    conn.execute(
                        update(profiles)
                        .where(profiles.c.id == ProfileId(pid))
                        .values(
                            timezone=moved.timezone,
                            first_seen=moved.first_seen,
                            last_seen=moved.last_seen,
                            event_count=moved.event_count,
                            updated_at=now,
                            version=profiles.c.version + 1,
                        )
                    )
        with container.db.read() as conn:
            fast = _raw(conn, "profiles", "id", "prf_fast")
            slow = _raw(conn, "profiles", "id", "prf_orm")
            typed = profile_repo.get(conn, "ws-1", "prf_fast")
        del fast["id"], slow["id"]
        assert fast == slow
        assert typed is not None
        assert (typed.first_seen, typed.last_seen, typed.updated_at, typed.event_count) == (
            TIMES[2],
            now + timedelta(microseconds=i),
            now,
            i + 1,
        )
        assert fast["version"] == i + 2  # inserted at 1, one more a save


def test_a_profile_read_by_its_identity_is_the_profile_sqlalchemy_reads(container: Container) -> None:
    """``by_identity`` (and ``by_identities``, a batch's read-ahead) run on the driver's
    cursor; what they give back (times, JSON, the lock on PostgreSQL aside) is what the
    same query through SQLAlchemy gives."""
    now = TIMES[1]
    with container.db.write() as conn:
        profile_repo.insert_profile(conn, "ws-1", "prf_read", now)
        profile_repo.attach_identity(
            conn, "ws-1", ProfileId("prf_read"), Identity(IdentityKind.USER_ID, "u\u00e9"), now
        )
        base = profile_repo.get(conn, "ws-1", "prf_read")
        assert base is not None
        profile_repo.save_state(
            conn,
            replace(
                base,
                traits={"name": "Ann", "cart": {"total": 12.5, "items": [1, None]}, "cjk": "\u4e2d\u6587"},
                trait_times={"name": "2026-12-01T22:00:00Z"},
                email="ann@example.com",
                timezone="Asia/Shanghai",
                first_seen=TIMES[2],
                last_seen=now,
                event_count=7,
            ),
            now,
        )
    with container.db.write() as conn:
        fast = profile_repo.by_identity(conn, "ws-1", IdentityKind.USER_ID, "u\u00e9")
        orm = profile_repo.get(conn, "ws-1", "prf_read", with_identities=False)
        missing = profile_repo.by_identity(conn, "ws-1", IdentityKind.USER_ID, "nobody")
        ahead = profile_repo.by_identities(conn, "ws-1", ["u\u00e9", "nobody"], ["u\u00e9"])
    # The pipeline's read-ahead of a batch's people (ADR 0014) gives the same profile.
    assert ahead == {("user_id", "u\u00e9"): orm}
    assert fast == orm
    assert fast is not None
    assert fast.first_seen == TIMES[2]
    assert fast.first_seen.tzinfo is not None
    assert fast.traits["cart"] == {"total": 12.5, "items": [1, None]}
    assert missing is None


def _collect(
    into: list[membership.Announcement],
    conn: Connection,
    ws: str,
    announcements: Sequence[membership.Announcement],
    *,
    now: datetime,
) -> int:
    into.extend(announcements)
    return len(announcements)


def _segment_rows(conn: Connection, pid: str) -> dict[str, list[dict[str, Any]]]:
    """The person's rows in the three segment tables as the database holds them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table, order in (
        ("segment_members", "segment_id"),
        ("segment_timers", "segment_id"),
        ("segment_history", "id"),
    ):
        rows = conn.execute(
            text(f"SELECT * FROM {table} WHERE profile_id = :p ORDER BY {order}"), {"p": pid}
        ).mappings()
        out[table] = [{k: v for k, v in r.items() if k not in ("id", "profile_id")} for r in rows]
    return out


def test_a_persons_segment_moves_and_timers_are_stored_as_through_sqlalchemy(container: Container) -> None:
    """``membership.write_profile`` (driver level) against the same rows written by
    SQLAlchemy's statements through the column types: entries, exits, timers made,
    moved and deleted, at instants with and without microseconds and in another zone."""
    for i, now in enumerate(TIMES):
        due = now + timedelta(days=1, microseconds=7)
        fast, orm = f"prf_seg_fast{i}", f"prf_seg_orm{i}"
        with container.db.write() as conn:
            for pid in (fast, orm):  # before: a member of s-out with an open stay; timers on s-gone, s-moved
                conn.execute(
                    insert(segment_members).values(
                        segment_id="s-out", profile_id=pid, workspace_id="ws-1", since=TIMES[0]
                    )
                )
                conn.execute(
                    insert(segment_history).values(
                        segment_id="s-out", workspace_id="ws-1", profile_id=pid, entered_at=TIMES[0]
                    )
                )
                for seg in ("s-gone", "s-moved"):
                    conn.execute(
                        insert(segment_timers).values(
                            segment_id=seg, profile_id=pid, workspace_id="ws-1", due_at=TIMES[0]
                        )
                    )
        with container.db.write() as conn:
            changes = membership.ProfileChanges("ws-1", fast)
            changes.move("s-in", "in", True, "c1")
            changes.move("s-out", "out", False, "c2")
            changes.move("s-in2", "in2", True, "c3")
            changes.timers.update({"s-gone": None, "s-moved": due, "s-new": due})
            announced: list[membership.Announcement] = []
            membership.write_profile(
                conn,
                changes,
                {"s-gone": TIMES[0], "s-moved": TIMES[0]},
                now,
                functools.partial(_collect, announced),
            )
            assert [(a.name, a.properties) for a in announced] == [
                ("Segment Entered", {"segment": "in"}),
                ("Segment Exited", {"segment": "out"}),
                ("Segment Entered", {"segment": "in2"}),
            ]
            # The same through SQLAlchemy's statements.
            for seg in ("s-in", "s-in2"):
                conn.execute(
                    insert(segment_members).values(
                        segment_id=seg, profile_id=orm, workspace_id="ws-1", since=now
                    )
                )
                conn.execute(
                    insert(segment_history).values(
                        segment_id=seg, workspace_id="ws-1", profile_id=orm, entered_at=now
                    )
                )
            conn.execute(
                delete(segment_members).where(
                    segment_members.c.segment_id == "s-out", segment_members.c.profile_id == orm
                )
            )
            conn.execute(
                update(segment_history)
                .where(
                    segment_history.c.segment_id == "s-out",
                    segment_history.c.profile_id == orm,
                    segment_history.c.exited_at.is_(None),
                )
                .values(exited_at=now)
            )
            conn.execute(
                delete(segment_timers).where(
                    segment_timers.c.segment_id == "s-gone", segment_timers.c.profile_id == orm
                )
            )
            conn.execute(
                update(segment_timers)
                .where(segment_timers.c.segment_id == "s-moved", segment_timers.c.profile_id == orm)
                .values(due_at=due)
            )
            conn.execute(
                insert(segment_timers).values(
                    segment_id="s-new", profile_id=orm, workspace_id="ws-1", due_at=due
                )
            )
        with container.db.read() as conn:
            got, expected = _segment_rows(conn, fast), _segment_rows(conn, orm)
            typed = conn.execute(
                select(segment_timers.c.segment_id, segment_timers.c.due_at)
                .where(segment_timers.c.profile_id == fast)
                .order_by(segment_timers.c.segment_id)
            ).all()
            stays = conn.execute(
                select(
                    segment_history.c.segment_id, segment_history.c.entered_at, segment_history.c.exited_at
                )
                .where(segment_history.c.profile_id == fast)
                .order_by(segment_history.c.id)
            ).all()
        assert got == expected
        assert [s["segment_id"] for s in got["segment_members"]] == ["s-in", "s-in2"]
        assert [(s, d) for s, d in typed] == [("s-moved", due), ("s-new", due)]
        assert [tuple(r) for r in stays] == [
            ("s-out", TIMES[0], now),
            ("s-in", now, None),
            ("s-in2", now, None),
        ]
