"""Segment membership kept up to date by the pipeline, by timers and by saving a segment,
and the segments admin API, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.support.journey_env import JourneyEnv
from tests.support.workspace import make_workspace
from whenthen.api.app import create_app
from whenthen.segments import membership
from whenthen.segments.tables import segment_history, segment_members, segment_timers, segments
from whenthen.storage.driver import write_rows as driver_write_rows

PRICING_FANS = {
    "name": "Viewed pricing twice this week",
    "definition": {
        "condition": {
            "kind": "event",
            "event": "Page Viewed",
            "where": [{"path": "name", "value": "Pricing"}],
            "at_least": 2,
            "within_last": "7d",
        }
    },
}
PRO = {"name": "Pro plan", "definition": {"condition": {"kind": "trait", "path": "plan", "value": "pro"}}}


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


def member_ids(http: TestClient, key: str) -> list[str]:
    return [m["profile_id"] for m in http.get(f"/api/v1/segments/{key}/members").json()["data"]]


def test_recent_pricing_viewers_enter_on_events_and_leave_when_the_window_ends(
    env: JourneyEnv, http: TestClient
) -> None:
    assert http.put("/api/v1/segments/pricing-fans", json=PRICING_FANS).status_code == 200
    env.identify("ann", email="ann@example.com")
    pid = env.profile("ann").id
    env.track("ann", "Page Viewed", name="Pricing")
    env.track("ann", "Page Viewed", name="Home")
    assert member_ids(http, "pricing-fans") == []
    env.advance(hours=1)
    env.track("ann", "Page Viewed", name="Pricing")
    assert member_ids(http, "pricing-fans") == [pid]
    assert env.system_events("Segment Entered") == [{"user": "ann", "segment": "pricing-fans"}]
    body = http.get(f"/api/v1/profiles/{pid}/segments").json()
    assert [s["segment"] for s in body["segments"]] == ["pricing-fans"]
    assert [(h["segment"], h["exited_at"]) for h in body["history"]] == [("pricing-fans", None)]

    env.advance(days=6, hours=22)  # the first view is still within the last 7 days
    assert member_ids(http, "pricing-fans") == [pid]
    env.advance(hours=2)  # no new event: the first view has left the window
    assert member_ids(http, "pricing-fans") == []
    assert env.system_events("Segment Exited") == [{"user": "ann", "segment": "pricing-fans"}]
    body = http.get(f"/api/v1/profiles/{pid}/segments").json()
    assert body["segments"] == []
    assert body["history"][0]["exited_at"] is not None


def test_a_trait_segment_follows_identify(env: JourneyEnv, http: TestClient) -> None:
    http.put("/api/v1/segments/pro", json=PRO)
    env.identify("bob", plan="free")
    pid = env.profile("bob").id
    assert member_ids(http, "pro") == []
    env.identify("bob", plan="PRO")  # strings compare ignoring ASCII case
    assert member_ids(http, "pro") == [pid]
    env.identify("bob", plan="team")
    assert member_ids(http, "pro") == []
    history = http.get(f"/api/v1/profiles/{pid}/segments").json()["history"]
    assert len(history) == 1
    assert history[0]["exited_at"] is not None
    assert [e["segment"] for e in env.system_events("Segment Exited")] == ["pro"]


def test_saving_recomputes_membership_preview_pages_and_export(env: JourneyEnv, http: TestClient) -> None:
    for n, country in enumerate(["DE", "DE", "FR", "DE", "AT"]):
        env.identify(f"u{n}", email=f"u{n}@example.com", country=country)
    ids = {f"u{n}": env.profile(f"u{n}").id for n in range(5)}
    germans = {"condition": {"kind": "trait", "path": "country", "value": "DE"}}
    preview = http.post("/api/v1/segments/preview", json={"definition": germans}).json()
    assert preview == {"count": 3, "sample": sorted([ids["u0"], ids["u1"], ids["u3"]])}
    assert http.get("/api/v1/segments").json() == {"data": []}  # a preview saves nothing

    saved = http.put("/api/v1/segments/germans", json={"name": "Germans", "definition": germans}).json()
    assert (saved["version"], saved["entered"], saved["exited"]) == (1, 3, 0)
    first = http.get("/api/v1/segments/germans/members", params={"limit": 2}).json()
    second = http.get(
        "/api/v1/segments/germans/members", params={"limit": 2, "cursor": first["next_cursor"]}
    ).json()
    assert second["next_cursor"] is None
    paged = [m["profile_id"] for m in first["data"] + second["data"]]
    assert paged == sorted([ids["u0"], ids["u1"], ids["u3"]])

    csv = http.get("/api/v1/segments/germans/export.csv")
    assert csv.headers["content-type"].startswith("text/csv")
    lines = csv.text.splitlines()
    assert lines[0] == "profile_id,user_id,email,since"
    assert sorted(line.split(",")[1:3] for line in lines[1:]) == [
        ["u0", "u0@example.com"],
        ["u1", "u1@example.com"],
        ["u3", "u3@example.com"],
    ]

    dach = {"condition": {"kind": "trait", "path": "country", "op": "in", "value": ["DE", "AT"]}}
    saved = http.put("/api/v1/segments/germans", json={"name": "DACH-ish", "definition": dach}).json()
    assert (saved["version"], saved["entered"], saved["exited"]) == (2, 1, 0)
    saved = http.put(
        "/api/v1/segments/germans",
        json={
            "name": "Austria",
            "definition": {"condition": {"kind": "trait", "path": "country", "value": "AT"}},
        },
    ).json()
    assert (saved["version"], saved["entered"], saved["exited"]) == (3, 0, 3)
    assert member_ids(http, "germans") == [ids["u4"]]
    assert sorted(e["user"] for e in env.system_events("Segment Exited")) == ["u0", "u1", "u3"]
    assert [s["key"] for s in http.get("/api/v1/segments").json()["data"]] == ["germans"]

    assert http.delete("/api/v1/segments/germans").json() == {"deleted": True}
    assert http.get("/api/v1/segments/germans/members").status_code == 404
    assert http.get(f"/api/v1/profiles/{ids['u4']}/segments").json()["history"] == []


def test_a_journey_triggered_by_entering_a_segment_sends_an_email(env: JourneyEnv, http: TestClient) -> None:
    env.publish(
        {
            "key": "pricing-nudge",
            "name": "Nudge people who keep looking at pricing",
            "trigger": {
                "kind": "event",
                "event": "Segment Entered",
                "where": [{"path": "segment", "value": "pricing-fans"}],
            },
            "start": "mail",
            "nodes": {
                "mail": {"kind": "send_email", "email": {"subject": "Questions about plans?", "text": "."}}
            },
        }
    )
    http.put("/api/v1/segments/pricing-fans", json=PRICING_FANS)
    env.identify("cy", email="cy@example.com")
    env.track("cy", "Page Viewed", name="Pricing")
    env.advance(minutes=1)  # calls at the same instant with the same content are one call
    assert env.mail_to("cy@example.com") == []
    env.track("cy", "Page Viewed", name="Pricing")
    env.advance(minutes=1)
    assert [m.subject for m in env.mail_to("cy@example.com")] == ["Questions about plans?"]
    env.track("cy", "Page Viewed", name="Pricing")  # already in: no second entry
    env.advance(minutes=1)
    assert len(env.mail_to("cy@example.com")) == 1


def test_every_endpoint_is_confined_to_its_workspace(env: JourneyEnv, http: TestClient) -> None:
    http.put("/api/v1/segments/pro", json=PRO)
    env.identify("dee", plan="pro")
    pid = env.profile("dee").id
    other = make_workspace(env.c, "Other")
    with TestClient(create_app(env.c, run_worker=False), headers=other.admin_headers) as them:
        assert them.get("/api/v1/segments").json() == {"data": []}
        assert them.get("/api/v1/segments/pro").status_code == 404
        assert them.get("/api/v1/segments/pro/members").status_code == 404
        assert them.get("/api/v1/segments/pro/export.csv").status_code == 404
        assert them.delete("/api/v1/segments/pro").status_code == 404
        assert them.get(f"/api/v1/profiles/{pid}/segments").status_code == 404
        assert them.post("/api/v1/segments/preview", json=PRO["definition"]).json() == {
            "count": 0,
            "sample": [],
        }
        # The same key in another workspace is another segment.
        assert them.put("/api/v1/segments/pro", json=PRO).json()["entered"] == 0
        assert them.delete("/api/v1/segments/pro").status_code == 200
    assert member_ids(http, "pro") == [pid]
    assert http.get("/api/v1/segments/nope/export.csv").status_code == 404


def test_bad_input_is_a_clear_error(env: JourneyEnv, http: TestClient) -> None:
    bad = {
        "name": "x",
        "definition": {"condition": {"kind": "trait", "path": "age", "op": "gt", "value": "x"}},
    }
    r = http.put("/api/v1/segments/x", json=bad)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_definition")
    assert r.json()["error"]["problems"][0]["path"].startswith("condition")
    for body in (b"{nope", b"[]", b'{"name": 3, "definition": {}}', b'{"definition": null}'):
        r = http.put("/api/v1/segments/x", content=body)
        assert r.status_code == 400, body
    assert http.put("/api/v1/segments/bad%20key", json=PRO).status_code == 400
    assert http.put("/api/v1/segments/" + "k" * 81, json=PRO).status_code == 400
    assert http.post("/api/v1/segments/preview", json={"condition": {"kind": "nope"}}).status_code == 400
    assert http.post("/api/v1/segments/preview", content=b"\xff").status_code == 400
    http.put("/api/v1/segments/pro", json=PRO)
    assert http.get("/api/v1/segments/pro/members", params={"limit": 0}).status_code == 400
    assert http.get("/api/v1/segments/pro/members", params={"limit": "x"}).status_code == 400
    assert http.get("/api/v1/profiles/nobody/segments").status_code == 404
    assert http.get("/api/v1/segments").json()["data"][0]["key"] == "pro"


def test_merge_and_erasure_keep_memberships_right(env: JourneyEnv, http: TestClient) -> None:
    http.put("/api/v1/segments/pricing-fans", json=PRICING_FANS)
    env.calls(
        {"type": "track", "anonymousId": "anon", "event": "Page Viewed", "properties": {"name": "Pricing"}},
        {"type": "track", "userId": "kim", "event": "Page Viewed", "properties": {"name": "Pricing"}},
    )
    assert member_ids(http, "pricing-fans") == []
    env.calls(
        {"type": "identify", "userId": "kim", "anonymousId": "anon", "traits": {"email": "k@example.com"}}
    )
    pid = env.profile("kim").id
    assert member_ids(http, "pricing-fans") == [pid]  # two views between the two profiles
    assert [e["segment"] for e in env.system_events("Segment Entered")] == ["pricing-fans"]
    body = http.get(f"/api/v1/profiles/{pid}/segments").json()
    assert [s["segment"] for s in body["segments"]] == ["pricing-fans"]

    assert http.delete(f"/api/v1/profiles/{pid}").status_code == 200
    assert member_ids(http, "pricing-fans") == []
    assert http.get("/api/v1/segments/pricing-fans/export.csv").text.splitlines() == [
        "profile_id,user_id,email,since"
    ]
    assert http.get(f"/api/v1/profiles/{pid}/segments").status_code == 404
    env.advance(days=8)  # the timer of the erased person is dropped, not fired
    assert env.system_events("Segment Exited") == []

    from whenthen.segments.tables import segment_history, segment_members, segment_timers

    with env.c.db.read() as conn:  # no trace left, not merely hidden
        for table in (segment_members, segment_timers, segment_history):
            assert conn.execute(select(table).where(table.c.profile_id == pid)).all() == []


def _recorded_announcements(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, str]]]:
    """Every call of the pipeline's ``announce`` from now on, as (name, segment) pairs."""
    from whenthen.pipeline import service as pipeline_service

    calls: list[list[tuple[str, str]]] = []
    real = pipeline_service.announce

    def recorded(conn: Any, ws: str, announcements: Any, **kw: Any) -> int:
        calls.append([(a.name, a.properties["segment"]) for a in announcements])
        return real(conn, ws, announcements, **kw)

    monkeypatch.setattr(pipeline_service, "announce", recorded)
    return calls


def test_one_call_that_moves_a_person_in_and_out_of_several_segments_announces_each_move_in_order(
    env: JourneyEnv, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline announces all of one call's entries and exits together (one look-up
    of the person's ids, one append), in the order of the segments, as it did one by one."""
    free = {
        "name": "Free plan",
        "definition": {"condition": {"kind": "trait", "path": "plan", "value": "free"}},
    }
    team = {
        "name": "Team or pro",
        "definition": {"condition": {"kind": "trait", "path": "plan", "op": "in", "value": ["team", "pro"]}},
    }
    for key, body in (("free", free), ("pro", PRO), ("paid", team)):
        assert http.put(f"/api/v1/segments/{key}", json=body).status_code == 200
    env.identify("cy", plan="free")
    assert [e["segment"] for e in env.system_events("Segment Entered")] == ["free"]

    calls = _recorded_announcements(monkeypatch)
    env.identify("cy", plan="pro")  # leaves free, enters pro and paid
    assert len(calls) == 1
    assert sorted(calls[0]) == [
        ("Segment Entered", "paid"),
        ("Segment Entered", "pro"),
        ("Segment Exited", "free"),
    ]
    assert [e["segment"] for e in env.system_events("Segment Entered")] == [
        "free",
        *[s for n, s in calls[0] if n == "Segment Entered"],
    ]
    assert [e["segment"] for e in env.system_events("Segment Exited")] == ["free"]
    pid = env.profile("cy").id
    assert member_ids(http, "pro") == [pid]
    assert member_ids(http, "paid") == [pid]
    assert member_ids(http, "free") == []


def test_a_batch_appends_the_moves_of_all_its_events_together_in_their_order(
    env: JourneyEnv, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline holds the system events a batch announces and appends them at its end
    with one call (one look-up of senders, one insert), in the order the events moved
    the person: the same log as when each event appended its own."""
    free = {"name": "Free", "definition": {"condition": {"kind": "trait", "path": "plan", "value": "free"}}}
    paid = {
        "name": "Paid",
        "definition": {"condition": {"kind": "trait", "path": "plan", "op": "in", "value": ["team", "pro"]}},
    }
    for key, body in (("free", free), ("paid", paid)):
        assert http.put(f"/api/v1/segments/{key}", json=body).status_code == 200

    calls = _recorded_announcements(monkeypatch)
    # One person's calls, so one partition and one pipeline batch.
    env.calls(
        *(
            {"type": "identify", "userId": "cy", "traits": {"plan": plan}, "messageId": f"m{i}"}
            for i, plan in enumerate(("free", "pro", "free"))
        )
    )
    # Per event, in the events' order (an event's own moves in the segments' order).
    by_event = [
        [("Segment Entered", "free")],
        [("Segment Exited", "free"), ("Segment Entered", "paid")],
        [("Segment Entered", "free"), ("Segment Exited", "paid")],
    ]
    assert len(calls) == 1
    assert [sorted(calls[0][0:1]), sorted(calls[0][1:3]), sorted(calls[0][3:5])] == [
        sorted(e) for e in by_event
    ]
    assert len(calls[0]) == 5
    assert [e["segment"] for e in env.system_events("Segment Entered")] == ["free", "paid", "free"]
    assert [e["segment"] for e in env.system_events("Segment Exited")] == ["free", "paid"]
    assert member_ids(http, "free") == [env.profile("cy").id]
    assert member_ids(http, "paid") == []


def _viewers(plan: str) -> dict[str, Any]:
    return {
        "name": f"{plan} plan, viewed pricing this week",
        "definition": {
            "condition": {
                "kind": "and",
                "conditions": [
                    {"kind": "trait", "path": "plan", "value": plan},
                    {
                        "kind": "event",
                        "event": "Page Viewed",
                        "where": [{"path": "name", "value": "Pricing"}],
                        "within_last": "7d",
                    },
                ],
            }
        },
    }


def test_one_change_writes_all_its_segments_moves_and_timers_together(
    env: JourneyEnv, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person's entries, exits and timers in several segments are written with one
    statement per kind of row (not one per segment), and come out exactly as before:
    members, open and closed stays, timers created, kept and deleted."""
    free = {"name": "Free", "definition": {"condition": {"kind": "trait", "path": "plan", "value": "free"}}}
    for key, body in (
        ("free", free),
        ("pro", PRO),
        ("free-viewers", _viewers("free")),
        ("pro-viewers", _viewers("pro")),
    ):
        assert http.put(f"/api/v1/segments/{key}", json=body).status_code == 200
    env.identify("dee", plan="free")
    env.track("dee", "Page Viewed", name="Pricing")
    pid = env.profile("dee").id
    with env.c.db.read() as conn:
        ids = {r.key: r.id for r in conn.execute(select(segments.c.key, segments.c.id))}

    def state() -> tuple[set[str], list[tuple[str, bool]], dict[str, Any]]:
        with env.c.db.read() as conn:
            members = set(
                conn.execute(
                    select(segment_members.c.segment_id).where(segment_members.c.profile_id == pid)
                ).scalars()
            )
            stays = sorted(
                (r.segment_id, r.exited_at is None)
                for r in conn.execute(select(segment_history).where(segment_history.c.profile_id == pid))
            )
            timers = {
                r.segment_id: r.due_at
                for r in conn.execute(
                    select(segment_timers.c.segment_id, segment_timers.c.due_at).where(
                        segment_timers.c.profile_id == pid
                    )
                )
            }
        return members, stays, timers

    members, _, timers = state()
    assert members == {ids["free"], ids["free-viewers"]}
    assert set(timers) == {ids["free-viewers"]}  # leaves when the view is 7 days old

    # The writes go to the driver (``membership.write_rows``): one call per kind of row,
    # its rows those of all four segments.
    writes: list[tuple[str, int]] = []
    real = driver_write_rows

    def capture(conn: Any, sql: str, keys: Any, rows: list[Any]) -> int:
        words = sql.split()
        verb, table = words[0], words[2] if words[0] in ("INSERT", "DELETE") else words[1]
        writes.append((f"{verb} {table}", len(rows)))
        return real(conn, sql, keys, rows)

    env.advance(hours=1)
    monkeypatch.setattr(membership, "write_rows", capture)
    try:
        env.identify("dee", plan="pro")  # leaves free and free-viewers, enters pro and pro-viewers
    finally:
        monkeypatch.undo()

    members, stays, after = state()
    assert members == {ids["pro"], ids["pro-viewers"]}
    assert stays == sorted(
        [(ids["free"], False), (ids["free-viewers"], False), (ids["pro"], True), (ids["pro-viewers"], True)]
    )
    assert set(after) == {ids["pro-viewers"]}
    assert after[ids["pro-viewers"]] == timers[ids["free-viewers"]]  # the same view ends both windows
    # One statement per kind of row for the four segments.
    assert sorted(writes) == sorted(
        [
            ("INSERT segment_members", 2),
            ("INSERT segment_history", 2),
            ("DELETE segment_members", 2),
            ("UPDATE segment_history", 2),
            ("DELETE segment_timers", 1),
            ("INSERT segment_timers", 1),
        ]
    )
    entered = [e["segment"] for e in env.system_events("Segment Entered")]
    exited = [e["segment"] for e in env.system_events("Segment Exited")]
    assert sorted(entered[-2:]) == ["pro", "pro-viewers"]
    assert sorted(exited) == ["free", "free-viewers"]
