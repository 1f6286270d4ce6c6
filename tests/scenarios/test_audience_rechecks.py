"""Segments follow changes made outside the event pipeline: the lists and tags API, a CSV
import, the stage API, and journey actions. Writers mark the person; the worker's recheck
step re-evaluates them. On SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from whenthen.api.app import create_app
from whenthen.profiles.tables import profile_rechecks, profiles


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


def save(http: TestClient, key: str, condition: dict[str, Any]) -> None:
    r = http.put(f"/api/v1/segments/{key}", json={"name": key, "definition": {"condition": condition}})
    assert r.status_code == 200, r.text


def members(http: TestClient, key: str) -> list[str]:
    return [m["profile_id"] for m in http.get(f"/api/v1/segments/{key}/members").json()["data"]]


def queued(env: JourneyEnv) -> int:
    with env.c.db.read() as conn:
        return len(conn.execute(select(profile_rechecks)).all())


def test_list_members_added_and_removed_over_the_api_enter_and_leave(
    env: JourneyEnv, http: TestClient
) -> None:
    save(http, "vips", {"kind": "list", "list": "vip"})
    env.identify("ann", email="ann@example.com")
    env.identify("bob", email="bob@example.com")
    ann, bob = env.profile("ann").id, env.profile("bob").id
    r = http.post("/api/v1/lists/vip/members", json={"user_ids": ["ann", "bob"]})
    assert r.json()["added"] == 2
    assert queued(env) == 2  # marked in the API's transaction
    env.advance(seconds=1)
    assert sorted(members(http, "vips")) == sorted([ann, bob])
    assert queued(env) == 0
    assert sorted(e["user"] for e in env.system_events("Segment Entered")) == ["ann", "bob"]

    assert http.delete(f"/api/v1/lists/vip/members/{bob}").json() == {"removed": True}
    env.advance(seconds=1)
    assert members(http, "vips") == [ann]
    assert env.system_events("Segment Exited") == [{"user": "bob", "segment": "vips"}]


def test_tags_added_and_removed_over_the_api_move_people(env: JourneyEnv, http: TestClient) -> None:
    save(http, "wechat-fans", {"kind": "tag", "tag": "prefers-wechat"})
    env.identify("ann", email="ann@example.com")
    ann = env.profile("ann").id
    assert http.post(f"/api/v1/profiles/{ann}/tags", json={"tags": ["prefers-wechat"]}).status_code == 200
    env.advance(seconds=1)
    assert members(http, "wechat-fans") == [ann]
    assert http.delete(f"/api/v1/profiles/{ann}/tags/prefers-wechat").status_code == 200
    env.advance(seconds=1)
    assert members(http, "wechat-fans") == []
    assert [e["segment"] for e in env.system_events("Segment Exited")] == ["wechat-fans"]


def test_a_csv_import_fills_a_list_segment(env: JourneyEnv, http: TestClient) -> None:
    save(http, "attendees", {"kind": "list", "list": "attendees"})
    for user in ("ann", "bob", "cy"):
        env.identify(user, email=f"{user}@example.com")
    body = b"user_id\nann\nbob\nnobody\n"
    r = http.post("/api/v1/lists/attendees/imports", content=body, headers={"Content-Type": "text/csv"})
    assert r.status_code == 202
    env.advance(seconds=1)
    status = http.get(r.json()["status_url"]).json()
    assert status["added"] == 2
    assert sorted(members(http, "attendees")) == sorted([env.profile("ann").id, env.profile("bob").id])


def test_a_stage_set_over_the_api_moves_segments_and_is_announced(env: JourneyEnv, http: TestClient) -> None:
    save(http, "customers", {"kind": "stage", "in": ["customer"]})
    env.identify("ann", email="ann@example.com")
    ann = env.profile("ann").id
    assert http.post(f"/api/v1/profiles/{ann}/stage", json={"stage": "customer"}).json()["changed"] is True
    env.advance(seconds=1)
    assert members(http, "customers") == [ann]
    assert env.system_events("Lifecycle Stage Changed") == [{"user": "ann", "from": None, "to": "customer"}]
    # Setting the same stage again changes nothing and announces nothing.
    assert http.post(f"/api/v1/profiles/{ann}/stage", json={"stage": "customer"}).json()["changed"] is False
    env.advance(seconds=1)
    assert len(env.system_events("Lifecycle Stage Changed")) == 1
    assert len(env.system_events("Segment Entered")) == 1


def test_journey_actions_on_tags_traits_and_lists_move_segments(env: JourneyEnv, http: TestClient) -> None:
    save(http, "rsvp-list", {"kind": "list", "list": "attendees"})
    save(http, "rsvp-tag", {"kind": "tag", "tag": "rsvp"})
    save(http, "rsvp-trait", {"kind": "trait", "path": "rsvp", "value": True})
    env.publish(
        """
        key: rsvp
        name: Who clicks RSVP joins the attendee list
        trigger: {kind: event, event: RSVP Clicked}
        start: tag
        nodes:
          tag: {kind: update_profile, set: {rsvp: true}, add_tags: [rsvp], next: join}
          join: {kind: add_to_list, list: attendees}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "RSVP Clicked")
    env.advance(seconds=1)
    ann = env.profile("ann").id
    for key in ("rsvp-list", "rsvp-tag", "rsvp-trait"):
        assert members(http, key) == [ann], key
    assert sorted(e["segment"] for e in env.system_events("Segment Entered")) == [
        "rsvp-list",
        "rsvp-tag",
        "rsvp-trait",
    ]


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_person_another_transaction_holds_keeps_the_mark_for_a_later_step(
    env: JourneyEnv, http: TestClient
) -> None:
    """PostgreSQL, several workers: a pipeline worker applying a person's events holds
    their profile row; the recheck step neither waits for it nor settles the person on
    what it cannot see yet. The mark stays, and a later step settles them."""
    save(http, "vips", {"kind": "list", "list": "vip"})
    env.identify("ann", email="ann@example.com")
    env.identify("bob", email="bob@example.com")
    ann, bob = env.profile("ann").id, env.profile("bob").id
    http.post("/api/v1/lists/vip/members", json={"user_ids": ["ann", "bob"]})
    holder = env.c.db.engine.connect()
    try:
        holder.begin()
        holder.execute(select(profiles.c.id).where(profiles.c.id == ann).with_for_update())
        # The worker's steps, until they find nothing more to do; waiting for the holder
        # would hang them, so they run beside the test with a deadline.
        steps = threading.Thread(target=env.advance, kwargs={"seconds": 1})
        steps.start()
        steps.join(30)
        if steps.is_alive():
            holder.rollback()
            steps.join()
            pytest.fail("the worker's steps waited for the profile another transaction held")
        assert members(http, "vips") == [bob]
        assert queued(env) == 1
        holder.rollback()
    finally:
        holder.close()
    env.advance(seconds=1)
    assert sorted(members(http, "vips")) == sorted([ann, bob])
    assert queued(env) == 0


def test_marks_of_erased_or_merged_people_are_dropped(env: JourneyEnv, http: TestClient) -> None:
    save(http, "vips", {"kind": "list", "list": "vip"})
    env.identify("ann", email="ann@example.com")
    ann = env.profile("ann").id
    http.post("/api/v1/lists/vip/members", json={"user_ids": ["ann"]})
    assert queued(env) == 1
    assert http.delete(f"/api/v1/profiles/{ann}").status_code in (200, 202, 204)
    assert queued(env) == 0
    env.advance(seconds=1)
    assert members(http, "vips") == []
    assert env.system_events("Segment Entered") == []


def test_a_stage_set_by_a_journey_is_announced_and_starts_journeys(env: JourneyEnv) -> None:
    env.publish(
        """
        key: first-order
        name: A first order makes a customer
        trigger: {kind: event, event: Order Completed}
        entry: {frequency: every_time}
        start: promote
        nodes:
          promote:
            kind: update_profile
            stage: customer
        """
    )
    env.publish(
        """
        key: customer-welcome
        name: Welcome, customer
        trigger:
          kind: event
          event: Lifecycle Stage Changed
          where: [{path: properties.to, op: eq, value: customer}]
        start: hello
        nodes:
          hello:
            kind: send_email
            email: {subject: "Welcome (was {{ event.properties.from | default: 'new' }})", text: "."}
        """
    )
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Order Completed")
    env.advance(seconds=1)
    assert env.system_events("Lifecycle Stage Changed") == [{"user": "ann", "from": None, "to": "customer"}]
    assert [m.subject for m in env.mail_to("ann@example.com")] == ["Welcome (was new)"]
    # Already a customer: a second move to the same stage is no change and not announced.
    env.track("ann", "Order Completed", second=True)
    env.advance(seconds=1)
    assert len(env.system_events("Lifecycle Stage Changed")) == 1
