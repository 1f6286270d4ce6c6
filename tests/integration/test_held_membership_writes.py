"""A pipeline batch's held membership writes (``membership.HeldWrites``) leave the very rows
that writing each change at once (``membership.write_profile``) leaves: members, stays
(opened, closed, opened and closed within the batch) and timers, for sequences of
changes of several people in several segments, on SQLite and PostgreSQL."""

from __future__ import annotations

import functools
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, delete, select

from whenthen.segments import membership
from whenthen.segments.tables import segment_history, segment_members, segment_timers
from whenthen.storage import Database

NOW = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
SEGMENTS = ["s1", "s2", "s3"]
PEOPLE = ["p1", "p2"]
DUES = [None, NOW + timedelta(hours=1), NOW + timedelta(days=2)]

# A step: a person, the segments whose answer flips, and a timer per segment (an index
# into DUES, or absent: left as it is).
steps = st.lists(
    st.tuples(
        st.sampled_from(PEOPLE),
        st.sets(st.sampled_from(SEGMENTS)),
        st.dictionaries(st.sampled_from(SEGMENTS), st.integers(0, len(DUES) - 1), max_size=3),
    ),
    max_size=8,
)
# Who is a member, and the timers, before the batch.
starts = st.tuples(
    st.sets(st.tuples(st.sampled_from(PEOPLE), st.sampled_from(SEGMENTS))),
    st.dictionaries(st.tuples(st.sampled_from(PEOPLE), st.sampled_from(SEGMENTS)), st.integers(1, 2)),
)


def _state(
    conn: Connection, ws: str
) -> tuple[set[tuple[str, str, datetime]], Counter[Any], dict[Any, datetime]]:
    """The workspace's rows, its people's ids without the workspace's prefix."""
    members = {
        (_bare(r.profile_id), r.segment_id, r.since)
        for r in conn.execute(select(segment_members).where(segment_members.c.workspace_id == ws))
    }
    stays = Counter(
        (_bare(r.profile_id), r.segment_id, r.entered_at, r.exited_at)
        for r in conn.execute(select(segment_history).where(segment_history.c.workspace_id == ws))
    )
    timers = {
        (_bare(r.profile_id), r.segment_id): r.due_at
        for r in conn.execute(select(segment_timers).where(segment_timers.c.workspace_id == ws))
    }
    return members, stays, timers


def _bare(pid: str) -> str:
    return pid.split(":", 1)[1]


def _start(conn: Connection, ws: str, members: set[tuple[str, str]], timers: dict[Any, int]) -> None:
    """The rows before the batch; a person's id in ``ws`` is ``<ws>:<person>`` (the
    tables' keys do not hold the workspace)."""
    for table in (segment_members, segment_history, segment_timers):
        conn.execute(delete(table).where(table.c.workspace_id == ws))
    before = NOW - timedelta(days=1)
    for person, seg in members:
        row = {"segment_id": seg, "profile_id": f"{ws}:{person}", "workspace_id": ws}
        conn.execute(segment_members.insert().values(**row, since=before))
        conn.execute(segment_history.insert().values(**row, entered_at=before))
    for (person, seg), i in timers.items():
        row = {"segment_id": seg, "profile_id": f"{ws}:{person}", "workspace_id": ws}
        conn.execute(segment_timers.insert().values(**row, due_at=DUES[i]))


def _read(conn: Connection, ws: str, pid: str) -> tuple[set[str], dict[str, datetime]]:
    members = set(
        conn.execute(
            select(segment_members.c.segment_id).where(
                segment_members.c.workspace_id == ws, segment_members.c.profile_id == pid
            )
        ).scalars()
    )
    timers = {
        r.segment_id: r.due_at
        for r in conn.execute(
            select(segment_timers).where(
                segment_timers.c.workspace_id == ws, segment_timers.c.profile_id == pid
            )
        )
    }
    return members, timers


def _change(ws: str, pid: str, members: set[str], flips: set[str], timers: dict[str, int]) -> Any:
    changes = membership.ProfileChanges(ws, pid)
    for seg in sorted(flips):
        changes.move(seg, seg, seg not in members, "cause")
    changes.timers = {seg: DUES[i] for seg, i in timers.items()}
    return changes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=starts, batch=steps)
def test_held_writes_leave_the_rows_writing_each_change_leaves(
    db: Database, start: tuple[set[tuple[str, str]], dict[Any, int]], batch: list[Any]
) -> None:
    members, timers = start
    announce = membership.one_by_one(membership.no_emit)
    one_by_one, held_ws, ahead_ws = "ws-each", "ws-held", "ws-ahead"
    with db.write() as conn:
        for ws in (one_by_one, held_ws, ahead_ws):
            _start(conn, ws, members, timers)
        held = membership.HeldWrites()
        # A third batch reads its people ahead (as the pipeline does), then never reads.
        ahead = membership.HeldWrites()
        ahead.prefetch(conn, ahead_ws, [f"{ahead_ws}:{p}" for p in PEOPLE])
        for person, flips, new_timers in batch:
            pid = f"{ahead_ws}:{person}"
            current, _ = ahead.state(conn, ahead_ws, pid, NOW, _not_read)
            ahead.record(_change(ahead_ws, pid, current, flips, new_timers))
            # Each change at once, on what the database holds...
            pid = f"{one_by_one}:{person}"
            current, existing = _read(conn, one_by_one, pid)
            membership.write_profile(
                conn, _change(one_by_one, pid, current, flips, new_timers), existing, NOW, announce
            )
            # ... and held, on what the batch holds.
            pid = f"{held_ws}:{person}"
            current, _ = held.state(conn, held_ws, pid, NOW, functools.partial(_read, conn, held_ws, pid))
            held.record(_change(held_ws, pid, current, flips, new_timers))
        held.flush(conn)
        ahead.flush(conn)
        assert _state(conn, held_ws) == _state(conn, one_by_one)
        assert _state(conn, ahead_ws) == _state(conn, one_by_one)
        assert held.people == {}


def _not_read() -> tuple[set[str], dict[str, datetime]]:
    raise AssertionError("a person read ahead is not read again")


def test_a_read_ahead_leaves_a_person_already_held_as_the_batch_changed_them(db: Database) -> None:
    with db.write() as conn:
        _start(conn, "ws", {("p1", "s1")}, {("p2", "s2"): 1})
        held = membership.HeldWrites()
        members, _ = held.state(conn, "ws", "ws:p1", NOW, functools.partial(_read, conn, "ws", "ws:p1"))
        held.record(_change("ws", "ws:p1", members, {"s1", "s3"}, {}))  # leaves s1, enters s3
        held.prefetch(conn, "ws", ["ws:p1", "ws:p2", "ws:nobody"])
        assert held.state(conn, "ws", "ws:p1", NOW, _not_read)[0] == {"s3"}
        assert held.state(conn, "ws", "ws:p2", NOW, _not_read) == (set(), {"s2": DUES[1]})
        assert held.state(conn, "ws", "ws:nobody", NOW, _not_read) == (set(), {})


def test_a_change_at_another_now_writes_the_held_ones_first(db: Database) -> None:
    with db.write() as conn:
        held = membership.HeldWrites()
        read = functools.partial(_read, conn, "ws", "ws:p1")
        members, _ = held.state(conn, "ws", "ws:p1", NOW, read)
        assert members == set()
        held.record(_change("ws", "ws:p1", members, {"s1"}, {}))
        later = NOW + timedelta(seconds=1)
        members, _ = held.state(conn, "ws", "ws:p1", later, read)
        assert members == {"s1"}  # read back from the database: the first change was written
        held.record(_change("ws", "ws:p1", members, {"s1"}, {}))
        held.flush(conn)
        stays = _state(conn, "ws")[1]
        assert stays == Counter({("p1", "s1", NOW, later): 1})
