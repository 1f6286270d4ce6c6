"""A pipeline batch holds what the segments see of its people (ADR 0020): read once at
the batch's start, then kept current as the batch applies their events, or dropped when
something else writes about them. Each scenario puts one kind of write into a single
batch, followed by a call that re-evaluates every segment of the person from the held
view (an ``identify``): a stale view would make the person leave, or miss, a segment
there. The recheck marks that would repair it later are switched off, so only the
batch's own evaluation can move the person. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from tests.scenarios.test_scoring import MODEL as SCORING_MODEL
from tests.support.journey_env import JourneyEnv
from whenthen import profiles, scoring, tagging
from whenthen.segments import service as segments


@pytest.fixture(autouse=True)
def no_rechecks(monkeypatch: pytest.MonkeyPatch) -> None:
    def mark_nothing(*args: Any, **kwargs: Any) -> None:
        return None

    monkeypatch.setattr(profiles, "mark_for_recheck", mark_nothing)


def save_segment(env: JourneyEnv, key: str, condition: dict[str, Any]) -> None:
    with env.c.db.write() as conn:
        segments.save_segment(conn, env.ws.id, key, key, {"condition": condition}, env.clock.now())


def members(env: JourneyEnv, key: str) -> list[str]:
    with env.c.db.read() as conn:
        rows, _ = segments.members(conn, env.ws.id, key)
    return [r["profile_id"] for r in rows]


def moves(env: JourneyEnv, segment: str) -> list[str]:
    """The person's entries and exits of ``segment``, in log order."""
    out = [(e["user"], "in") for e in env.system_events("Segment Entered") if e["segment"] == segment]
    out += [(e["user"], "out") for e in env.system_events("Segment Exited") if e["segment"] == segment]
    return [move for _, move in out]


def test_the_events_of_the_batch_itself_are_counted(env: JourneyEnv) -> None:
    save_segment(env, "twice", {"kind": "event", "event": "Viewed", "at_least": 2})
    save_segment(env, "once", {"kind": "event", "event": "Viewed", "exactly": 1})
    save_segment(env, "pro", {"kind": "trait", "path": "plan", "value": "pro"})
    env.identify("ann", plan="free")  # known before the batch: her view is read ahead
    env.calls(
        {"type": "track", "userId": "ann", "event": "Viewed", "messageId": "v1"},
        {"type": "track", "userId": "ann", "event": "Added to Cart"},
        {"type": "track", "userId": "ann", "event": "Viewed", "messageId": "v2"},
        {"type": "identify", "userId": "ann", "traits": {"plan": "pro"}},
    )
    pid = env.profile("ann").id
    assert members(env, "twice") == [pid]
    assert moves(env, "twice") == ["in"]
    # In at the first view, out at the second, and still out at the identify.
    assert members(env, "once") == []
    assert moves(env, "once") == ["in", "out"]
    assert members(env, "pro") == [pid]  # the traits of the identify, not those read ahead


def test_a_score_and_a_stage_moved_earlier_in_the_batch_are_seen_later_in_it(env: JourneyEnv) -> None:
    with env.c.db.write() as conn:
        now = env.clock.now()
        scoring.save_model(
            conn,
            env.ws.id,
            {"key": "interest", "name": "Interest", "rules": [{"id": "demo", "event": "Demo", "points": 5}]},
            now=now,
        )
        scoring.save_lifecycle(
            conn,
            env.ws.id,
            {"stages": ["subscriber", "lead"], "rules": [{"stage": "lead", "event": "Signed Up"}]},
            now=now,
        )
    save_segment(env, "interested", {"kind": "score", "model": "interest", "op": "gte", "value": 5})
    save_segment(env, "leads", {"kind": "stage", "in": ["lead"]})
    env.identify("bob", plan="free")
    env.calls(
        {"type": "track", "userId": "bob", "event": "Demo"},
        {"type": "track", "userId": "bob", "event": "Signed Up"},
        # Every segment of bob's again, from the view the batch holds.
        {"type": "identify", "userId": "bob", "traits": {"plan": "pro"}},
    )
    pid = env.profile("bob").id
    assert members(env, "interested") == [pid]
    assert members(env, "leads") == [pid]
    assert moves(env, "interested") == ["in"]
    assert moves(env, "leads") == ["in"]


def test_a_tag_written_by_a_rule_in_the_batch_is_seen_later_in_it(env: JourneyEnv) -> None:
    with env.c.db.write() as conn:
        tagging.save_rule(
            conn, env.ws.id, {"key": "big", "tag": "big-spender", "event": "Big Order"}, now=env.clock.now()
        )
    save_segment(env, "big", {"kind": "tag", "tag": "big-spender"})
    env.identify("cy", plan="free")
    env.calls(
        {"type": "track", "userId": "cy", "event": "Big Order"},
        {"type": "identify", "userId": "cy", "traits": {"plan": "pro"}},
    )
    assert members(env, "big") == [env.profile("cy").id]


@pytest.mark.parametrize(
    "node",
    [
        "{kind: update_profile, add_tags: [vip]}",
        "{kind: add_to_list, list: vips}",
        "{kind: update_profile, stage: customer}",
    ],
)
def test_tags_lists_and_stages_a_journey_writes_in_the_batch_are_seen_later_in_it(
    env: JourneyEnv, node: str
) -> None:
    with env.c.db.write() as conn:
        scoring.save_lifecycle(
            conn, env.ws.id, {"stages": ["lead", "customer"], "rules": []}, now=env.clock.now()
        )
    save_segment(
        env,
        "vip",
        {
            "kind": "or",
            "conditions": [
                {"kind": "tag", "tag": "vip"},
                {"kind": "list", "list": "vips"},
                {"kind": "stage", "in": ["customer"]},
            ],
        },
    )
    env.publish(
        f"""
        key: promote
        name: Promote
        trigger: {{kind: event, event: Upgrade}}
        start: act
        nodes:
          act: {node}
        """
    )
    env.identify("dan", plan="free")
    env.calls(
        {"type": "track", "userId": "dan", "event": "Upgrade"},
        {"type": "identify", "userId": "dan", "traits": {"plan": "pro"}},
    )
    assert members(env, "vip") == [env.profile("dan").id]


def test_a_merge_in_the_batch_reads_the_survivors_view_again(env: JourneyEnv) -> None:
    save_segment(env, "twice", {"kind": "event", "event": "Viewed", "at_least": 2})
    env.identify("eve", plan="free")
    env.track("eve", "Viewed")
    env.calls(
        {"type": "track", "userId": "eve", "event": "Opened"},  # her view held from here
        {"type": "track", "anonymousId": "anon-eve", "event": "Viewed"},
        # The visitor logs in: her anonymous profile merges into eve's, whose view (read
        # ahead with one Viewed) must now count both.
        {"type": "identify", "userId": "eve", "anonymousId": "anon-eve"},
    )
    assert members(env, "twice") == [env.profile("eve").id]


def test_a_merge_in_the_batch_counts_the_events_held_for_the_merged_away_visitor(env: JourneyEnv) -> None:
    save_segment(env, "twice", {"kind": "event", "event": "Viewed", "at_least": 2})
    env.identify("gus", plan="free")
    env.track("gus", "Viewed")
    env.calls({"type": "track", "anonymousId": "anon-gus", "event": "Opened"})  # the visitor exists
    env.calls(
        # Both views held from the batch's start: the visitor's event is kept in her view
        # and written as hers only at the batch's end, unless the merge writes it first.
        {"type": "track", "userId": "gus", "event": "Opened"},
        {"type": "track", "anonymousId": "anon-gus", "event": "Viewed"},
        {"type": "identify", "userId": "gus", "anonymousId": "anon-gus"},
    )
    assert members(env, "twice") == [env.profile("gus").id]


def test_a_person_new_in_the_batch_is_read_with_their_first_event(env: JourneyEnv) -> None:
    save_segment(env, "twice", {"kind": "event", "event": "Viewed", "at_least": 2})
    env.calls(
        {"type": "track", "userId": "hal", "event": "Viewed", "messageId": "h1"},
        {"type": "track", "userId": "hal", "event": "Viewed", "messageId": "h2"},
    )
    assert members(env, "twice") == [env.profile("hal").id]


# ---- score rows written in the batch and read later in it (what ADR 0020 step 3 must keep) --

INTEREST = {"key": "interest", "name": "Interest", "rules": [{"id": "demo", "event": "Demo", "points": 5}]}


def _interest(env: JourneyEnv) -> None:
    with env.c.db.write() as conn:
        scoring.save_model(conn, env.ws.id, INTEREST, now=env.clock.now())


def scores(env: JourneyEnv, user: str) -> dict[str, float]:
    with env.c.db.read() as conn:
        return scoring.scores_of(conn, env.ws.id, env.profile(user).id, env.clock.now())


def test_a_person_read_in_the_batch_is_read_with_the_scores_it_stored(env: JourneyEnv) -> None:
    _interest(env)
    save_segment(env, "interested", {"kind": "score", "model": "interest", "op": "gte", "value": 5})
    # Ivy is new: her view is read at her first event, after the score it stored.
    env.calls({"type": "track", "userId": "ivy", "event": "Demo"})
    assert members(env, "interested") == [env.profile("ivy").id]
    assert scores(env, "ivy") == {"interest": 5.0}


def test_a_tag_rule_reads_a_score_stored_earlier_in_the_batch(env: JourneyEnv) -> None:
    _interest(env)
    with env.c.db.write() as conn:
        tagging.save_rule(
            conn,
            env.ws.id,
            {
                "key": "hot",
                "tag": "hot",
                "event": "Pricing",
                "condition": {"kind": "score", "model": "interest", "op": "gte", "value": 5},
            },
            now=env.clock.now(),
        )
    env.identify("jo", plan="free")
    env.calls(
        {"type": "track", "userId": "jo", "event": "Demo"},
        {"type": "track", "userId": "jo", "event": "Pricing"},
    )
    with env.c.db.read() as conn:
        assert profiles.tags_of(conn, env.ws.id, env.profile("jo").id) == ["hot"]


def test_a_merge_in_the_batch_adds_up_a_score_stored_earlier_in_it(env: JourneyEnv) -> None:
    _interest(env)
    env.identify("kai", plan="free")
    env.track("kai", "Demo")
    env.calls({"type": "track", "anonymousId": "anon-kai", "event": "Opened"})  # the visitor exists
    env.calls(
        {"type": "track", "userId": "kai", "event": "Opened"},
        {"type": "track", "anonymousId": "anon-kai", "event": "Demo"},  # her score, held
        {"type": "identify", "userId": "kai", "anonymousId": "anon-kai"},
    )
    assert scores(env, "kai") == {"interest": 10.0}
    assert env.c.worker.stats.retried_batches == 0  # not by the one-event-at-a-time retry


def test_a_score_row_stored_twice_in_the_batch_is_written_once_whole(env: JourneyEnv) -> None:
    _interest(env)
    env.identify("lu", plan="free")  # known: her (missing) score row is read ahead
    env.calls(
        {"type": "track", "userId": "lu", "event": "Demo", "messageId": "d1"},
        {"type": "track", "userId": "lu", "event": "Demo", "messageId": "d2"},
    )
    assert scores(env, "lu") == {"interest": 10.0}


def test_a_decay_timer_re_armed_by_an_event_in_the_batch_does_not_fire_again(env: JourneyEnv) -> None:
    """The model's trait rule makes every event touch the score; an event arriving when
    decay has carried it below 50 and the timer has not fired yet announces the crossing
    and re-arms the timer on the row the batch holds."""
    with env.c.db.write() as conn:
        scoring.save_model(conn, env.ws.id, SCORING_MODEL, now=env.clock.now())
    env.identify("mo", plan="free")
    env.calls(
        *(
            {"type": "track", "userId": "mo", "event": "Demo Requested", "messageId": f"r{n}"}
            for n in range(3)
        )
    )  # 60
    env.clock.advance(timedelta(days=7))  # 30 now; the decay timer is due, no worker ran
    env.calls({"type": "track", "userId": "mo", "event": "Page Viewed"})  # then the steps run
    directions = [e["direction"] for e in env.system_events("Score Threshold Crossed")]
    assert directions == ["up", "down"]
