"""Identity resolution and merges, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.support.ingest import send
from tests.support.workspace import make_workspace
from whenthen import profiles
from whenthen.bootstrap import Container
from whenthen.kernel.clock import ManualClock
from whenthen.kernel.errors import NotFound
from whenthen.profiles.tables import profile_merges
from whenthen.profiles.tables import profiles as profiles_table
from whenthen.tracking.tables import events


def lookup(c: Container, ws: str, **kw: str) -> profiles.Profile:
    with c.db.read() as conn:
        return profiles.lookup(conn, ws, **kw)


def test_anonymous_events_then_identify_merge_into_one_profile(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {"type": "page", "anonymousId": "anon-1", "name": "Home", "messageId": "m1"},
        {"type": "track", "anonymousId": "anon-1", "event": "Product Added", "messageId": "m2"},
    )
    anon = lookup(container, ws.id, anonymous_id="anon-1")
    assert anon.user_ids == []
    send(container, ws.id, {"type": "identify", "userId": "u-1", "anonymousId": "anon-1", "messageId": "m3"})
    known = lookup(container, ws.id, user_id="u-1")
    # No profile existed for u-1, so the anonymous profile simply became known.
    assert known.id == anon.id
    assert known.anonymous_ids == ["anon-1"]
    assert known.event_count == 3
    with container.db.read() as conn:
        _, evs = profiles.events_of(conn, ws.id, known.id, after=None, limit=10)
    assert [e.message_id for e in evs] == ["m1", "m2", "m3"]


def test_identify_merges_anonymous_profile_into_existing_known_profile(
    container: Container, clock: ManualClock
) -> None:
    ws = make_workspace(container)
    send(
        container, ws.id, {"type": "identify", "userId": "u-1", "traits": {"plan": "pro"}, "messageId": "k1"}
    )
    clock.advance(timedelta(minutes=1))
    send(
        container,
        ws.id,
        {"type": "track", "anonymousId": "phone-7", "event": "Viewed", "messageId": "a1"},
        {"type": "identify", "anonymousId": "phone-7", "traits": {"city": "Lyon"}, "messageId": "a2"},
    )
    anon_id = lookup(container, ws.id, anonymous_id="phone-7").id
    known_id = lookup(container, ws.id, user_id="u-1").id
    assert anon_id != known_id
    clock.advance(timedelta(minutes=1))
    send(
        container,
        ws.id,
        {"type": "track", "userId": "u-1", "anonymousId": "phone-7", "event": "Login", "messageId": "j"},
    )

    merged = lookup(container, ws.id, anonymous_id="phone-7")
    assert merged.id == known_id
    assert sorted(merged.anonymous_ids) == ["phone-7"]
    assert merged.traits == {"plan": "pro", "city": "Lyon"}
    assert merged.event_count == 4
    with container.db.read() as conn:
        _, evs = profiles.events_of(conn, ws.id, known_id, after=None, limit=10)
        merges = profiles.merges_of(conn, ws.id, known_id)
        # The old id redirects to the survivor.
        assert profiles.get_profile(conn, ws.id, anon_id).id == known_id
        tomb = conn.execute(select(profiles_table).where(profiles_table.c.id == anon_id)).one()
    assert tomb.merged_into == known_id
    assert [e.message_id for e in evs] == ["k1", "a1", "a2", "j"]
    assert len(merges) == 1
    assert merges[0].from_profile_id == anon_id
    assert merges[0].reason == "track"
    assert merges[0].message_id == "j"
    assert merges[0].merged_at == clock.now()


def test_shared_device_does_not_merge_two_known_people(container: Container) -> None:
    ws = make_workspace(container)
    send(container, ws.id, {"type": "identify", "userId": "alice", "anonymousId": "kiosk", "messageId": "1"})
    send(container, ws.id, {"type": "identify", "userId": "bob", "anonymousId": "kiosk", "messageId": "2"})
    alice = lookup(container, ws.id, user_id="alice")
    bob = lookup(container, ws.id, user_id="bob")
    assert alice.id != bob.id
    assert alice.anonymous_ids == ["kiosk"]
    assert bob.anonymous_ids == []
    with container.db.read() as conn:
        assert conn.execute(select(profile_merges)).all() == []


def test_alias_merges_previous_id_into_user_id(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {"type": "identify", "userId": "old-crm-7", "traits": {"email": "x@example.com"}, "messageId": "1"},
        {"type": "identify", "userId": "new-42", "traits": {"plan": "free"}, "messageId": "2"},
    )
    old = lookup(container, ws.id, user_id="old-crm-7")
    send(container, ws.id, {"type": "alias", "userId": "new-42", "previousId": "old-crm-7", "messageId": "3"})
    merged = lookup(container, ws.id, user_id="old-crm-7")
    assert merged.id == lookup(container, ws.id, user_id="new-42").id
    assert merged.id != old.id
    assert sorted(merged.user_ids) == ["new-42", "old-crm-7"]
    assert merged.email == "x@example.com"
    with container.db.read() as conn:
        [merge] = profiles.merges_of(conn, ws.id, merged.id)
    assert merge.reason == "alias"
    assert merge.from_profile_id == old.id


def test_alias_of_unknown_ids_creates_one_profile(container: Container) -> None:
    ws = make_workspace(container)
    send(container, ws.id, {"type": "alias", "userId": "u", "previousId": "anon-x", "messageId": "1"})
    p = lookup(container, ws.id, user_id="u")
    assert lookup(container, ws.id, anonymous_id="anon-x").id == p.id
    send(container, ws.id, {"type": "track", "anonymousId": "anon-x", "event": "E", "messageId": "2"})
    assert lookup(container, ws.id, user_id="u").event_count == 2


def test_merge_chains_stay_flat(container: Container) -> None:
    ws = make_workspace(container)
    send(container, ws.id, {"type": "track", "anonymousId": "a", "event": "E", "messageId": "1"})
    send(container, ws.id, {"type": "track", "userId": "b", "event": "E", "messageId": "2"})
    send(container, ws.id, {"type": "track", "userId": "c", "event": "E", "messageId": "3"})
    a = lookup(container, ws.id, anonymous_id="a").id
    send(
        container, ws.id, {"type": "track", "userId": "b", "anonymousId": "a", "event": "E", "messageId": "4"}
    )
    b = lookup(container, ws.id, user_id="b").id
    send(container, ws.id, {"type": "alias", "userId": "c", "previousId": "b", "messageId": "5"})
    c = lookup(container, ws.id, user_id="c").id
    with container.db.read() as conn:
        rows = {r.id: r.merged_into for r in conn.execute(select(profiles_table))}
        assert profiles.get_profile(conn, ws.id, a).id == c
    assert rows[a] == c
    assert rows[b] == c
    assert rows[c] is None
    final = lookup(container, ws.id, anonymous_id="a")
    assert final.id == c
    assert final.event_count == 5


def test_traits_latest_timestamp_wins_even_out_of_order(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {
            "type": "identify",
            "userId": "u",
            "timestamp": "2026-11-20T10:00:00Z",
            "traits": {"plan": "pro"},
            "messageId": "new",
        },
    )
    # An older identify that arrives later must not overwrite the newer value...
    send(
        container,
        ws.id,
        {
            "type": "identify",
            "userId": "u",
            "timestamp": "2026-11-01T10:00:00Z",
            "traits": {"plan": "free", "city": "Paris"},
            "messageId": "old",
        },
    )
    p = lookup(container, ws.id, user_id="u")
    # ...but a trait it alone sets is kept.
    assert p.traits == {"plan": "pro", "city": "Paris"}
    assert p.first_seen is not None
    assert p.first_seen.isoformat() == "2026-11-01T10:00:00+00:00"
    assert p.last_seen is not None
    assert p.last_seen.isoformat() == "2026-11-20T10:00:00+00:00"


def test_merge_keeps_the_most_recently_set_trait(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {
            "type": "identify",
            "userId": "u",
            "timestamp": "2026-11-01T00:00:00Z",
            "traits": {"plan": "free", "a": 1},
            "messageId": "1",
        },
        {
            "type": "identify",
            "anonymousId": "x",
            "timestamp": "2026-11-10T00:00:00Z",
            "traits": {"plan": "pro", "b": 2},
            "messageId": "2",
        },
    )
    send(
        container,
        ws.id,
        {
            "type": "identify",
            "userId": "u",
            "anonymousId": "x",
            "timestamp": "2026-11-02T00:00:00Z",
            "messageId": "3",
        },
    )
    assert lookup(container, ws.id, user_id="u").traits == {"plan": "pro", "a": 1, "b": 2}


def test_traits_are_normalised(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {
            "type": "identify",
            "userId": "u",
            "traits": {
                "email": "  Zoé@Example.FR ",
                "phone": "06 12 34 56 78",
                "address": {"country": "FR"},
                "timezone": "Europe/Paris",
            },
            "messageId": "1",
        },
        {
            "type": "identify",
            "userId": "v",
            "traits": {"email": "not-an-email", "phone": "call me", "timezone": "Mars/Olympus"},
            "context": {"timezone": "Asia/Shanghai"},
            "messageId": "2",
        },
    )
    u = lookup(container, ws.id, user_id="u")
    assert u.email == "zoé@example.fr"
    assert u.traits["email"] == "zoé@example.fr"
    assert u.phone == "+33612345678"
    assert u.traits["phone"] == "+33612345678"
    assert u.timezone == "Europe/Paris"
    assert lookup(container, ws.id, email="ZOÉ@example.fr").id == u.id
    v = lookup(container, ws.id, user_id="v")
    assert v.email is None
    assert v.traits["email"] == "not-an-email"  # kept as sent, not used to reach the person
    assert v.phone is None
    assert v.timezone == "Asia/Shanghai"  # the trait's unknown zone is ignored; context's is used


def test_group_call_records_membership_and_group_traits(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {
            "type": "group",
            "userId": "u",
            "groupId": "acme",
            "traits": {"industry": "retail"},
            "messageId": "1",
        },
        {"type": "group", "userId": "u", "groupId": "acme", "traits": {"size": 50}, "messageId": "2"},
    )
    p = lookup(container, ws.id, user_id="u")
    with container.db.read() as conn:
        groups = profiles.groups_of(conn, ws.id, p.id)
    assert [(g["group_id"], g["traits"]) for g in groups] == [("acme", {"industry": "retail", "size": 50})]


def test_erasure_deletes_everything_and_suppresses_reimport(container: Container) -> None:
    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {"type": "track", "anonymousId": "anon", "event": "E", "messageId": "1"},
        {
            "type": "identify",
            "userId": "gone",
            "anonymousId": "anon",
            "traits": {"email": "gone@example.com"},
            "messageId": "2",
        },
    )
    send(container, ws.id, {"type": "track", "userId": "other", "event": "E", "messageId": "3"})
    p = lookup(container, ws.id, user_id="gone")
    # An event of the person still pending in the log is erased too.
    send(
        container, ws.id, {"type": "track", "userId": "gone", "event": "Late", "messageId": "4"}, drain=False
    )
    with container.db.write() as conn:
        done = profiles.erase(conn, ws.id, p.id, secret=container.secret, now=container.clock.now())
    assert done.events_deleted == 3
    with pytest.raises(NotFound):
        lookup(container, ws.id, user_id="gone")
    with container.db.read() as conn:
        left = conn.execute(select(events.c.message_id)).scalars().all()
        stored = str(conn.execute(select(profiles_table)).all()) + str(left)
    assert left == ["3"]
    assert "gone" not in stored
    # Re-import by any of the erased identities is dropped, not stored.
    send(
        container,
        ws.id,
        {"type": "track", "userId": "gone", "event": "Again", "messageId": "5"},
        {"type": "identify", "userId": "new-id", "traits": {"email": "GONE@example.com"}, "messageId": "6"},
        {"type": "track", "anonymousId": "anon", "event": "Again", "messageId": "7"},
    )
    with pytest.raises(NotFound):
        lookup(container, ws.id, user_id="gone")
    with pytest.raises(NotFound):
        lookup(container, ws.id, user_id="new-id")
    with container.db.read() as conn:
        assert conn.execute(select(events.c.message_id)).scalars().all() == ["3"]
    assert container.worker.stats.suppressed == 3


def test_workspaces_do_not_share_identities(container: Container) -> None:
    a = make_workspace(container, "A")
    b = make_workspace(container, "B")
    send(container, a.id, {"type": "identify", "userId": "same", "traits": {"ws": "a"}, "messageId": "1"})
    send(container, b.id, {"type": "identify", "userId": "same", "traits": {"ws": "b"}, "messageId": "1"})
    pa = lookup(container, a.id, user_id="same")
    pb = lookup(container, b.id, user_id="same")
    assert pa.id != pb.id
    assert pa.traits == {"ws": "a"}
    assert pb.traits == {"ws": "b"}


def test_merge_moves_tags_lists_and_consent_and_an_unsubscribe_wins(container: Container) -> None:
    from whenthen import lists

    ws = make_workspace(container)
    send(
        container,
        ws.id,
        {"type": "identify", "userId": "u", "messageId": "1"},
        {"type": "track", "anonymousId": "a", "event": "E", "messageId": "2"},
    )
    u = lookup(container, ws.id, user_id="u").id
    a = lookup(container, ws.id, anonymous_id="a").id
    now = container.clock.now()
    with container.db.write() as conn:
        profiles.add_tags(conn, ws.id, a, ["from-anon"], now)
        profiles.add_tags(conn, ws.id, u, ["known"], now)
        lists.add_member(conn, ws.id, "newsletter", a, source="test", now=now)
        profiles.set_consent(conn, ws.id, u, "email", "subscribed", source="form", now=now)
        profiles.set_consent(conn, ws.id, a, "email", "unsubscribed", source="link", now=now)
    send(container, ws.id, {"type": "identify", "userId": "u", "anonymousId": "a", "messageId": "3"})
    with container.db.read() as conn:
        assert profiles.tags_of(conn, ws.id, u) == ["from-anon", "known"]
        assert lists.lists_of(conn, ws.id, u) == ["newsletter"]
        assert profiles.consent_status(conn, ws.id, u, "email") == "unsubscribed"
        assert profiles.tags_of(conn, ws.id, a) == []
        assert lists.lists_of(conn, ws.id, a) == []


def test_recipients_give_each_id_its_survivor_and_the_survivors_consent(
    container: Container, clock: ManualClock
) -> None:
    """What the email dispatcher reads for a batch of sends, in a few statements: a
    merged-away id answers with its survivor (identities included) and the survivor's
    consent, an erased one with nothing, the others as ``get_profile`` gives them."""
    ws = make_workspace(container).id
    send(
        container,
        ws,
        {"type": "track", "anonymousId": "anon-1", "event": "Viewed", "messageId": "1"},
        {"type": "identify", "userId": "kim", "traits": {"email": "kim@example.com"}, "messageId": "2"},
        {"type": "identify", "userId": "lee", "traits": {"email": "lee@example.com"}, "messageId": "3"},
        {"type": "identify", "userId": "gone", "traits": {"email": "gone@example.com"}, "messageId": "4"},
    )
    anon = lookup(container, ws, anonymous_id="anon-1").id
    gone = lookup(container, ws, user_id="gone").id
    send(container, ws, {"type": "identify", "userId": "kim", "anonymousId": "anon-1", "messageId": "5"})
    kim = lookup(container, ws, user_id="kim")
    lee = lookup(container, ws, user_id="lee")
    with container.db.write() as conn:
        profiles.set_consent(conn, ws, kim.id, "email", "unsubscribed", source="test", now=clock.now())
        profiles.set_consent(conn, ws, lee.id, "sms", "unsubscribed", source="test", now=clock.now())
        profiles.erase(conn, ws, gone, secret=container.secret, now=clock.now())
    with container.db.read() as conn:
        found = profiles.recipients(conn, ws, [anon, kim.id, lee.id, gone, "p_nobody"], "email")
        expected = {pid: profiles.get_profile(conn, ws, pid) for pid in (anon, kim.id, lee.id)}
    assert found[anon] == (expected[anon], "unsubscribed")
    assert expected[anon].id == kim.id
    assert found[kim.id] == (expected[kim.id], "unsubscribed")
    survivor = found[kim.id][0]
    assert survivor is not None
    assert survivor.user_ids == ["kim"]
    assert set(survivor.anonymous_ids) == {"anon-1"}
    assert found[lee.id] == (expected[lee.id], None)  # a decision on another channel only
    assert found[gone] == (None, None)
    assert found["p_nobody"] == (None, None)
