"""The id lists of the timer path bound as one parameter (``storage.id_lists.ids_in``,
``views.of_segment``: a JSON array on SQLite, an array literal and per-id probes on
PostgreSQL) select exactly the listed rows, whatever characters the ids hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select

from whenthen.profiles.tables import profiles
from whenthen.segments import service as segments
from whenthen.segments.membership import Moves, no_emit, one_by_one, write_moves, write_timers
from whenthen.segments.tables import segment_history, segment_members, segment_timers
from whenthen.storage import Database

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
WS = "ws_lists"
SEG = "seg_lists"
# Characters that mean something in a JSON array, a PostgreSQL array literal or SQL.
AWKWARD = ['a"b', "c\\d", "e,f", "{g}", " h ", "NULL", "i'j", "plain", ""]
OTHERS = ["other_1", "a", "b", "NULL_", "{g"]


def _populate(db: Database) -> None:
    ids = AWKWARD + OTHERS
    with db.write() as conn:
        conn.execute(
            insert(profiles),
            [
                {
                    "id": p,
                    "workspace_id": WS,
                    "traits": {},
                    "trait_times": {},
                    "event_count": 0,
                    "created_at": NOW,
                    "updated_at": NOW,
                    "version": 1,
                }
                for p in ids
            ],
        )
        conn.execute(
            insert(segment_members),
            [{"segment_id": SEG, "profile_id": p, "workspace_id": WS, "since": NOW} for p in ids],
        )
        conn.execute(
            insert(segment_history),
            [{"segment_id": SEG, "profile_id": p, "workspace_id": WS, "entered_at": NOW} for p in ids],
        )
        conn.execute(
            insert(segment_timers),
            [{"segment_id": SEG, "profile_id": p, "workspace_id": WS, "due_at": NOW} for p in ids],
        )


def test_listed_rows_and_only_those(db: Database) -> None:
    _populate(db)
    later = NOW + timedelta(minutes=1)
    with db.write() as conn:
        assert segments._alive(conn, WS, AWKWARD) == (set(AWKWARD), set())
        assert segments._alive(conn, "another workspace", AWKWARD) == (set(), set())
        assert segments._members_among(conn, SEG, [*AWKWARD, "missing"]) == set(AWKWARD)
        moves = Moves(SEG, WS, "lists")
        for p in AWKWARD:
            moves.exit(p, f"cause:{p}")
        write_moves(conn, moves, later, one_by_one(no_emit))
        write_timers(conn, SEG, WS, dict.fromkeys(AWKWARD), dict.fromkeys(AWKWARD + OTHERS, NOW))
    with db.read() as conn:
        members = set(conn.execute(select(segment_members.c.profile_id)).scalars())
        timers = set(conn.execute(select(segment_timers.c.profile_id)).scalars())
        stays = {r.profile_id: r.exited_at for r in conn.execute(select(segment_history))}
    assert members == set(OTHERS)
    assert timers == set(OTHERS)
    assert stays == {**dict.fromkeys(AWKWARD, later), **dict.fromkeys(OTHERS)}
