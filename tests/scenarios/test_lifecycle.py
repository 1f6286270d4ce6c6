"""A journey's life and the people in it: entry rules, exit rules, new versions, pause,
resume and archive, timers that survive a restart, dead letters and the loop guard;
on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.journey_env import JourneyEnv
from whenthen import journeys, messaging
from whenthen.api.app import create_app
from whenthen.bootstrap import build
from whenthen.journeys import repository as journey_repo
from whenthen.journeys.engine import MAX_STEPS


def subjects(env: JourneyEnv, address: str) -> list[str]:
    return [m.subject for m in env.mail_to(address)]


def statuses(env: JourneyEnv, user: str) -> list[str]:
    return [e["status"] for e in env.enrollments(user)]


def day_by_day(env: JourneyEnv, days: int) -> None:
    for _ in range(days):
        env.advance(days=1)


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    """The admin API, with the workspace's admin key; the worker is drained by the test."""
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


def tips(frequency: str, **entry: Any) -> dict[str, Any]:
    """Sign-up tips: an email now and one a day later."""
    return {
        "key": "tips",
        "name": "Sign-up tips",
        "trigger": {"kind": "event", "event": "Signed Up"},
        "entry": {"frequency": frequency, **entry},
        "start": "first",
        "nodes": {
            "first": {"kind": "send_email", "email": {"subject": "Tip 1", "text": "."}, "next": "a_day"},
            "a_day": {"kind": "delay", "duration": "1d", "next": "second"},
            "second": {"kind": "send_email", "email": {"subject": "Tip 2", "text": "."}},
        },
    }


# ---- entry --------------------------------------------------------------------------------


def test_entry_once_admits_a_person_a_single_time(env: JourneyEnv) -> None:
    env.publish(tips("once"))
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up", attempt=1)
    env.advance(days=2)
    env.track("ann", "Signed Up", attempt=2)  # after finishing: still not again
    assert statuses(env, "ann") == ["completed"]
    assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 2"]


def test_entry_once_per_key_admits_a_person_once_per_booking(env: JourneyEnv) -> None:
    env.publish(
        {
            **tips("once_per_key", key="properties.booking_id"),
            "trigger": {"kind": "event", "event": "Booking Made"},
        }
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Booking Made", booking_id="b-1", nights=2)
    env.track("ann", "Booking Made", booking_id="b-1", nights=3)  # the same booking, changed
    env.track("ann", "Booking Made", booking_id="b-2")
    env.track("ann", "Booking Made", nights=1)  # no booking id: no key, no entry
    assert statuses(env, "ann") == ["active", "active"]
    assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 1"]


def test_entry_cooldown_admits_again_only_after_it(env: JourneyEnv) -> None:
    env.publish(tips("cooldown", cooldown="7d"))
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up", attempt=1)
    env.advance(hours=12)
    env.track("ann", "Signed Up", attempt=2)  # still in the journey
    env.advance(days=3)
    env.track("ann", "Signed Up", attempt=3)  # finished, but within the cooldown
    assert statuses(env, "ann") == ["completed"]
    env.advance(days=3, hours=12)  # seven days after the first entry
    env.track("ann", "Signed Up", attempt=4)
    assert statuses(env, "ann") == ["completed", "active"]
    assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 2", "Tip 1"]


def test_entry_every_time_runs_enrollments_side_by_side(env: JourneyEnv) -> None:
    env.publish(tips("every_time"))
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up", attempt=1)
    env.advance(hours=1)
    env.track("ann", "Signed Up", attempt=2)
    assert statuses(env, "ann") == ["active", "active"]
    env.advance(days=1)
    assert statuses(env, "ann") == ["completed", "completed"]
    assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 1", "Tip 2", "Tip 2"]


def test_entry_condition_admits_only_those_it_holds_for(env: JourneyEnv) -> None:
    env.publish(
        tips(
            "once",
            condition={
                "all": [
                    {"trait": "country", "op": "eq", "value": "CN"},
                    {"did_not": "Order Completed"},
                ]
            },
        )
    )
    env.identify("li", email="li@example.com", country="CN")
    env.identify("wu", email="wu@example.com", country="CN")
    env.identify("tom", email="tom@example.com", country="GB")
    env.track("wu", "Order Completed")
    for user in ("li", "wu", "tom"):
        env.track(user, "Signed Up")
    assert statuses(env, "li") == ["active"]
    assert env.enrollments("wu") == []
    assert env.enrollments("tom") == []


# ---- exit rules ----------------------------------------------------------------------------


def test_exit_rules_take_people_out_on_an_event_or_an_unsubscribe(env: JourneyEnv) -> None:
    env.publish(
        {
            **tips("once"),
            "exit": [
                {
                    "kind": "event",
                    "event": "Account Closed",
                    "where": [{"path": "reason", "op": "ne", "value": "test"}],
                },
                {"kind": "unsubscribed"},
            ],
        }
    )
    for user in ("stays", "closes", "tester", "leaves"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Signed Up")
    env.advance(hours=2)
    env.track("closes", "Account Closed", reason="too expensive")
    env.track("tester", "Account Closed", reason="test")  # filtered out: stays in
    env.track("leaves", "Unsubscribed")
    env.advance(days=1)
    ended = {u: env.enrollments(u)[0] for u in ("stays", "closes", "tester", "leaves")}
    assert {u: (e["status"], e["reason"]) for u, e in ended.items()} == {
        "stays": ("completed", None),
        "closes": ("exited", "exit rule: Account Closed"),
        "tester": ("completed", None),
        "leaves": ("exited", "unsubscribed"),
    }
    assert subjects(env, "closes@example.com") == ["Tip 1"]
    assert subjects(env, "leaves@example.com") == ["Tip 1"]
    assert subjects(env, "stays@example.com") == ["Tip 1", "Tip 2"]


# ---- versions ------------------------------------------------------------------------------


def reminder(version: str, *, reworked: bool = False) -> dict[str, Any]:
    """A reminder a day after sign-up. Pro customers wait at ``pro_wait``; team customers
    at ``team_wait``, others at ``basic_wait``. The ``reworked`` version renames
    ``basic_wait`` to ``basic_hold`` and makes ``team_wait`` an email, not a wait."""
    basic = "basic_hold" if reworked else "basic_wait"
    mail = {"kind": "send_email", "email": {"subject": f"Team tips ({version})", "text": "."}}
    return {
        "key": "reminder",
        "name": f"Reminder {version}",
        "trigger": {"kind": "event", "event": "Signed Up"},
        "start": "route",
        "nodes": {
            "route": {
                "kind": "condition",
                "branches": [
                    {"when": {"trait": "plan", "op": "eq", "value": "pro"}, "next": "pro_wait"},
                    {"when": {"trait": "plan", "op": "eq", "value": "team"}, "next": "team_wait"},
                ],
                "else": basic,
            },
            "pro_wait": {"kind": "delay", "duration": "1d", "next": "pro_mail"},
            "pro_mail": {"kind": "send_email", "email": {"subject": f"Pro tips ({version})", "text": "."}},
            **(
                {"team_wait": mail}
                if reworked
                else {
                    "team_wait": {"kind": "delay", "duration": "1d", "next": "team_mail"},
                    "team_mail": mail,
                }
            ),
            basic: {"kind": "delay", "duration": "1d", "next": "basic_mail"},
            "basic_mail": {
                "kind": "send_email",
                "email": {"subject": f"Basic tips ({version})", "text": "."},
            },
        },
    }


def test_a_new_version_leaves_people_in_flight_on_theirs(env: JourneyEnv) -> None:
    env.publish(reminder("v1"))
    env.identify("ann", email="ann@example.com", plan="pro")
    env.track("ann", "Signed Up")
    env.advance(hours=6)
    info = env.publish(reminder("v2"))
    assert info.active_version == 2
    env.identify("bob", email="bob@example.com", plan="pro")
    env.track("bob", "Signed Up")
    env.advance(days=1)
    assert subjects(env, "ann@example.com") == ["Pro tips (v1)"]
    assert subjects(env, "bob@example.com") == ["Pro tips (v2)"]
    assert [e["version"] for e in env.enrollments("ann")] == [1]
    assert [e["version"] for e in env.enrollments("bob")] == [2]


def test_publishing_with_migrate_moves_people_whose_node_still_exists(
    env: JourneyEnv, http: TestClient
) -> None:
    env.publish(reminder("v1"))
    env.identify("ann", email="ann@example.com", plan="pro")
    env.identify("bob", email="bob@example.com", plan="basic")
    env.identify("cy", email="cy@example.com", plan="team")
    for user in ("ann", "bob", "cy"):
        env.track(user, "Signed Up")
    env.advance(hours=6)
    assert http.post("/api/v1/journeys", json=reminder("v2", reworked=True)).status_code == 201
    r = http.post("/api/v1/journeys/reminder/publish", params={"migrate": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["active_version"] == 2
    env.advance(days=1)
    # Ann waits at pro_wait, which v2 has: she moves on and gets v2's email.
    assert subjects(env, "ann@example.com") == ["Pro tips (v2)"]
    assert [e["version"] for e in env.enrollments("ann")] == [2]
    # Bob waits at basic_wait, which v2 has not: he finishes on v1.
    assert subjects(env, "bob@example.com") == ["Basic tips (v1)"]
    assert [e["version"] for e in env.enrollments("bob")] == [1]
    # Cy waits at team_wait, which v2 has but as an email: a timer there could never
    # fire, so he finishes on v1 too.
    assert subjects(env, "cy@example.com") == ["Team tips (v1)"]
    assert [(e["version"], e["status"]) for e in env.enrollments("cy")] == [(1, "completed")]


# ---- pause, resume, archive -------------------------------------------------------------------

SETUP_HELP = {
    "key": "setup-help",
    "name": "Setup help",
    "trigger": {"kind": "event", "event": "Signed Up"},
    "start": "wait_for_setup",
    "nodes": {
        "wait_for_setup": {
            "kind": "wait_for_event",
            "event": "Setup Done",
            "timeout": "1d",
            "on_event": "all_set",
            "on_timeout": "need_help",
        },
        "all_set": {"kind": "send_email", "email": {"subject": "You're all set", "text": "."}},
        "need_help": {"kind": "send_email", "email": {"subject": "Need help setting up?", "text": "."}},
    },
}


def test_pause_freezes_everyone_and_resume_fires_overdue_timers_once(
    env: JourneyEnv, http: TestClient
) -> None:
    env.publish(SETUP_HELP)
    for user in ("ann", "cy"):
        env.identify(user, email=f"{user}@example.com")
        env.track(user, "Signed Up")
    env.advance(hours=12)
    assert http.post("/api/v1/journeys/setup-help/pause").json()["status"] == "paused"
    env.advance(hours=6)
    env.track("cy", "Setup Done")  # while paused: moves nobody (and is not replayed later)
    env.identify("bob", email="bob@example.com")
    env.track("bob", "Signed Up")  # while paused: nobody enters
    day_by_day(env, 3)  # timers fall due while paused
    assert env.sink.messages() == []
    assert [e["node"] for e in env.enrollments("ann")] == ["wait_for_setup"]
    assert env.enrollments("bob") == []
    assert http.post("/api/v1/journeys/setup-help/resume").json()["status"] == "active"
    env.advance(minutes=1)
    assert subjects(env, "ann@example.com") == ["Need help setting up?"]
    assert subjects(env, "cy@example.com") == ["Need help setting up?"]
    day_by_day(env, 2)
    assert len(env.sink.messages()) == 2
    [ann] = env.enrollments("ann")
    assert ann["status"] == "completed"
    assert [j["kind"] for j in ann["journal"]].count("timed_out") == 1


def test_a_date_that_falls_during_a_pause_is_held_until_resume(env: JourneyEnv, http: TestClient) -> None:
    env.publish(
        {
            "key": "birthday",
            "name": "Happy birthday",
            "trigger": {"kind": "date", "trait": "birthday", "annual": True, "at": "09:00"},
            "entry": {"frequency": "every_time"},
            "start": "greet",
            "nodes": {"greet": {"kind": "send_email", "email": {"subject": "Happy birthday!", "text": "."}}},
        }
    )
    env.identify("ann", email="ann@example.com", birthday="1990-11-27")  # Friday, 09:00 UTC
    assert http.post("/api/v1/journeys/birthday/pause").status_code == 200
    day_by_day(env, 3)
    assert env.sink.messages() == []
    assert http.post("/api/v1/journeys/birthday/resume").status_code == 200
    env.advance(minutes=1)  # like a held timer: once, on resume
    assert subjects(env, "ann@example.com") == ["Happy birthday!"]
    next_year = datetime(2027, 11, 27, 9, 0, tzinfo=UTC)  # and the birthday is still there next year
    env.advance(seconds=(next_year - env.clock.now()).total_seconds() - 60)
    assert len(env.mail_to("ann@example.com")) == 1
    env.advance(minutes=1)
    assert subjects(env, "ann@example.com") == ["Happy birthday!"] * 2
    assert [e["entered_at"] for e in env.enrollments("ann")][1] == next_year


def test_archive_ends_everyone_in_the_journey(env: JourneyEnv, http: TestClient) -> None:
    env.publish(SETUP_HELP)
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up")
    r = http.post("/api/v1/journeys/setup-help/archive")
    assert (r.status_code, r.json()["status"], r.json()["active_enrollments"]) == (200, "archived", 0)
    [ann] = env.enrollments("ann")
    assert (ann["status"], ann["reason"]) == ("exited", "journey archived")
    env.advance(days=2)
    env.identify("bob", email="bob@example.com")
    env.track("bob", "Signed Up")
    assert env.enrollments("bob") == []
    assert env.sink.messages() == []
    again = http.post("/api/v1/journeys", json=SETUP_HELP)
    assert (again.status_code, again.json()["code"]) == (409, "journey_archived")


# ---- timers -----------------------------------------------------------------------------------


def test_timers_survive_a_restart_and_fire_exactly_once(env: JourneyEnv) -> None:
    env.publish(tips("once"))
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up")
    assert subjects(env, "ann@example.com") == ["Tip 1"]
    # The process stops; the timer falls due while nothing runs; a day and a half later
    # a new process starts with the same settings on the same database.
    env.clock.advance(timedelta(days=1, hours=12))
    restarted = build(env.c.settings, clock=env.clock)
    try:
        restarted.worker.drain()
        assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 2"]
        # Both processes working on afterwards sends nothing twice.
        restarted.worker.drain()
        env.c.worker.drain()
        env.advance(days=1)
        restarted.worker.drain()
    finally:
        restarted.close()
    assert subjects(env, "ann@example.com") == ["Tip 1", "Tip 2"]
    with env.c.db.read() as conn:
        log = messaging.log_for_profile(conn, env.ws.id, [env.profile("ann").id], 10)
    assert sorted((m.node, m.status) for m in log) == [("first", "sent"), ("second", "sent")]
    assert statuses(env, "ann") == ["completed"]


def test_an_enrollment_whose_wake_keeps_failing_is_dead_lettered(env: JourneyEnv, http: TestClient) -> None:
    """The genuine failure used here: the stored version of the journey was edited by hand
    into something that no longer parses, and the process restarted (so the parsed copy
    it cached is gone). Every wake then fails to load the definition."""
    from sqlalchemy import update

    from whenthen.journeys import management
    from whenthen.journeys.tables import journey_versions

    info = env.publish(
        {
            "key": "upsell",
            "name": "Upsell",
            "trigger": {"kind": "event", "event": "Signed Up"},
            "start": "an_hour",
            "nodes": {
                "an_hour": {"kind": "delay", "duration": "1h", "next": "by_plan"},
                "by_plan": {
                    "kind": "condition",
                    "branches": [{"when": {"trait": "plan", "op": "eq", "value": "free"}, "next": "offer"}],
                    "else": None,
                },
                "offer": {"kind": "send_email", "email": {"subject": "Go pro", "text": "."}},
            },
        }
    )
    env.identify("ann", email="ann@example.com", plan="free")
    env.track("ann", "Signed Up")
    [enrollment] = env.enrollments("ann")
    with env.c.db.write() as conn:
        conn.execute(
            update(journey_versions)
            .where(journey_versions.c.journey_id == info.id)
            .values(definition={"key": "upsell", "name": "Upsell", "start": "an_hour", "nodes": {}})
        )
    management._CACHE.clear()  # a restarted process has parsed nothing yet

    def current() -> Any:
        with env.c.db.read() as conn:
            return journey_repo.enrollment(conn, enrollment["id"])

    env.advance(hours=1)
    seen = [(current().status, current().failures)]
    for backoff in (60, 120, 240, 480):  # retried later and later
        env.advance(seconds=backoff - 1)
        assert current().failures == seen[-1][1]  # not before its time
        env.advance(seconds=1)
        seen.append((current().status, current().failures))
    assert seen == [("active", 1), ("active", 2), ("active", 3), ("active", 4), ("failed", 5)]
    dead = current()
    assert dead.reason.startswith("dead letter after 5 failures: InvalidDefinition: ")
    assert "trigger: Field required" in dead.reason
    assert (dead.wake_at, dead.ended_at) == (None, env.clock.now())
    assert (
        http.get(f"/api/v1/profiles/{env.profile('ann').id}/journeys").json()["data"][0]["status"] == "failed"
    )
    with env.c.db.read() as conn:
        [failed] = [j for j in journey_repo.journal_of(conn, enrollment["id"]) if j.kind == "failed"]
    assert (failed.node, failed.detail["reason"]) == ("an_hour", dead.reason)
    env.advance(days=1)
    assert current().failures == 5  # dead letters are not retried
    assert env.sink.messages() == []


def test_a_loop_of_zero_delays_fails_with_the_reason_and_sends_nothing(env: JourneyEnv) -> None:
    env.publish(
        {
            "key": "runaway",
            "name": "A loop that never waits",
            "trigger": {"kind": "event", "event": "Signed Up"},
            "start": "pause",
            "nodes": {
                "pause": {"kind": "delay", "duration": "0s", "next": "hello"},
                "hello": {
                    "kind": "send_email",
                    "email": {"subject": "Hello again", "text": "."},
                    "next": "pause",
                },
            },
        }
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Signed Up")
    [e] = env.enrollments("ann")
    assert (e["status"], e["reason"]) == ("failed", f"more than {MAX_STEPS} steps in one advance (a loop?)")
    assert [j["kind"] for j in e["journal"]] == ["entered", "failed"]
    env.advance(days=1)
    assert env.sink.messages() == []
    with env.c.db.read() as conn:
        assert messaging.log_for_profile(conn, env.ws.id, [env.profile("ann").id], 10) == []
        assert journeys.stats(conn, env.ws.id, "runaway")["totals"] == {"entered": 1, "failed": 1}


def test_erasure_removes_the_person_from_journeys_and_the_message_log(
    env: JourneyEnv, http: TestClient
) -> None:
    from sqlalchemy import select

    from whenthen.journeys.tables import enrollment_journal, enrollments
    from whenthen.messaging.tables import messages

    examples = Path(__file__).resolve().parents[2] / "examples" / "journeys"
    env.publish((examples / "welcome-series.yaml").read_text())
    env.identify("gone", email="gone@example.com")
    env.track("gone", "Signed Up")
    assert len(env.mail_to("gone@example.com")) == 1
    pid = env.profile("gone").id
    assert http.delete(f"/api/v1/profiles/{pid}").status_code == 200
    with env.c.db.read() as conn:
        for table in (enrollments, enrollment_journal, messages):
            assert conn.execute(select(table).where(table.c.profile_id == pid)).all() == []
    env.advance(days=5)
    assert len(env.mail_to("gone@example.com")) == 1  # the series stopped with the erasure
