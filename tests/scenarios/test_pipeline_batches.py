"""What a pipeline batch holds back or leaves out must not change what happens.

A batch takes the events of many partitions in one transaction; it writes the journal
rows and queued messages of all its events together at its end (or before a merge); it
attributes each event to its person as it goes only when something reads the person's
history. These scenarios put the cases where that could go wrong into a single batch.
"""

from __future__ import annotations

from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from whenthen.journeys.tables import enrollment_journal, enrollments
from whenthen.messaging.tables import messages

PING = """
key: ping
name: Ping
trigger: {kind: event, event: Ping}
entry: {frequency: every_time}
start: mail
nodes:
  mail:
    kind: send_email
    email: {subject: "Ping {{ event.properties.n }}", text: "."}
"""


def test_a_message_queued_before_a_merge_in_the_same_batch_follows_the_person(env: JourneyEnv) -> None:
    env.publish(PING)
    env.identify("u1", email="u1@example.com")
    # One batch: the anonymous visitor enters the journey (message and journal rows held
    # for the batch's end), then logs in, which merges their profile into u1's.
    env.calls(
        {"type": "track", "anonymousId": "a1", "event": "Ping", "properties": {"n": 1}},
        {"type": "identify", "userId": "u1", "anonymousId": "a1"},
    )
    survivor = env.profile("u1")
    with env.c.db.read() as conn:
        owners = {
            "messages": {r[0] for r in conn.execute(select(messages.c.profile_id))},
            "enrollments": {r[0] for r in conn.execute(select(enrollments.c.profile_id))},
            "journal": {r[0] for r in conn.execute(select(enrollment_journal.c.profile_id))},
        }
    assert owners == {"messages": {survivor.id}, "enrollments": {survivor.id}, "journal": {survivor.id}}
    assert [m.subject for m in env.mail_to("u1@example.com")] == ["Ping 1"]


def test_many_people_in_one_batch_each_get_their_own_message(env: JourneyEnv) -> None:
    env.publish(PING)
    people = 40  # spread over many partitions, all applied in one transaction
    env.calls(
        *(
            {"type": "identify", "userId": f"p{i}", "traits": {"email": f"p{i}@example.com"}}
            for i in range(people)
        )
    )
    env.calls(
        *(
            {"type": "track", "userId": f"p{i}", "event": "Ping", "properties": {"n": f"{i}-{k}"}}
            for k in range(2)
            for i in range(people)
        )
    )
    for i in range(people):
        assert sorted(m.subject for m in env.mail_to(f"p{i}@example.com")) == [f"Ping {i}-0", f"Ping {i}-1"]
    with env.c.db.read() as conn:
        assert len(conn.execute(select(messages.c.id)).all()) == 2 * people
        # Each enrollment journaled its entry and its send (every_time: two each).
        assert len(conn.execute(select(enrollment_journal.c.id)).all()) >= 4 * people


def test_a_condition_on_past_events_counts_the_events_of_its_own_batch(env: JourneyEnv) -> None:
    """No segment or tag rule in the workspace: the journey's own condition is what makes
    the batch attribute each event before journeys see it."""
    env.publish(
        """
        key: second-visit
        name: Welcome back
        trigger: {kind: event, event: Visited}
        entry: {frequency: every_time}
        start: check
        nodes:
          check:
            kind: condition
            branches:
              - when: {did: Visited, min_count: 2}
                next: again
            else: first
          again:
            kind: send_email
            email: {subject: Welcome back, text: "."}
          first:
            kind: send_email
            email: {subject: Welcome, text: "."}
        """
    )
    env.identify("v", email="v@example.com")
    env.calls(
        {"type": "track", "userId": "v", "event": "Visited", "messageId": "visit-1"},
        {"type": "track", "userId": "v", "event": "Visited", "messageId": "visit-2"},
    )
    assert sorted(m.subject for m in env.mail_to("v@example.com")) == ["Welcome", "Welcome back"]


def test_an_event_that_changes_no_trait_keeps_the_email_and_takes_the_context_time_zone(
    env: JourneyEnv,
) -> None:
    env.identify("t", email="T@Example.com", plan="pro")
    before = env.profile("t")
    env.calls(
        {"type": "track", "userId": "t", "event": "Opened App", "context": {"timezone": "Asia/Tokyo"}},
        {"type": "page", "userId": "t", "name": "Home", "context": {"timezone": "Not/AZone"}},
    )
    after = env.profile("t")
    assert after.email == "t@example.com"
    assert after.traits == before.traits
    assert after.timezone == "Asia/Tokyo"  # an unknown zone later leaves it as it was
    assert after.event_count == 3
    assert after.last_seen is not None
    assert before.last_seen is not None
    assert after.last_seen >= before.last_seen
