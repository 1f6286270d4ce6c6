"""Lead scoring and lifecycle stages through the pipeline, and a journey that hands a lead
to sales when a score threshold is crossed, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tests.support.journey_env import JourneyEnv
from whenthen import profiles, scoring
from whenthen.api.app import create_app

MODEL = {
    "key": "interest",
    "name": "Product interest",
    "rules": [
        {"id": "view", "event": "Product Viewed", "points": 10, "cap": {"points": 30, "period": "1d"}},
        {"id": "demo", "event": "Demo Requested", "points": 20},
        {"id": "director", "trait": "title", "op": "contains", "value": "director", "points": 15},
    ],
    "decay": {"half_life": "7d"},
    "thresholds": [50],
}
LIFECYCLE = {
    "stages": ["subscriber", "lead", "mql", "sql", "customer"],
    "rules": [
        {"stage": "lead", "event": "Form Submitted"},
        {"stage": "mql", "score_model": "interest", "score_at_least": 50},
        {"stage": "customer", "event": "Order Completed"},
    ],
}
HANDOFF = {
    "key": "sales-handoff",
    "name": "Hand hot leads to sales",
    "trigger": {
        "kind": "event",
        "event": "Score Threshold Crossed",
        "where": [{"path": "model", "value": "interest"}, {"path": "direction", "value": "up"}],
    },
    "start": "mark",
    "nodes": {
        "mark": {"kind": "update_profile", "add_tags": ["sales-ready"], "stage": "sql", "next": "tell"},
        "tell": {
            "kind": "send_email",
            "email": {"subject": "Let's talk, {{ traits.first_name }}", "text": "."},
        },
    },
}


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


def test_a_hot_lead_is_scored_staged_and_handed_to_sales(env: JourneyEnv, http: TestClient) -> None:
    assert http.put("/api/v1/scoring/models/interest", json=MODEL).status_code == 200
    assert http.put("/api/v1/lifecycle", json=LIFECYCLE).status_code == 200
    env.publish(HANDOFF)
    env.identify("lea", email="lea@example.com", first_name="Lea", title="Sales Director")
    env.track("lea", "Form Submitted", form="whitepaper")
    pid = env.profile("lea").id
    assert http.get(f"/api/v1/profiles/{pid}/scores").json() == {"scores": {"interest": 15.0}}
    for n in range(4):  # only three count today: the cap is 30 a day
        env.track("lea", "Product Viewed", sku=f"p{n}")
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["interest"] == pytest.approx(45)
    assert env.mail_to("lea@example.com") == []
    env.track("lea", "Demo Requested")  # 65: crosses 50
    body = http.get(f"/api/v1/profiles/{pid}/stage").json()
    assert body["stage"] == "sql"
    assert [(h["from"], h["to"], h["source"]) for h in body["history"]] == [
        (None, "lead", "rule:Form Submitted"),
        ("lead", "mql", "rule:Demo Requested"),
        ("mql", "sql", "journey:sales-handoff"),
    ]
    assert [m.subject for m in env.mail_to("lea@example.com")] == ["Let's talk, Lea"]
    with env.c.db.read() as conn:
        assert profiles.tags_of(conn, env.ws.id, pid) == ["sales-ready"]
    events = http.get(f"/api/v1/profiles/{pid}/events").json()["data"]
    crossed = [e for e in events if e["event"] == "Score Threshold Crossed"]
    assert [c["payload"]["properties"]["direction"] for c in crossed] == ["up"]
    assert crossed[0]["payload"]["properties"]["score"] == pytest.approx(65)
    assert any(e["event"] == "Lifecycle Stage Changed" for e in events)
    funnel = {s["stage"]: s for s in http.get("/api/v1/lifecycle/funnel").json()["stages"]}
    assert (funnel["sql"]["now"], funnel["lead"]["ever_reached"], funnel["customer"]["ever_reached"]) == (
        1,
        1,
        0,
    )
    # A week later the score has halved, lazily.
    env.advance(days=7)
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["interest"] == pytest.approx(32.5)


def test_scores_add_up_on_merge_and_go_with_erasure(env: JourneyEnv, http: TestClient) -> None:
    http.put("/api/v1/scoring/models/interest", json=MODEL)
    env.calls(
        {"type": "track", "anonymousId": "anon", "event": "Demo Requested"},
        {"type": "track", "userId": "kim", "event": "Product Viewed"},
    )
    env.calls({"type": "identify", "userId": "kim", "anonymousId": "anon"})
    pid = env.profile("kim").id
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["interest"] == pytest.approx(30)
    assert http.post(f"/api/v1/profiles/{pid}/stage", json={"stage": "customer"}).json()["changed"] is True
    assert http.delete(f"/api/v1/profiles/{pid}").status_code == 200
    with env.c.db.read() as conn:
        assert scoring.stage_of(conn, env.ws.id, pid) is None
        assert scoring.stage_history_of(conn, env.ws.id, pid) == []


def test_bad_definitions_are_clear_errors(env: JourneyEnv, http: TestClient) -> None:
    r = http.put("/api/v1/scoring/models/interest", json={**MODEL, "rules": [{"id": "x", "points": 1}]})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_definition")
    r = http.put("/api/v1/scoring/models/other", json=MODEL)
    assert r.status_code == 400
    r = http.put("/api/v1/lifecycle", content=b"{nope")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_json")
    http.put("/api/v1/lifecycle", json=LIFECYCLE)
    env.identify("x")
    r = http.post(f"/api/v1/profiles/{env.profile('x').id}/stage", json={"stage": "vip"})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "unknown_stage")
    assert http.delete("/api/v1/scoring/models/nope").status_code == 404


def test_emitted_events_are_not_duplicated_when_a_batch_is_replayed(env: JourneyEnv) -> None:
    """The threshold event's message id derives from its cause: processing the cause again
    (a retried batch) cannot append it twice."""
    from whenthen.pipeline.service import emit

    env.identify("z")
    pid = env.profile("z").id
    with env.c.db.write() as conn:
        for _ in range(2):
            emit(
                conn,
                env.ws.id,
                pid,
                "Score Threshold Crossed",
                {"model": "m", "threshold": 1},
                now=env.clock.now(),
                cause="c1",
                partitions=64,
            )
    env.c.worker.drain()
    with env.c.db.read() as conn:
        _, events = profiles.events_of(conn, env.ws.id, pid, after=None, limit=10)
    assert [e.event for e in events].count("Score Threshold Crossed") == 1
    assert env.clock.now() - events[-1].timestamp < timedelta(seconds=1)


COOLING = {
    "key": "cooling-lead",
    "name": "A lead cooled down",
    "trigger": {
        "kind": "event",
        "event": "Score Threshold Crossed",
        "where": [{"path": "model", "value": "interest"}, {"path": "direction", "value": "down"}],
    },
    "start": "mark",
    "nodes": {"mark": {"kind": "update_profile", "add_tags": ["cooling"]}},
}


def crossings(http: TestClient, pid: str) -> list[dict[str, object]]:
    events = http.get(f"/api/v1/profiles/{pid}/events").json()["data"]
    return [
        {**e["payload"]["properties"], "at": e["timestamp"]}
        for e in sorted(events, key=lambda e: e["timestamp"])
        if e["event"] == "Score Threshold Crossed"
    ]


def test_decay_alone_carries_a_score_below_a_threshold_on_time(env: JourneyEnv, http: TestClient) -> None:
    """75 points with a 7-day half-life fall below 50 after 7d * log2(75/50) = 4.09 days,
    with no event: a timer announces it then, and a journey can act on it."""
    assert http.put("/api/v1/scoring/models/interest", json=MODEL).status_code == 200
    env.publish(COOLING)
    env.identify("lea", email="lea@example.com", title="Sales Director")  # 15
    env.track("lea", "Demo Requested", n=1)  # 35
    env.track("lea", "Demo Requested", n=2)  # 55: up
    env.track("lea", "Demo Requested", n=3)  # 75
    pid = env.profile("lea").id
    assert [c["direction"] for c in crossings(http, pid)] == ["up"]
    # 75 -> 50 takes 7d * log2(1.5) = 4.094 days.
    env.advance(days=4)
    assert [c["direction"] for c in crossings(http, pid)] == ["up"]
    with env.c.db.read() as conn:
        assert profiles.tags_of(conn, env.ws.id, pid) == []
    env.advance(hours=3)
    got = crossings(http, pid)
    assert [c["direction"] for c in got] == ["up", "down"]
    assert got[1]["threshold"] == 50
    assert 49.5 < float(str(got[1]["score"])) < 50
    with env.c.db.read() as conn:
        assert profiles.tags_of(conn, env.ws.id, pid) == ["cooling"]
    # No other threshold lies between the score and 0: nothing more, however long.
    env.advance(days=60)
    assert len(crossings(http, pid)) == 2


def test_several_thresholds_passed_by_decay_are_announced_in_order(env: JourneyEnv, http: TestClient) -> None:
    model = {**MODEL, "thresholds": [10, 30, 50]}
    assert http.put("/api/v1/scoring/models/interest", json=model).status_code == 200
    env.identify("max", email="max@example.com")
    for n in range(3):
        env.track("max", "Demo Requested", n=n)  # 60: up across 10, 30, 50
    pid = env.profile("max").id
    assert [(c["direction"], c["threshold"]) for c in crossings(http, pid)] == [
        ("up", 10),
        ("up", 30),
        ("up", 50),
    ]
    # The worker was away for a month: every threshold passed meanwhile is announced, in
    # the order decay passed them.
    env.clock.advance(timedelta(days=30))
    env.c.worker.drain()
    assert [(c["direction"], c["threshold"]) for c in crossings(http, pid)][3:] == [
        ("down", 50),
        ("down", 30),
        ("down", 10),
    ]


def _score_event(env: JourneyEnv, pid: str, event: str) -> scoring.Scored:
    """The scoring step alone for one event of the person (no traits, no lifecycle), in
    its own transaction, as the pipeline calls it."""
    with env.c.db.write() as conn:
        return scoring.on_event(
            conn,
            env.ws.id,
            pid,
            event=event,
            properties={},
            traits_after={},
            now=env.clock.now(),
            workspace_models=scoring.models(conn, env.ws.id),
            lifecycle=None,
        )


def test_an_event_arriving_before_the_decay_timer_fired_announces_the_crossing_first(
    env: JourneyEnv, http: TestClient
) -> None:
    assert http.put("/api/v1/scoring/models/interest", json=MODEL).status_code == 200
    env.identify("noa", email="noa@example.com")
    for n in range(3):
        env.track("noa", "Demo Requested", n=n)  # 60
    pid = env.profile("noa").id
    env.clock.advance(timedelta(days=7))  # 30 now; the timer is due but no worker ran
    scored = _score_event(env, pid, "Demo Requested")
    # Down across 50 by decay, then up again across 50 by the event (30 + 20 = 50).
    assert [(k, c.direction, c.threshold) for k, c in scored.crossings] == [
        ("interest", "down", 50),
        ("interest", "up", 50),
    ]
    # The timer was re-armed from the new score: the worker announces nothing twice.
    env.c.worker.drain()
    assert [c["direction"] for c in crossings(http, pid)] == ["up"]


def test_an_event_that_changes_nothing_still_announces_a_crossing_decay_made_first(
    env: JourneyEnv, http: TestClient
) -> None:
    """The model has a trait rule, so every event touches it; an event that changes
    neither its points nor what it awards is skipped without reading the score, except
    when the score's decay timer is due: then the crossing is announced from the event."""
    assert http.put("/api/v1/scoring/models/interest", json=MODEL).status_code == 200
    env.identify("noa", email="noa@example.com")
    for n in range(3):
        env.track("noa", "Demo Requested", n=n)  # 60
    pid = env.profile("noa").id
    env.clock.advance(timedelta(days=1))  # ~54: nothing due
    assert _score_event(env, pid, "Page Viewed") == scoring.Scored((), None, frozenset())
    env.clock.advance(timedelta(days=6))  # 30 now; the timer is due but no worker ran
    scored = _score_event(env, pid, "Page Viewed")
    assert [(k, c.direction, c.threshold) for k, c in scored.crossings] == [("interest", "down", 50)]
    assert scored.stored == frozenset()  # the points stand; only the timer moved
    # Re-armed: the worker does not announce the down crossing again (the caller, the
    # pipeline, announces what on_event returns); the log holds the first "up" only.
    env.c.worker.drain()
    assert [c["direction"] for c in crossings(http, pid)] == ["up"]


def test_a_fixed_amount_decay_moves_scores_segments_and_thresholds_each_period(
    env: JourneyEnv, http: TestClient
) -> None:
    """5 points off every Monday (00:00 UTC): the score, a segment on it and a threshold
    all follow on the boundary, with no event."""
    model = {
        "key": "engagement",
        "name": "Engagement",
        "rules": [{"id": "visit", "event": "Visited", "points": 4}],
        "decay": {"amount": 5, "every": "1w"},
        "thresholds": [10],
    }
    assert http.put("/api/v1/scoring/models/engagement", json=model).status_code == 200
    active = {
        "name": "Engaged",
        "definition": {"condition": {"kind": "score", "model": "engagement", "op": "gte", "value": 10}},
    }
    assert http.put("/api/v1/segments/engaged", json=active).status_code == 200
    monday = env.clock.now().replace(hour=0, minute=0, second=0, microsecond=0)
    monday -= timedelta(days=monday.weekday())
    env.clock.advance(monday + timedelta(days=7, hours=10) - env.clock.now())  # next Monday, 10:00
    env.identify("ann", email="ann@example.com")
    for n in range(3):
        env.track("ann", "Visited", n=n)  # 12: up across 10
    pid = env.profile("ann").id
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["engagement"] == 12
    assert [m["profile_id"] for m in http.get("/api/v1/segments/engaged/members").json()["data"]] == [pid]
    env.advance(days=6, hours=13)  # Sunday 23:00: nothing yet
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["engagement"] == 12
    assert [c["direction"] for c in crossings(http, pid)] == ["up"]
    env.advance(hours=1)  # Monday 00:00: 7
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["engagement"] == 7
    assert [c["direction"] for c in crossings(http, pid)] == ["up", "down"]
    assert http.get("/api/v1/segments/engaged/members").json()["data"] == []
    env.advance(days=7)  # 2
    env.advance(days=7)  # 0, and it stays there
    env.advance(days=7)
    assert http.get(f"/api/v1/profiles/{pid}/scores").json()["scores"]["engagement"] == 0
    assert len(crossings(http, pid)) == 2


def test_the_decay_step_leaves_a_person_another_transaction_holds_for_a_later_step(
    pg_env: JourneyEnv,
) -> None:
    """PostgreSQL, several workers: a pipeline batch holds the profiles it applies events
    to, and reads their score rows ahead (ADR 0014). The decay step neither waits for such
    a person nor announces from what it cannot see: their timer stays due, and a later
    step announces the crossing once (ADR 0011's rule, for score timers)."""
    from sqlalchemy import select, text

    from whenthen.profiles.tables import profiles as profile_rows
    from whenthen.scoring.tables import profile_scores

    env = pg_env
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as http:
        assert http.put("/api/v1/scoring/models/interest", json=MODEL).status_code == 200
        env.identify("lea", email="lea@example.com", title="Sales Director")  # 15
        for n in range(3):
            env.track("lea", "Demo Requested", n=n)  # 35, 55 (up), 75
        pid = env.profile("lea").id
        env.clock.advance(timedelta(days=4, hours=3))  # 75 -> below 50: the timer is due

        def due_at() -> object:
            with env.c.db.read() as conn:
                return conn.execute(select(profile_scores.c.decay_due_at)).scalar_one()

        before = due_at()
        holder = env.c.db.engine.connect()
        try:
            holder.begin()
            holder.execute(select(profile_rows.c.id).where(profile_rows.c.id == pid).with_for_update())
            with env.c.db.write() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # waiting would fail, not hang
                assert scoring.fire_decay_timers(conn, env.clock.now(), lambda *a, **k: None) == 0
            assert due_at() == before
            holder.rollback()
        finally:
            holder.close()
        env.c.worker.drain()
        assert [c["direction"] for c in crossings(http, pid)] == ["up", "down"]
        assert due_at() != before
