"""The bulk paths of segment membership against the per-profile ones, on SQLite and PostgreSQL.

* ``views.load_views`` (many profiles, only the parts the definitions read) gives the
  evaluator the same answers and the same ``next_change`` as each person's full view;
* ``compiler.timer_candidates_query`` names every profile whose ``next_change`` is set;
* a set-based recompute (``save_segment``) and bulk timer firing (``fire_due_timers``)
  leave exactly the members, timers and announcements the evaluator says, one by one;
* ``pipeline.announce`` appends the very rows ``pipeline.emit`` appends, one at a time;
* the pipeline's relevance rule (``segments.Change``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, delete, insert, select, text

from tests.integration.test_segment_compiler import (
    NOW,
    WS,
    Person,
    _event_row,
    _profile_row,
    definitions,
    people,
    store,
)
from tests.support.plans import Statements, sqlite_plan
from whenthen import profiles as profiles_facade
from whenthen.pipeline import service as pipeline
from whenthen.profiles.tables import identities, profiles
from whenthen.segments import service as segments
from whenthen.segments.compiler import members_query, timer_candidates_query
from whenthen.segments.definition import SegmentDefinition, parse_segment
from whenthen.segments.evaluator import ProfileView, evaluate, next_change
from whenthen.segments.membership import Announcement
from whenthen.segments.tables import segment_history, segment_members, segment_timers
from whenthen.segments.tables import segments as segment_rows
from whenthen.segments.views import Reads, load_views
from whenthen.storage import Database
from whenthen.tracking.tables import events

PARTITIONS = 8


def _view(p: Person) -> ProfileView:
    """The person as the service sees them: no scoring model is stored, so nothing decays."""
    return dataclasses.replace(p.view(), half_lives={})


# ---- reading many views ---------------------------------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(population=people(), defs=st.lists(definitions, min_size=1, max_size=3))
def test_bulk_views_answer_like_full_views_and_timer_candidates_cover_every_timer(
    db: Database, population: list[Person], defs: list[SegmentDefinition]
) -> None:
    store(db, population)
    ids = [p.id for p in population]
    with db.read() as conn:
        for d in defs:
            views = load_views(conn, WS, ids, population[0].view().half_lives, Reads.of([d]))
            stmt = timer_candidates_query(
                d,
                workspace_id=WS,
                now=NOW,
                dialect_name=db.dialect.value,
                half_lives=views[ids[0]].half_lives,
            )
            candidates = set(conn.execute(stmt).scalars()) if stmt is not None else set()
            for p in population:
                full = p.view()
                assert evaluate(d, views[p.id], NOW) == evaluate(d, full, NOW), p
                due = next_change(d, full, NOW)
                assert next_change(d, views[p.id], NOW) == due, p
                if due is not None:
                    assert p.id in candidates, (p, d)
            assert candidates <= set(ids)  # never the merged-away or other workspace's copies


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(population=people(), defs=st.lists(definitions, min_size=1, max_size=3), picks=st.data())
def test_queries_restricted_to_some_people_answer_as_the_whole_population_does_for_them(
    db: Database, population: list[Person], defs: list[SegmentDefinition], picks: st.DataObject
) -> None:
    """``among``: the members and timer candidates among listed people (as a timer batch
    asks) are the whole population's, intersected with the list; merged-away copies,
    other workspaces' copies and unknown ids listed are never answered."""
    store(db, population)
    ids = [p.id for p in population]
    chosen = picks.draw(st.lists(st.sampled_from(ids), unique=True))
    listed = [*chosen, f"{ids[0]}-merged", f"{ids[0]}-other", "nobody"]
    lives = population[0].view().half_lives
    d_name = db.dialect.value
    with db.read() as conn:
        for d in defs:
            whole = set(
                conn.execute(
                    members_query(d, workspace_id=WS, now=NOW, dialect_name=d_name, half_lives=lives)
                ).scalars()
            )
            among = members_query(
                d, workspace_id=WS, now=NOW, dialect_name=d_name, half_lives=lives, among=True
            )
            assert set(conn.execute(among, {"pids": listed}).scalars()) == whole & set(listed)
            stmt = timer_candidates_query(d, workspace_id=WS, now=NOW, dialect_name=d_name, half_lives=lives)
            restricted = timer_candidates_query(
                d, workspace_id=WS, now=NOW, dialect_name=d_name, half_lives=lives, among=True
            )
            if stmt is None:
                assert restricted is None
                continue
            assert restricted is not None
            everyone = set(conn.execute(stmt).scalars())
            assert set(conn.execute(restricted, {"pids": listed}).scalars()) == everyone & set(listed)


# ---- recompute and timers against the per-profile answer --------------------------------

WINDOWED = {
    "condition": {
        "kind": "or",
        "conditions": [
            {"kind": "event", "event": "A", "at_least": 2, "within_last": "1d"},
            {
                "kind": "and",
                "conditions": [
                    {"kind": "trait", "path": "plan", "value": "pro"},
                    {"kind": "event", "event": "B", "within_last": "7d"},
                ],
            },
        ],
    }
}


def _population() -> list[Person]:
    out = []
    for i in range(60):
        evs: list[tuple[str, dict[str, Any], datetime]] = []
        for k in range(i % 5):
            evs.append(("A", {}, NOW - timedelta(hours=3 + 7 * k + i % 11)))
        if i % 3 == 0:
            evs.append(("B", {"x": i}, NOW - timedelta(days=i % 9, minutes=i)))
        out.append(Person(id=f"p{i:03d}", traits={"plan": "pro" if i % 2 else "free"}, events=evs))
    return out


def _members(conn: Connection, key: str) -> set[str]:
    seg = segments.get_segment(conn, WS, key)
    return set(
        conn.execute(
            select(segment_members.c.profile_id).where(segment_members.c.segment_id == seg.id)
        ).scalars()
    )


def _timers(conn: Connection, key: str) -> dict[str, datetime]:
    seg = segments.get_segment(conn, WS, key)
    return {
        r.profile_id: r.due_at
        for r in conn.execute(select(segment_timers).where(segment_timers.c.segment_id == seg.id))
    }


def _recording() -> tuple[list[tuple[str, str, str, datetime | None]], segments.Emit]:
    seen: list[tuple[str, str, str, datetime | None]] = []

    def emit(
        conn: Connection,
        ws: str,
        profile_id: str,
        name: str,
        properties: dict[str, Any],
        *,
        now: datetime,
        cause: str,
        at: datetime | None = None,
    ) -> None:
        seen.append((profile_id, name, cause, at))

    return seen, emit


def test_bulk_recompute_and_bulk_timers_give_the_evaluators_membership(db: Database) -> None:
    population = _population()
    store(db, population)
    d = parse_segment(WINDOWED)
    seen, emit = _recording()
    with db.write() as conn:
        seg, counts = segments.save_segment(conn, WS, "w", "Windowed", WINDOWED, NOW, emit=emit)
    want = {p.id for p in population if evaluate(d, _view(p), NOW)}
    assert 0 < len(want) < len(population)
    with db.read() as conn:
        assert _members(conn, "w") == want
        assert _timers(conn, "w") == {
            p.id: t for p in population if (t := next_change(d, _view(p), NOW)) is not None
        }
    assert counts == {"entered": len(want), "exited": 0}
    assert sorted(seen) == sorted((p, segments.ENTERED, f"segment:{seg.id}:v1:{p}", None) for p in want)

    # Time passes with no new data: the bulk firing (small batches, to cross batch
    # boundaries) settles everyone as the evaluator says at each step, and reschedules.
    for later in (timedelta(hours=20), timedelta(days=1, hours=5), timedelta(days=3), timedelta(days=10)):
        at = NOW + later
        seen.clear()
        with db.read() as conn:
            before = _members(conn, "w")
            due = {p: t for p, t in _timers(conn, "w").items() if t <= at}
        fired = 0
        while True:
            with db.write() as conn:
                n = segments.fire_due_timers(conn, at, limit=7, emit=emit)
            if not n:
                break
            fired += n
        assert fired == len(due)
        now_in = {p.id for p in population if evaluate(d, _view(p), at)}
        with db.read() as conn:
            assert _members(conn, "w") == now_in
            assert _timers(conn, "w") == {
                p.id: t for p in population if (t := next_change(d, _view(p), at)) is not None
            }
            open_stays = set(
                conn.execute(
                    select(segment_history.c.profile_id).where(segment_history.c.exited_at.is_(None))
                ).scalars()
            )
        assert open_stays == now_in
        expected = [
            (
                p,
                segments.EXITED if p in before else segments.ENTERED,
                f"segment-timer:{seg.id}:v1:{p}:{due[p].isoformat()}",
                due[p],  # the timer's due time leads the announcement's message id
            )
            for p in (before ^ now_in)
        ]
        assert sorted(seen) == sorted(expected)

    # Saving again with another definition: entries and exits are the diff.
    with db.write() as conn:
        _, counts = segments.save_segment(
            conn, WS, "w", "Pro", {"condition": {"kind": "trait", "path": "plan", "value": "pro"}}, NOW
        )
        members = _members(conn, "w")
        assert _timers(conn, "w") == {}
    assert members == {p.id for p in population if p.traits["plan"] == "pro"}
    assert counts["entered"] + counts["exited"] > 0


def test_timers_of_merged_erased_or_deleted_are_dropped(db: Database) -> None:
    population = _population()
    store(db, population, decoys=False)
    with db.write() as conn:
        segments.save_segment(conn, WS, "w", "Windowed", WINDOWED, NOW)
        timers = _timers(conn, "w")
        gone, merged = sorted(timers)[:2]
        conn.execute(delete(profiles).where(profiles.c.id == gone))
        conn.execute(profiles.update().where(profiles.c.id == merged).values(merged_into=sorted(timers)[2]))
        segments.save_segment(conn, WS, "other", "Other", WINDOWED, NOW)
        others = _timers(conn, "other")
        assert gone not in others
        assert merged not in others
        other = segments.get_segment(conn, WS, "other")
        conn.execute(delete(segment_rows).where(segment_rows.c.id == other.id))
    seen, emit = _recording()
    with db.write() as conn:
        n = segments.fire_due_timers(conn, NOW + timedelta(days=30), limit=10_000, emit=emit)
        assert n == len(timers) + len(others)
        assert conn.execute(select(segment_timers)).all() == []
        # Dropped silently: the merged-away and the erased announce nothing.
        assert {p for p, _, _, _ in seen} <= set(timers) - {gone, merged}
        assert {gone, merged} <= _members(conn, "w")  # left as they were (on_merge / forget clear them)


def test_a_profile_another_transaction_holds_is_left_due_for_a_later_step(pg_url: str) -> None:
    """PostgreSQL, several workers: a pipeline worker applying a person's events holds
    their profile row. The timer step neither waits for it (it could be waiting for the
    timer row the step claimed) nor decides on what it cannot see yet: that person's
    timer stays due, untouched, and a later step settles them."""
    db = Database(pg_url)
    try:
        _held_profile_is_left(db)
    finally:
        db.dispose()


def _held_profile_is_left(db: Database) -> None:
    population = _population()
    store(db, population, decoys=False)
    d = parse_segment(WINDOWED)
    with db.write() as conn:
        segments.save_segment(conn, WS, "w", "Windowed", WINDOWED, NOW)
        timers = _timers(conn, "w")
        before = _members(conn, "w")
    at = NOW + timedelta(days=3)
    due = {p: t for p, t in timers.items() if t <= at}
    # Someone due whose membership the step would change.
    moving = sorted(p.id for p in population if p.id in due and evaluate(d, _view(p), at) != (p.id in before))
    held = moving[0]
    holder = db.engine.connect()
    try:
        holder.begin()
        holder.execute(select(profiles.c.id).where(profiles.c.id == held).with_for_update())
        with db.write() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # waiting would fail, not hang
            assert segments.fire_due_timers(conn, at, limit=10_000) == len(due) - 1
        with db.read() as conn:
            assert _timers(conn, "w")[held] == timers[held]  # left as it was, still due
            assert (held in _members(conn, "w")) == (held in before)
        holder.rollback()
    finally:
        holder.close()
    with db.write() as conn:
        assert segments.fire_due_timers(conn, at, limit=10_000) == 1
    with db.read() as conn:
        assert _members(conn, "w") == {p.id for p in population if evaluate(d, _view(p), at)}
        assert _timers(conn, "w") == {
            p.id: t for p in population if (t := next_change(d, _view(p), at)) is not None
        }


# ---- bulk announcements ---------------------------------------------------------------


def _person(conn: Connection, pid: str, ids: list[tuple[str, str]], merged_into: str | None = None) -> None:
    conn.execute(
        insert(profiles).values(
            id=pid,
            workspace_id=WS,
            traits={},
            trait_times={},
            event_count=0,
            merged_into=merged_into,
            created_at=NOW,
            updated_at=NOW,
            version=1,
        )
    )
    for n, (kind, value) in enumerate(ids):
        conn.execute(
            insert(identities).values(
                workspace_id=WS, kind=kind, value=value, profile_id=pid, created_at=NOW + timedelta(seconds=n)
            )
        )


def _log(conn: Connection) -> list[tuple[Any, ...]]:
    rows = conn.execute(
        select(
            events.c.message_id,
            events.c.type,
            events.c.event,
            events.c.user_id,
            events.c.anonymous_id,
            events.c.timestamp,
            events.c.payload,
            events.c.partition,
            events.c.state,
        ).order_by(events.c.message_id)
    )
    return [tuple(r) for r in rows]


def test_bulk_announcements_equal_one_by_one_emits(db: Database) -> None:
    with db.write() as conn:
        _person(conn, "ann", [("user_id", "u-ann-2"), ("anonymous_id", "a-ann"), ("user_id", "u-ann-1")])
        _person(conn, "anon", [("anonymous_id", "a-2"), ("anonymous_id", "a-1")])
        _person(conn, "survivor", [("user_id", "u-surv")])
        _person(conn, "gone", [("user_id", "u-gone")], merged_into="survivor")
        _person(conn, "nobody", [])
    items = [
        Announcement(pid, name, {"segment": key}, f"cause-{pid}-{key}", at)
        for pid in ("ann", "anon", "gone", "nobody", "missing", "survivor")
        for name, key, at in ((segments.ENTERED, "a", None), (segments.EXITED, "b", NOW - timedelta(days=1)))
    ]
    items.append(items[0])  # the same cause twice: one event
    items.append(items[1])  # with its own time too
    logs = []
    for bulk in (False, True):
        with db.engine.connect() as conn:
            tx = conn.begin()
            if bulk:
                pipeline.announce(conn, WS, items, now=NOW, partitions=PARTITIONS)
            else:
                emit = functools.partial(pipeline.emit, partitions=PARTITIONS)
                segments.one_by_one(emit)(conn, WS, items, now=NOW)
            logs.append(_log(conn))
            tx.rollback()
    assert logs[0] == logs[1]
    assert len(logs[0]) == 8  # ann, anon, gone (as survivor), survivor; two each
    with db.read() as conn:
        assert profiles_facade.get_profile(conn, WS, "gone").id == "survivor"


# ---- the pipeline's relevance rule ------------------------------------------------------


def _segment(key: str, condition: dict[str, Any]) -> segments.Segment:
    return segments.Segment(
        id=key,
        workspace_id=WS,
        key=key,
        name=key,
        definition=parse_segment({"condition": condition}),
        document={},
        version=1,
        created_at=NOW,
        updated_at=NOW,
    )


def test_a_change_affects_the_segments_that_read_what_it_changed() -> None:
    by_event = _segment("ev", {"kind": "event", "event": "A"})
    by_trait = _segment("tr", {"kind": "trait", "path": "plan", "value": "pro"})
    by_score = _segment("sc", {"kind": "score", "model": "m1", "op": "gte", "value": 5})
    by_stage = _segment("st", {"kind": "stage", "in": ["lead"]})
    by_tag = _segment("tg", {"kind": "tag", "tag": "vip"})
    every = [by_event, by_trait, by_score, by_stage, by_tag]

    def hit(change: segments.Change) -> set[str]:
        return {s.key for s in every if change.affects(s)}

    assert hit(segments.EVERYTHING_CHANGED) == {"ev", "tr", "sc", "st", "tg"}
    assert hit(segments.Change(event="A")) == {"ev"}
    assert hit(segments.Change(event="B")) == set()
    assert hit(segments.Change(event="B", traits=True)) == {"tr"}
    assert hit(segments.Change(event="B", scores=frozenset({"m1"}))) == {"sc"}
    assert hit(segments.Change(event="B", scores=frozenset({"m2"}))) == set()
    assert hit(segments.Change(event="B", stage=True)) == {"st"}
    assert by_score.timed
    assert not by_trait.timed


def _one_event_each(db: Database, n: int, name: str, at: Callable[[int], datetime]) -> None:
    """Replace the population: ``n`` people on plan pro (p0, p1, ...), each with one
    ``name`` event at ``at(i)``."""
    with db.write() as conn:
        for table in (events, profiles):
            conn.execute(delete(table))
        conn.execute(insert(profiles), [_profile_row(Person(f"p{i}", {"plan": "pro"}), WS) for i in range(n)])
        conn.execute(insert(events), [_event_row(WS, f"p{i}", name, {}, at(i)) for i in range(n)])


def test_population_queries_hash_their_sets_on_postgresql(db: Database) -> None:
    """ADR 0008: an event condition is ``profiles.id IN (subquery)``; under an ``OR``
    PostgreSQL hashes that set only when it expects it to fit in ``work_mem``, and rescans
    it for every profile otherwise. ``for_population`` gives the transaction the memory
    (``POPULATION_WORK_MEM``); here the smallest ``work_mem`` stands for a set too big for
    the default one. On SQLite it changes nothing (the set is always built once)."""
    n = 6000
    _one_event_each(db, n, "Page Viewed", lambda i: NOW - timedelta(hours=1))
    d = parse_segment(
        {
            "condition": {
                "kind": "or",
                "conditions": [
                    {"kind": "trait", "path": "plan", "op": "eq", "value": "team"},
                    {"kind": "event", "event": "Page Viewed", "within_last": "7d"},
                ],
            }
        }
    )
    query = members_query(d, workspace_id=WS, now=NOW, dialect_name=db.dialect.value)
    with db.write() as conn:
        if db.dialect.value != "postgresql":
            segments.for_population(conn)
            assert len(conn.execute(query).all()) == n
            return
        conn.exec_driver_sql("ANALYZE events")
        conn.exec_driver_sql("ANALYZE profiles")
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))

        def plan() -> str:
            return "\n".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql))

        conn.exec_driver_sql("SET LOCAL work_mem = '64kB'")
        assert "hashed SubPlan" not in plan()
        segments.for_population(conn)
        assert conn.exec_driver_sql("SHOW work_mem").scalar() == segments.POPULATION_WORK_MEM
        assert "hashed SubPlan" in plan()
        assert len(conn.execute(query).all()) == n
    with db.read() as conn:  # for the transaction only
        assert conn.exec_driver_sql("SHOW work_mem").scalar() != segments.POPULATION_WORK_MEM


def test_queries_restricted_to_a_batch_probe_its_people_on_sqlite(db: Database) -> None:
    """A timer batch asks the compiler about its people only (``among``): on SQLite, which
    has no statistics, the plan must probe the listed ids (the profiles' key, the
    person's events by ``ix_events_profile_time``) rather than walk the workspace's
    profiles or every event of the name, which would cost a pass over the population per
    batch. On PostgreSQL the planner chooses with statistics; the answer is checked."""
    n = 300
    _one_event_each(db, n, "Trial Started", lambda i: NOW - timedelta(days=i % 20))
    d = parse_segment({"condition": {"kind": "event", "event": "Trial Started", "within_last": "14d"}})
    listed = [f"p{i}" for i in range(0, n, 7)]
    queries = [
        members_query(d, workspace_id=WS, now=NOW, dialect_name=db.dialect.value, among=True),
        timer_candidates_query(d, workspace_id=WS, now=NOW, dialect_name=db.dialect.value, among=True),
    ]
    with db.read() as conn:
        for q in queries:
            assert q is not None
            with Statements(conn) as sent:
                got = set(conn.execute(q, {"pids": listed}).scalars())
            assert got == {p for p in listed if int(p[1:]) % 20 <= 14}
            if db.dialect.value == "postgresql":
                continue
            text_ = "\n".join(sqlite_plan(conn, *sent.seen[-1]))
            assert "ix_profiles_workspace_last_seen" not in text_, text_
            assert "ix_events_workspace_event_time" not in text_, text_
            assert "SEARCH profiles USING INDEX sqlite_autoindex_profiles_1 (id=?)" in text_, text_
            assert "USING INDEX ix_events_profile_time (profile_id=?" in text_, text_


def test_timer_announcements_are_led_by_their_due_time_in_the_log(db: Database) -> None:
    """The exits a batch of timers announces reach the log under message ids in the
    timers' due order (the unique message-id index grows at its edge), and a second
    announcement of the same timer's exit finds the first."""
    population = _population()
    store(db, population, decoys=False)
    announce = functools.partial(pipeline.announce, partitions=PARTITIONS)
    with db.write() as conn:
        conn.execute(
            insert(identities),
            [
                {
                    "workspace_id": WS,
                    "kind": "user_id",
                    "value": f"u-{p.id}",
                    "profile_id": p.id,
                    "created_at": NOW,
                }
                for p in population
            ],
        )
        segments.save_segment(conn, WS, "w", "Windowed", WINDOWED, NOW, announce=announce)
        due = _timers(conn, "w")
        before = _members(conn, "w")
    at = NOW + timedelta(days=30)
    with db.write() as conn:
        assert segments.fire_due_timers(conn, at, limit=10_000, announce=announce) == len(due)
        left = before - _members(conn, "w")
        rows = conn.execute(
            select(events.c.message_id, events.c.payload).where(events.c.event == segments.EXITED)
        ).all()
    assert len({due[p] for p in left}) > 2  # several due times to order
    by_id = sorted((mid, payload["userId"]) for mid, payload in rows)
    assert len(by_id) == len(left)
    # The user ids are "u-<profile id>"; the exits sorted by message id are the
    # leavers sorted by due time.
    stamps = [(due[uid.removeprefix("u-")], uid) for _, uid in by_id]
    assert [d for d, _ in stamps] == sorted(d for d, _ in stamps)
    with db.write() as conn:
        again = segments.Announcement(
            by_id[0][1].removeprefix("u-"),
            segments.EXITED,
            {"segment": "w"},
            f"segment-timer:{segments.get_segment(conn, WS, 'w').id}:v1:{by_id[0][1].removeprefix('u-')}"
            f":{stamps[0][0].isoformat()}",
            stamps[0][0],
        )
        assert pipeline.announce(conn, WS, [again], now=at, partitions=PARTITIONS) == 0
