"""The pipeline's incremental membership against the evaluator, on generated segments and
calls, SQLite and PostgreSQL.

Calls of a few people (identifies with traits, track events with properties and times
around now, visitors merged into users, people erased between calls as the admin API
erases them) go through the real pipeline in a few batches (the batch's held views,
memberships, scores and attributions, ADR 0012/0014/0020), with time let pass after
each batch (the worker's timers fire: windows end, scores decay), in a workspace whose
scoring models, lifecycle, tag rule and journey write scores, stages, tags and lists as
the events arrive. After that, every segment's members must be exactly the people the
evaluator puts in it, each read whole from the database: whatever the batches held,
kept or dropped, nothing is lost."""

from __future__ import annotations

from datetime import timedelta
from itertools import count
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from tests.integration.test_segment_compiler import EVENT_NAMES, OFFSETS, conditions, props, traits
from tests.support.ingest import send
from tests.support.journey_env import JourneyEnv
from tests.support.workspace import make_workspace
from whenthen import journeys, scoring, tagging
from whenthen.api.profiles import erase_person
from whenthen.kernel.errors import NotFound
from whenthen.profiles import lookup
from whenthen.profiles.tables import profiles
from whenthen.segments import service as segments
from whenthen.segments.evaluator import evaluate
from whenthen.segments.tables import segment_members
from whenthen.segments.views import load_view

#: Who a call names: a known user, an anonymous visitor, or both (which merges them).
WHO = [
    {"userId": "u1"},
    {"userId": "u2"},
    {"userId": "u3"},
    {"anonymousId": "a1"},
    {"anonymousId": "a2"},
    {"userId": "u1", "anonymousId": "a1"},
    {"userId": "u2", "anonymousId": "a1"},
    {"userId": "u3", "anonymousId": "a2"},
]
#: Offsets of the generated event times from now, within the log's accepted range.
TIMES = [o for o in OFFSETS if timedelta(days=-30) <= o <= timedelta(hours=2)]

identify_calls = st.tuples(
    st.sampled_from(WHO), st.fixed_dictionaries({"type": st.just("identify"), "traits": traits})
).map(lambda t: {**t[0], **t[1]})
track_calls = st.tuples(
    st.sampled_from(WHO),
    st.fixed_dictionaries(
        {
            "type": st.just("track"),
            "event": st.sampled_from(EVENT_NAMES),
            "properties": props,
            "offset": st.sampled_from(TIMES),
        }
    ),
).map(lambda t: {**t[0], **t[1]})
#: The models, stages, tags and lists the generated leaves name (test_segment_compiler):
#: m1 from A (with a half-life and thresholds), m2 from B (capped), m4 from the email events (a fixed
#: decay); a lifecycle moved by A and by Email Link Clicked; "vip" tagged by a rule on B
#: with a big total; a journey on Email Opened that tags "new", joins list l1 and moves
#: the person to "churned".
MODELS: list[dict[str, Any]] = [
    {
        "key": "m1",
        "name": "m1",
        "rules": [{"id": "a", "event": "A", "points": 5}],
        "decay": {"half_life": "1d"},
        "thresholds": [4, 9],  # crossed down by decay alone: decay timers fire and re-arm
    },
    {
        "key": "m2",
        "name": "m2",
        "rules": [{"id": "b", "event": "B", "points": 2.5, "cap": {"points": 5, "period": "1d"}}],
    },
    {
        "key": "m4",
        "name": "m4",
        "rules": [
            {"id": "o", "event": "Email Opened", "points": 10},
            {"id": "c", "event": "Email Link Clicked", "points": -4},
        ],
        "decay": {"amount": 3, "every": "2d"},
    },
]
LIFECYCLE: dict[str, Any] = {
    "stages": ["lead", "customer", "churned"],
    "rules": [{"stage": "lead", "event": "A"}, {"stage": "customer", "event": "Email Link Clicked"}],
}
TAG_RULE: dict[str, Any] = {
    "key": "big",
    "tag": "vip",
    "event": "B",
    "where": [{"path": "total", "op": "gte", "value": 2}],
}
JOURNEY: dict[str, Any] = {
    "key": "opened",
    "name": "Opened",
    "trigger": {"kind": "event", "event": "Email Opened"},
    "entry": {"frequency": "every_time"},
    "start": "tag",
    "nodes": {
        "tag": {"kind": "update_profile", "add_tags": ["new"], "next": "join"},
        "join": {"kind": "add_to_list", "list": "l1", "next": "churn"},
        "churn": {"kind": "update_profile", "stage": "churned"},
    },
}

#: A person erased between calls, as the admin API erases them.
erasures = st.sampled_from(["u1", "u2", "u3"]).map(lambda u: {"type": "erase", "userId": u})
calls = st.lists(st.one_of(identify_calls, track_calls, track_calls, erasures), min_size=1, max_size=14)
cuts = st.lists(st.integers(min_value=1, max_value=13), max_size=3)
#: Time let pass after each batch (the worker's timers then fire: windows end, scores
#: decay), around the generated windows' edges.
PAUSES = [
    timedelta(0),
    timedelta(minutes=59),
    timedelta(hours=1, seconds=1),
    timedelta(days=1),
    timedelta(days=8),
]
pauses = st.lists(st.sampled_from(PAUSES), min_size=4, max_size=4)
_ids = count()


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(definitions=st.lists(conditions, min_size=1, max_size=4), made=calls, cut=cuts, waits=pauses)
def test_incremental_membership_is_the_evaluators(
    env: JourneyEnv,
    definitions: list[dict[str, Any]],
    made: list[dict[str, Any]],
    cut: list[int],
    waits: list[timedelta],
) -> None:
    c = env.c
    now = c.clock.now()
    ws = make_workspace(c, f"agree-{next(_ids)}").id
    with c.db.write() as conn:
        for model in MODELS:
            scoring.save_model(conn, ws, model, now=now)
        scoring.save_lifecycle(conn, ws, LIFECYCLE, now=now)
        tagging.save_rule(conn, ws, TAG_RULE, now=now)
        journeys.push(conn, ws, JOURNEY, now=now)
        journeys.publish(conn, ws, JOURNEY["key"], now=now)
        for i, condition in enumerate(definitions):
            segments.save_segment(conn, ws, f"s{i}", f"s{i}", {"condition": condition}, now)
    bounds = sorted({b for b in cut if b < len(made)})
    stamped = []
    for (lo, hi), wait in zip(zip([0, *bounds], [*bounds, len(made)], strict=True), waits, strict=False):
        batch: list[dict[str, Any]] = []
        for call in made[lo:hi]:
            if call["type"] == "erase":
                send(c, ws, *batch)
                stamped.append(batch)
                batch = []
                _erase(env, ws, call["userId"])
                stamped.append([call])
                continue
            call = dict(call)
            offset = call.pop("offset", timedelta(0))
            at = (c.clock.now() + offset).isoformat()
            batch.append({**call, "timestamp": at, "messageId": f"m{next(_ids)}"})
        send(c, ws, *batch)
        stamped.append(batch)
        env.advance(seconds=wait.total_seconds())
    now = c.clock.now()
    with c.db.read() as conn:
        half_lives = segments.half_lives_of(conn, ws)
        people = list(
            conn.execute(
                select(profiles.c.id).where(profiles.c.workspace_id == ws, profiles.c.merged_into.is_(None))
            ).scalars()
        )
        for segment in segments.all_segments(conn, ws):
            # The rows themselves, not the members API (which joins the live profiles):
            # an erased or merged-away person must have left no row behind.
            got = set(
                conn.execute(
                    select(segment_members.c.profile_id).where(segment_members.c.segment_id == segment.id)
                ).scalars()
            )
            want = {
                pid
                for pid in people
                if evaluate(segment.definition, load_view(conn, ws, pid, now, half_lives), now)
            }
            assert got == want, (segment.info(), stamped)


def _erase(env: JourneyEnv, ws: str, user: str) -> None:
    """As ``DELETE /api/v1/profiles/{id}`` does, when the person exists."""
    c = env.c
    with c.db.write() as conn:
        try:
            pid = lookup(conn, ws, user_id=user).id
        except NotFound:
            return
        erase_person(conn, ws, pid, secret=c.secret, now=c.clock.now())
