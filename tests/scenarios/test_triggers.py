"""Every way into a journey, end to end: an event (with filters), a trait change, a date
(relative, annual, backfilled for people who existed before the journey), an outside
signal over HTTP and an enrollment over HTTP; on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from whenthen.api.app import create_app
from whenthen.messaging.tables import outbox


def subjects(env: JourneyEnv, address: str) -> list[str]:
    return [m.subject for m in env.mail_to(address)]


def advance_to(env: JourneyEnv, when: datetime) -> None:
    env.advance(seconds=(when - env.clock.now()).total_seconds())


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    """The admin API, with the workspace's admin key; the worker is drained by the test."""
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


# ---- event ----------------------------------------------------------------------------


def test_event_trigger_enters_only_for_events_matching_its_filters(env: JourneyEnv) -> None:
    env.publish(
        """
        key: big-orders
        name: Thanks for a big order from the shop
        trigger:
          kind: event
          event: Order Completed
          where:
            - {path: total, op: gte, value: 100}
            - {path: properties.currency, op: in, value: [EUR, CHF]}
            - {path: context.page.path, op: starts_with, value: /shop}
            - {path: coupon, op: not_exists}
        entry: {frequency: every_time}
        start: thanks
        nodes:
          thanks:
            kind: send_email
            email: {subject: "Thank you for order {{ event.properties.order_id }}", text: "."}
        """
    )
    env.identify("ann", email="ann@example.com")

    def order(name: str = "Order Completed", path: str = "/shop/checkout", **props: Any) -> dict[str, Any]:
        return {
            "type": "track",
            "userId": "ann",
            "event": name,
            "properties": props,
            "context": {"page": {"path": path}},
        }

    env.calls(
        order(order_id="o1", total=150, currency="EUR"),
        order(order_id="o2", total=99.99, currency="EUR"),  # too small
        order(order_id="o3", total=150, currency="USD"),  # another currency
        order(order_id="o4", total="250", currency="chf"),  # numbers as text, any case
        order(order_id="o5", total=150, currency="EUR", coupon="TEA10"),  # with a coupon
        order(order_id="o6", total=150, currency="EUR", path="/app/upgrade"),  # not the shop
        order("Order Refunded", order_id="o7", total=150, currency="EUR"),  # another event
    )
    assert sorted(subjects(env, "ann@example.com")) == ["Thank you for order o1", "Thank you for order o4"]
    assert len(env.enrollments("ann")) == 2


# ---- trait change ----------------------------------------------------------------------

MOVED = """
key: moved
name: Moved to a new city
trigger: {kind: trait_change, trait: address.city}
entry: {frequency: every_time}
start: hello
nodes:
  hello:
    kind: send_email
    email:
      subject: "Welcome to {{ event.properties.to }}"
      text: "From {{ event.properties.from | default: 'nowhere' }} to {{ traits.address.city }}."
"""


def test_trait_change_enters_when_the_city_changes(env: JourneyEnv) -> None:
    env.publish(MOVED)
    # Decision: a trait set for the first time is a change from "missing" (from is null).
    env.identify("ann", email="ann@example.com", address={"city": "Berlin"})
    assert subjects(env, "ann@example.com") == ["Welcome to Berlin"]
    assert env.mail_to("ann@example.com")[0].body().startswith("From nowhere to Berlin.")
    # The same city (another street), or another trait, is no change of city.
    env.identify("ann", address={"city": "Berlin", "street": "Hauptstr. 1"})
    env.identify("ann", first_name="Ann")
    assert len(env.enrollments("ann")) == 1
    env.identify("ann", address={"city": "Shanghai", "street": "Nanjing Rd 1"})
    assert subjects(env, "ann@example.com") == ["Welcome to Berlin", "Welcome to Shanghai"]
    assert env.mail_to("ann@example.com")[1].body().startswith("From Berlin to Shanghai.")
    # Losing the trait is not a move to anywhere.
    env.identify("ann", address={"street": "unknown"})
    assert len(env.enrollments("ann")) == 2


def test_trait_change_to_a_given_value(env: JourneyEnv) -> None:
    env.publish(
        """
        key: shanghai-welcome
        name: Welcome to Shanghai
        trigger: {kind: trait_change, trait: address.city, to: Shanghai}
        start: hello
        nodes:
          hello:
            kind: send_email
            email: {subject: "Our Shanghai store is on Nanjing Road", text: "."}
        """
    )
    env.identify("bob", email="bob@example.com", address={"city": "Berlin"})
    env.identify("bob", address={"city": "Paris"})
    assert env.enrollments("bob") == []
    env.identify("bob", address={"city": "Shanghai"})
    env.identify("li", email="li@example.com", address={"city": "Shanghai"})  # first set counts too
    assert subjects(env, "bob@example.com") == ["Our Shanghai store is on Nanjing Road"]
    assert subjects(env, "li@example.com") == ["Our Shanghai store is on Nanjing Road"]
    [bob] = env.enrollments("bob")
    assert bob["status"] == "completed"


# ---- date -------------------------------------------------------------------------------


def test_date_trigger_fires_relative_to_a_date_trait_in_local_time(env: JourneyEnv) -> None:
    env.publish(
        """
        key: renewal-notice
        name: Renewal notice
        trigger: {kind: date, trait: renewal_date, offset: -3d, at: "10:00"}
        start: notice
        nodes:
          notice:
            kind: send_email
            email: {subject: "Your plan renews on {{ traits.renewal_date }}", text: "."}
        """
    )
    env.identify("li", email="li@example.com", timezone="Asia/Shanghai", renewal_date="2026-12-10")
    env.identify("tom", email="tom@example.com", renewal_date="2026-12-10")  # no zone: UTC
    env.identify("pat", email="pat@example.com", renewal_date="2026-11-01")  # already past
    advance_to(env, datetime(2026, 12, 7, 1, 59, tzinfo=UTC))
    assert env.sink.messages() == []
    # Tom's date moves before it is due: the schedule follows it.
    env.identify("tom", renewal_date="2026-12-20")
    env.advance(minutes=1)  # 7 December 10:00 in Shanghai
    assert subjects(env, "li@example.com") == ["Your plan renews on 2026-12-10"]
    advance_to(env, datetime(2026, 12, 7, 10, 1, tzinfo=UTC))
    assert env.mail_to("tom@example.com") == []
    advance_to(env, datetime(2026, 12, 17, 9, 59, tzinfo=UTC))
    assert env.mail_to("tom@example.com") == []
    env.advance(minutes=1)
    assert subjects(env, "tom@example.com") == ["Your plan renews on 2026-12-20"]
    assert env.mail_to("pat@example.com") == []
    [li] = env.enrollments("li")
    assert li["journal"][0]["at"] == datetime(2026, 12, 7, 2, 0, tzinfo=UTC)


def test_annual_birthday_in_the_profiles_time_zone(env: JourneyEnv) -> None:
    env.publish(
        """
        key: birthday
        name: Happy birthday
        trigger: {kind: date, trait: birthday, annual: true, at: "09:00"}
        entry: {frequency: every_time}
        start: greet
        nodes:
          greet:
            kind: send_email
            email: {subject: "Happy birthday, {{ traits.first_name }}!", text: "."}
        """
    )
    env.identify(
        "ann", email="ann@example.com", first_name="Ann", timezone="Europe/Paris", birthday="1990-11-27"
    )
    env.identify("leo", email="leo@example.com", first_name="Leo", birthday="2000-02-29")
    advance_to(env, datetime(2026, 11, 27, 7, 59, tzinfo=UTC))
    assert env.sink.messages() == []
    env.advance(minutes=1)  # 09:00 in Paris
    assert subjects(env, "ann@example.com") == ["Happy birthday, Ann!"]
    # 29 February falls on 28 February in other years.
    advance_to(env, datetime(2027, 2, 28, 8, 59, tzinfo=UTC))
    assert env.mail_to("leo@example.com") == []
    env.advance(minutes=1)
    assert subjects(env, "leo@example.com") == ["Happy birthday, Leo!"]
    # And every year again.
    advance_to(env, datetime(2027, 11, 27, 7, 59, tzinfo=UTC))
    assert len(env.mail_to("ann@example.com")) == 1
    env.advance(minutes=1)
    assert subjects(env, "ann@example.com") == ["Happy birthday, Ann!"] * 2
    assert [e["status"] for e in env.enrollments("ann")] == ["completed", "completed"]


def test_a_date_journey_published_later_is_backfilled_for_existing_profiles(
    env: JourneyEnv, http: TestClient
) -> None:
    for user in ("ann", "bob"):
        env.identify(user, email=f"{user}@example.com", timezone="Asia/Shanghai", anniversary="2025-12-01")
    env.identify("cy", email="cy@example.com")  # no date: nothing to schedule
    definition = """
key: customer-anniversary
name: One year with us
trigger: {kind: date, trait: anniversary, annual: true, at: "09:00"}
start: thanks
nodes:
  thanks:
    kind: send_email
    email: {subject: "One more year with us!", text: "."}
"""
    r = http.post("/api/v1/journeys", content=definition, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    r = http.post("/api/v1/journeys/customer-anniversary/publish")
    assert r.status_code == 200, r.text
    assert r.json()["active_version"] == 1
    with env.c.db.read() as conn:
        [job] = conn.execute(select(outbox).where(outbox.c.kind == "backfill_dates")).all()
    assert (job.payload["journey"], job.done_at) == ("customer-anniversary", None)
    env.c.worker.drain()  # the job schedules everyone, a page at a time
    with env.c.db.read() as conn:
        assert conn.execute(select(outbox.c.done_at).where(outbox.c.id == job.id)).scalar_one() is not None
    advance_to(env, datetime(2026, 12, 1, 0, 59, tzinfo=UTC))
    assert env.sink.messages() == []
    env.advance(minutes=1)  # 1 December 09:00 in Shanghai
    assert subjects(env, "ann@example.com") == ["One more year with us!"]
    assert subjects(env, "bob@example.com") == ["One more year with us!"]
    assert env.enrollments("cy") == []


# ---- signal -------------------------------------------------------------------------------


def test_signal_enters_every_matching_profile_in_the_background(env: JourneyEnv, http: TestClient) -> None:
    env.publish(
        """
        key: storm-warning
        name: Storm warning
        trigger:
          kind: signal
          signal: storm_warning
          where: [{trait: address.city, op: eq, value: Shanghai}]
        entry: {frequency: every_time}
        start: warn
        nodes:
          warn:
            kind: send_email
            marketing: false
            email:
              subject: "Storm warning ({{ payload.level }}) for {{ traits.address.city }}"
              text: "{{ event.properties.advice }}"
        """
    )
    in_shanghai = [f"sh{i}" for i in range(12)]
    elsewhere = [f"bj{i}" for i in range(5)]
    env.calls(
        *[
            {
                "type": "identify",
                "userId": u,
                "traits": {"email": f"{u}@example.com", "address": {"city": "Shanghai"}},
            }
            for u in in_shanghai
        ],
        *[
            {
                "type": "identify",
                "userId": u,
                "traits": {"email": f"{u}@example.com", "address": {"city": "Beijing"}},
            }
            for u in elsewhere
        ],
        {"type": "identify", "userId": "nowhere", "traits": {"email": "nowhere@example.com"}},
    )
    r = http.post(
        "/api/v1/signals",
        json={"name": "storm_warning", "properties": {"level": "red", "advice": "Stay in."}},
    )
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] is True
    # Accepted at once: the fan-out is a background job, nobody has been entered yet.
    assert all(env.enrollments(u) == [] for u in in_shanghai)
    env.c.worker.drain()
    for u in in_shanghai:
        [mail] = env.mail_to(f"{u}@example.com")
        assert mail.subject == "Storm warning (red) for Shanghai"
        assert mail.body().startswith("Stay in.")
    assert all(env.enrollments(u) == [] for u in [*elsewhere, "nowhere"])
    assert len(env.sink.messages()) == len(in_shanghai)
    # Another signal enters nobody into this journey.
    assert http.post("/api/v1/signals", json={"name": "heatwave"}).status_code == 202
    env.c.worker.drain()
    assert len(env.sink.messages()) == len(in_shanghai)


# ---- api -------------------------------------------------------------------------------------


def test_api_enrollment_with_a_payload_used_in_the_email(env: JourneyEnv, http: TestClient) -> None:
    env.publish(
        """
        key: ticket
        name: Event ticket
        trigger: {kind: api}
        start: send_ticket
        nodes:
          send_ticket:
            kind: send_email
            marketing: false
            email:
              subject: "Your ticket for {{ payload.event_name }}"
              text: "Seat {{ payload.seat.row }}{{ payload.seat.number }}, doors open at {{ payload.doors }}."
        """
    )
    env.identify("ann", email="ann@example.com")
    payload = {"event_name": "Tea Summit", "seat": {"row": "F", "number": 12}, "doors": "18:30"}
    r = http.post("/api/v1/journeys/ticket/enroll", json={"user_id": "ann", "payload": payload})
    assert r.status_code == 200, r.text
    assert r.json()["enrolled"] is True
    assert r.json()["profile_id"] == env.profile("ann").id
    env.c.worker.drain()
    [mail] = env.mail_to("ann@example.com")
    assert mail.subject == "Your ticket for Tea Summit"
    assert mail.body().startswith("Seat F12, doors open at 18:30.")
    [enrollment] = env.enrollments("ann")
    assert (enrollment["id"], enrollment["status"]) == (r.json()["enrollment_id"], "completed")
    # The entry rules still apply (once, by default), and only known people can be enrolled.
    again = http.post("/api/v1/journeys/ticket/enroll", json={"user_id": "ann", "payload": payload})
    assert again.json() == {"enrolled": False, "enrollment_id": None, "profile_id": env.profile("ann").id}
    assert http.post("/api/v1/journeys/ticket/enroll", json={"user_id": "nobody"}).status_code == 404
    assert http.post("/api/v1/journeys/ticket/pause").status_code == 200
    paused = http.post("/api/v1/journeys/ticket/enroll", json={"profile_id": env.profile("ann").id})
    assert (paused.status_code, paused.json()["code"]) == (409, "journey_not_active")
    env.c.worker.drain()
    assert len(env.mail_to("ann@example.com")) == 1
    with TestClient(create_app(env.c, run_worker=False)) as anonymous:
        assert anonymous.post("/api/v1/journeys/ticket/enroll", json={"user_id": "ann"}).status_code == 401


def test_a_trait_set_by_a_journey_starts_a_trait_change_journey(env: JourneyEnv) -> None:
    """A journey's ``update_profile`` changes traits as an identify would: journeys that
    trigger on that trait start, in the same transaction."""
    env.publish(
        """
        key: upgrade
        name: Mark buyers of the pro plan
        trigger: {kind: event, event: Plan Bought}
        entry: {frequency: every_time}
        start: mark
        nodes:
          mark:
            kind: update_profile
            set: {plan: pro}
        """
    )
    env.publish(
        """
        key: pro-welcome
        name: Welcome to pro
        trigger: {kind: trait_change, trait: plan, to: pro}
        start: hello
        nodes:
          hello:
            kind: send_email
            email:
              subject: "Welcome to {{ event.properties.to }} (was {{ event.properties.from }})"
              text: "."
        """
    )
    env.identify("pat", email="pat@example.com")
    env.track("pat", "Plan Bought")
    assert subjects(env, "pat@example.com") == ["Welcome to pro (was )"]
    assert env.profile("pat").traits["plan"] == "pro"
    # Set again to the same value: no change, no second welcome.
    env.track("pat", "Plan Bought", again=True)
    assert subjects(env, "pat@example.com") == ["Welcome to pro (was )"]
