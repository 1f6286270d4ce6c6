"""Tag rules: a tag is added or removed when an event (with filters) happens and a
condition holds; segments reading the tag follow. The admin API. SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.journey_env import JourneyEnv
from whenthen import profiles
from whenthen.api.app import create_app

PREFERS_WECHAT: dict[str, Any] = {
    "name": "Engages through WeChat after other channels went unanswered",
    "tag": "prefers-wechat",
    "event": "Message Clicked",
    "where": [{"path": "channel", "value": "wechat"}],
    "condition": {
        "kind": "and",
        "conditions": [
            {
                "kind": "event",
                "event": "Message Sent",
                "where": [{"path": "channel", "op": "in", "value": ["push", "sms"]}],
                "within_last": "30d",
            },
            {
                "kind": "not",
                "condition": {
                    "kind": "event",
                    "event": "Message Clicked",
                    "where": [{"path": "channel", "op": "in", "value": ["push", "sms"]}],
                    "within_last": "30d",
                },
            },
        ],
    },
}


@pytest.fixture
def http(env: JourneyEnv) -> Iterator[TestClient]:
    with TestClient(create_app(env.c, run_worker=False), headers=env.ws.admin_headers) as client:
        yield client


def tags(env: JourneyEnv, user: str) -> list[str]:
    with env.c.db.read() as conn:
        return profiles.tags_of(conn, env.ws.id, env.profile(user).id)


def test_the_channel_that_worked_is_tagged(env: JourneyEnv, http: TestClient) -> None:
    assert http.put("/api/v1/tag-rules/prefers-wechat", json=PREFERS_WECHAT).status_code == 200
    seg = {"name": "WeChat people", "definition": {"condition": {"kind": "tag", "tag": "prefers-wechat"}}}
    assert http.put("/api/v1/segments/wechat-people", json=seg).status_code == 200
    for user in ("ann", "bob", "cy"):
        env.identify(user, email=f"{user}@example.com")
    # ann: push and SMS went unanswered, then she clicked on WeChat.
    env.track("ann", "Message Sent", channel="push")
    env.track("ann", "Message Sent", channel="sms")
    env.advance(hours=2)
    env.track("ann", "Message Clicked", channel="wechat")
    # bob answered the push already: WeChat is not what worked for him.
    env.track("bob", "Message Sent", channel="push")
    env.track("bob", "Message Clicked", channel="push")
    env.track("bob", "Message Clicked", channel="wechat")
    # cy clicked on WeChat without any other channel tried first.
    env.track("cy", "Message Clicked", channel="wechat")
    env.advance(seconds=1)
    assert tags(env, "ann") == ["prefers-wechat"]
    assert tags(env, "bob") == []
    assert tags(env, "cy") == []
    members = http.get("/api/v1/segments/wechat-people/members").json()["data"]
    assert [m["profile_id"] for m in members] == [env.profile("ann").id]


def test_a_rule_condition_counts_the_events_of_the_same_batch(env: JourneyEnv, http: TestClient) -> None:
    """The pipeline writes which person an event belongs to only when something is about
    to read the person's events: a tag rule's condition must see the earlier events of
    its own batch."""
    assert http.put("/api/v1/tag-rules/prefers-wechat", json=PREFERS_WECHAT).status_code == 200
    env.identify("dan", email="dan@example.com")
    env.calls(
        *(
            {"type": "track", "userId": "dan", "event": name, "properties": {"channel": channel}}
            for name, channel in (
                ("Message Sent", "push"),
                ("Message Sent", "sms"),
                ("Message Clicked", "wechat"),
            )
        )
    )
    assert tags(env, "dan") == ["prefers-wechat"]


def test_filters_and_remove_rules(env: JourneyEnv, http: TestClient) -> None:
    big = {
        "tag": "big-spender",
        "event": "Order Completed",
        "where": [{"path": "total", "op": "gte", "value": 500}],
    }
    churn = {"tag": "big-spender", "action": "remove", "event": "Subscription Cancelled"}
    assert http.put("/api/v1/tag-rules/big-spender", json=big).status_code == 200
    assert http.put("/api/v1/tag-rules/churned", json=churn).status_code == 200
    env.identify("ann", email="ann@example.com")
    env.track("ann", "Order Completed", total=120)
    assert tags(env, "ann") == []
    env.track("ann", "Order Completed", total=900)
    assert tags(env, "ann") == ["big-spender"]
    env.track("ann", "Order Completed", total=700)  # already tagged: nothing changes
    assert tags(env, "ann") == ["big-spender"]
    env.track("ann", "Subscription Cancelled")
    assert tags(env, "ann") == []


def test_the_admin_api(http: TestClient) -> None:
    rule = {"tag": "vip", "event": "Order Completed"}
    r = http.put("/api/v1/tag-rules/vip", json=rule)
    assert r.status_code == 200
    assert r.json() == {"key": "vip", "tag": "vip", "action": "add", "event": "Order Completed", "where": []}
    assert [x["key"] for x in http.get("/api/v1/tag-rules").json()["data"]] == ["vip"]
    assert http.get("/api/v1/tag-rules/vip").json()["tag"] == "vip"
    assert http.put("/api/v1/tag-rules/vip", json={**rule, "tag": "gold"}).json()["tag"] == "gold"
    assert http.delete("/api/v1/tag-rules/vip").json() == {"deleted": True}
    for path in ("/api/v1/tag-rules/vip",):
        r = http.get(path)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "not_found"
    assert http.delete("/api/v1/tag-rules/vip").status_code == 404


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "X"}, "tag"),
        ({"tag": "t"}, "event"),
        ({"tag": "t", "event": "X", "action": "toggle"}, "action"),
        ({"tag": " t", "event": "X"}, "tag"),
        ({"tag": "t", "event": "X", "where": [{"path": "a", "op": "in", "value": 3}]}, "where.0"),
        (
            {"tag": "t", "event": "X", "condition": {"kind": "trait", "path": "plan", "op": "nope"}},
            "condition",
        ),
        ({"tag": "t", "event": "X", "extra": 1}, "extra"),
    ],
)
def test_bad_rules_are_refused_with_the_field_and_reason(
    http: TestClient, body: dict[str, Any], field: str
) -> None:
    r = http.put("/api/v1/tag-rules/bad", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_definition"
    assert any(p["field"].startswith(field) and p["reason"] for p in error["problems"]), error


def test_bad_keys_and_bodies(http: TestClient) -> None:
    assert http.put("/api/v1/tag-rules/Bad Key", json={"tag": "t", "event": "X"}).status_code == 400
    r = http.put("/api/v1/tag-rules/a", json={"key": "b", "tag": "t", "event": "X"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_definition"
    assert http.put("/api/v1/tag-rules/a", json=[1]).status_code == 400
    r = http.put("/api/v1/tag-rules/a", content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400
