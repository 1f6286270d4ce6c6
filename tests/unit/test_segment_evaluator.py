"""The segment language and the pure evaluator: parsing, each condition kind, next_change."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.segment_trees import trees
from whenthen.segments.definition import (
    InvalidSegment,
    SegmentDefinition,
    instant_us,
    parse_segment,
    segment_json_schema,
    to_us,
)
from whenthen.segments.evaluator import (
    MAX_PROBES,
    ProfileView,
    changes,
    evaluate,
    next_change,
    score_value,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
US = timedelta(microseconds=1)
H = timedelta(hours=1)
D = timedelta(days=1)


def seg(cond: dict[str, Any]) -> SegmentDefinition:
    return parse_segment({"condition": cond})


def ev(name: str, at: datetime, **props: Any) -> tuple[str, dict[str, Any], datetime]:
    return (name, props, at)


# ---- parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "path", "reason"),
    [
        ({"kind": "trait", "path": "a", "op": "in", "value": 3}, "condition", "non-empty list"),
        ({"kind": "trait", "path": "a", "op": "gt", "value": "3"}, "condition", "needs a number"),
        ({"kind": "trait", "path": "a", "op": "eq"}, "condition", "not_exists"),
        ({"kind": "trait", "path": "a", "op": "exists", "value": 1}, "condition", "takes no value"),
        (
            {"kind": "trait", "path": "a", "op": "before", "value": "2026-02-30"},
            "condition",
            "not an instant",
        ),
        ({"kind": "trait", "path": "a", "op": "within_last", "value": "-1d"}, "condition", "positive"),
        ({"kind": "trait", "path": "a.0", "op": "exists"}, "condition.path", "numeric keys"),
        ({"kind": "trait", "path": "a..b", "op": "exists"}, "condition.path", "empty key"),
        ({"kind": "trait", "path": 'a"b', "op": "exists"}, "condition.path", "quotes"),
        ({"kind": "trait", "path": "a", "op": "nearly"}, "condition.op", "Input should be"),
        ({"kind": "nope"}, "condition", "does not match any of the expected tags"),
        ({"kind": "event", "event": "A", "bogus": 1}, "condition.bogus", "Extra inputs"),
        ({"kind": "event", "event": "A", "exactly": 1, "at_least": 1}, "condition", "exactly excludes"),
        ({"kind": "event", "event": "A", "performed": False, "at_most": 1}, "condition", "takes no counts"),
        ({"kind": "event", "event": "A", "at_least": 3, "at_most": 2}, "condition", "greater than"),
        ({"kind": "event", "event": "A", "at_least": 0}, "condition.at_least", "greater than or equal to 1"),
        ({"kind": "event", "event": "A", "within_last": "soon"}, "condition.within_last", "not a duration"),
        ({"kind": "event", "event": "A", "from": "yesterday"}, "condition.from", "not an instant"),
        (
            {"kind": "event", "event": "A", "where": [{"path": "properties.total", "op": "exists"}]},
            "condition.where[0].path",
            "relative to properties",
        ),
        (
            {"kind": "event", "event": "A", "where": [{"path": "t", "op": "within_last", "value": "1d"}]},
            "condition.where[0]",
            "not available in event filters",
        ),
        ({"kind": "sequence", "first": {"event": "A"}}, "condition", "exactly one of then, then_not"),
        (
            {"kind": "sequence", "first": {"event": "A"}, "then_not": {"event": "B"}},
            "condition",
            "then_not needs within",
        ),
        ({"kind": "engagement", "action": "opened", "url_contains": "x"}, "condition", "clicked"),
        ({"kind": "engagement", "action": "opened", "node": "n"}, "condition", "journey_id"),
        ({"kind": "score", "model": "m", "op": "eq", "value": 1}, "condition.op", "Input should be"),
        ({"kind": "stage", "in": []}, "condition.in", "at least 1"),
        ({"kind": "and", "conditions": []}, "condition.conditions", "at least 1"),
        (
            {
                "kind": "or",
                "conditions": [{"kind": "tag", "tag": "a"}, {"kind": "not", "condition": {"kind": "x"}}],
            },
            "condition.conditions[1].condition",
            "does not match",
        ),
    ],
)
def test_problems_name_the_path_and_the_reason(cond: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidSegment) as info:
        seg(cond)
    assert [p.path for p in info.value.problems] == [path], info.value.problems
    assert reason in info.value.problems[0].reason


def test_every_problem_is_reported_and_nesting_is_limited() -> None:
    with pytest.raises(InvalidSegment) as info:
        seg(
            {
                "kind": "and",
                "conditions": [
                    {"kind": "trait", "path": "a", "op": "gt", "value": "x"},
                    {"kind": "tag"},
                    {"kind": "list", "list": "ok"},
                ],
            }
        )
    assert [p.path for p in info.value.problems] == ["condition.conditions[0]", "condition.conditions[1].tag"]
    deep: dict[str, Any] = {"kind": "tag", "tag": "t"}
    for _ in range(8):
        deep = {"kind": "not", "condition": deep}
    with pytest.raises(InvalidSegment, match="nested deeper than 8"):
        seg(deep)
    with pytest.raises(InvalidSegment, match="more than 100 conditions"):
        seg({"kind": "or", "conditions": [{"kind": "tag", "tag": str(i)} for i in range(100)]})


def test_json_schema_is_discriminated_by_kind() -> None:
    schema = segment_json_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    condition = schema["properties"]["condition"]
    assert condition["discriminator"]["propertyName"] == "kind"
    assert set(condition["discriminator"]["mapping"]) == {
        "and",
        "or",
        "not",
        "trait",
        "event",
        "first_performed",
        "last_performed",
        "sequence",
        "list",
        "tag",
        "score",
        "stage",
        "engagement",
    }
    assert "from" in schema["$defs"]["EventCondition"]["properties"]
    assert "in" in schema["$defs"]["StageCondition"]["properties"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1970-01-01", 0),
        ("1970-01-01T00:00", 0),
        ("1970-01-01 00:00:01", 1_000_000),
        ("1970-01-01T00:00:00.5Z", 500_000),
        ("1970-01-01T00:00:00.000001+00:00", 1),
        ("1970-01-01T01:00:00+01:00", 0),
        ("1969-12-31T23:00:00-01:00", 0),
        ("2024-02-29", to_us(datetime(2024, 2, 29, tzinfo=UTC))),
        ("2000-02-29T12:00:00Z", to_us(datetime(2000, 2, 29, 12, tzinfo=UTC))),
        ("0001-01-01", to_us(datetime(1, 1, 1, tzinfo=UTC))),
        ("2023-02-29", None),
        ("1900-02-29", None),
        ("2026-04-31", None),
        ("2026-00-10", None),
        ("0000-01-01", None),
        ("2026-01-01T24:00", None),
        ("2026-01-01T23:60", None),
        ("2026-01-01T23:59:60", None),
        ("2026-01-01T00:00+24:00", None),
        ("2026-01-01T00:00+01:60", None),
        ("2026-01-01T00:00:00.1234567", None),
        ("2026-01-01t00:00:00z", None),
        ("2026-01-01T00", None),
        ("20260101", None),
        ("2026-01-01 ", None),
        ("2026-01-01\n", None),
        ("\uff12\uff10\uff12\uff16-01-01", None),  # full-width digits
        (20260101, None),
    ],
)
def test_instants_have_one_strict_shape(text: object, expected: int | None) -> None:
    assert instant_us(text) == expected


# ---- conditions ---------------------------------------------------------------------

TRAITS: dict[str, Any] = {
    "plan": "Pro",
    "age": 41,
    "ratio": 2.5,
    "vip": True,
    "nothing": None,
    "code": "10",
    "interests": ["Golf", 3, False],
    "address": {"city": "Berlin", "zip": None},
    "signup": (NOW - 7 * D).isoformat(),
    "trial_end": "2026-11-26",
    "birthday": "1985-02-30",
}


@pytest.mark.parametrize(
    ("path", "op", "value", "expected"),
    [
        ("plan", "eq", "pro", True),
        ("plan", "eq", "Pro ", False),
        ("plan", "ne", "pro", False),
        ("missing", "ne", "pro", True),
        ("nothing", "ne", "pro", True),
        ("plan", "in", ["basic", "PRO"], True),
        ("missing", "not_in", ["pro"], True),
        ("plan", "contains", "R", True),
        ("plan", "starts_with", "pr", True),
        ("plan", "starts_with", "ro", False),
        ("age", "eq", 41.0, True),
        ("age", "eq", "41", False),
        ("code", "eq", 10, False),
        ("code", "gt", 5, False),
        ("vip", "eq", True, True),
        ("vip", "eq", 1, False),
        ("vip", "eq", "true", False),
        ("age", "gt", 40, True),
        ("age", "gte", 41, True),
        ("ratio", "lt", 2.5, False),
        ("ratio", "lte", 2.5, True),
        ("vip", "gt", 0, False),
        ("nothing", "exists", None, False),
        ("nothing", "not_exists", None, True),
        ("missing", "not_exists", None, True),
        ("interests", "exists", None, True),
        ("interests", "contains", "golf", True),
        ("interests", "contains", 3, True),
        ("interests", "contains", False, True),
        ("interests", "contains", "3", False),
        ("interests", "eq", "Golf", False),
        ("address.city", "eq", "BERLIN", True),
        ("address.zip", "exists", None, False),
        ("address", "exists", None, True),
        ("plan.x", "exists", None, False),
        ("signup", "within_last", "7d", True),
        ("signup", "within_last", "6d", False),
        ("signup", "older_than", "7d", False),
        ("signup", "older_than", "6d", True),
        ("signup", "before", "2026-11-18T12:00:00.000001Z", True),
        ("signup", "after", "2026-11-18T12:00:00Z", False),
        ("trial_end", "within_next", "12h", True),
        ("trial_end", "within_next", "11h", False),
        ("trial_end", "within_last", "1000d", False),
        ("birthday", "before", "2030-01-01", False),
        ("age", "before", "2030-01-01", False),
    ],
)
def test_trait_conditions(path: str, op: str, value: Any, expected: bool) -> None:
    cond: dict[str, Any] = {"kind": "trait", "path": path, "op": op}
    if value is not None:
        cond["value"] = value
    assert evaluate(seg(cond), ProfileView(traits=TRAITS), NOW) is expected


ORDERS = ProfileView(
    events=[
        ev("Order Completed", NOW - 10 * D, total=20, items={"sku": "A-1"}),
        ev("Order Completed", NOW - 7 * D, total=5),
        ev("Order Completed", NOW - H, total="50"),
        ev("Signed Up", NOW - 30 * D),
        ev("Order Completed", NOW + H, total=1),  # stamped after now
    ]
)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, True),
        ({"at_least": 4}, True),
        ({"at_least": 5}, False),
        ({"exactly": 4}, True),
        ({"at_most": 3}, False),
        ({"within_last": "7d"}, True),
        ({"within_last": "7d", "exactly": 2}, True),  # NOW - 7d is inside
        ({"within_last": "1h", "exactly": 1}, True),
        ({"within_last": "59m", "performed": False}, True),
        ({"where": [{"path": "total", "op": "gte", "value": 10}], "exactly": 1}, True),  # "50" is a string
        ({"where": [{"path": "items.sku", "op": "starts_with", "value": "a-"}]}, True),
        ({"where": [{"path": "items", "op": "not_exists"}], "exactly": 3}, True),
        ({"from": "2026-11-15T12:00:00Z", "to": "2026-11-18T12:00:00Z", "exactly": 1}, True),  # [from, to)
        ({"from": "2026-11-18T12:00:00Z", "exactly": 3}, True),
        ({"to": "2026-11-15T12:00:00Z"}, False),
    ],
)
def test_event_conditions(extra: dict[str, Any], expected: bool) -> None:
    d = seg({"kind": "event", "event": "Order Completed", **extra})
    assert evaluate(d, ORDERS, NOW) is expected


@pytest.mark.parametrize(
    ("kind", "op", "value", "expected"),
    [
        ("first_performed", "older_than", "9d", True),
        ("first_performed", "within_last", "9d", False),
        ("last_performed", "within_next", "1h", True),  # the event stamped after now
        ("last_performed", "within_last", "30d", False),
        ("first_performed", "before", "2026-11-15T12:00:00Z", False),  # equal is not before
        ("first_performed", "before", "2026-11-15T12:00:00.000001Z", True),
        ("first_performed", "after", "2026-11-15T11:59:59.999999Z", True),
    ],
)
def test_first_and_last_performed(kind: str, op: str, value: str, expected: bool) -> None:
    d = seg({"kind": kind, "event": "Order Completed", "op": op, "value": value})
    assert evaluate(d, ORDERS, NOW) is expected
    never = seg({"kind": kind, "event": "Refund", "op": "older_than", "value": "1d"})
    assert evaluate(never, ORDERS, NOW) is False


CART = ProfileView(
    events=[
        ev("Added to Cart", NOW - 3 * D, cart="c1"),
        ev("Order Completed", NOW - 3 * D + 2 * H, cart="c1"),
        ev("Added to Cart", NOW - 5 * H, cart="c2"),
        ev("Added to Cart", NOW - H, cart="c3"),
    ]
)


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ({"then": {"event": "Order Completed"}}, True),
        ({"then": {"event": "Order Completed"}, "within": "2h"}, True),  # b = a + 2h: inside
        ({"then": {"event": "Order Completed"}, "within": "119m"}, False),
        ({"then_not": {"event": "Order Completed"}, "within": "4h"}, True),  # c2
        ({"then_not": {"event": "Order Completed"}, "within": "6h"}, False),  # c2, c3 still waiting
        ({"then_not": {"event": "Order Completed"}, "within": "5h"}, True),  # c2's wait ends exactly now
        ({"then_not": {"event": "Order Completed"}, "within": "4h", "first_within_last": "4h"}, False),
        ({"first": {"event": "Added to Cart", "where": [{"path": "cart", "op": "eq", "value": "C1"}]}}, True),
        ({"then": {"event": "Added to Cart"}, "within": "2d"}, True),  # c2 then c3
        ({"then": {"event": "Added to Cart"}, "within": "3h"}, False),
    ],
)
def test_sequences(cond: dict[str, Any], expected: bool) -> None:
    full: dict[str, Any] = {"kind": "sequence", "first": {"event": "Added to Cart"}, **cond}
    if "first" in cond and "then" not in cond and "then_not" not in cond:
        full["then"] = {"event": "Order Completed"}
    assert evaluate(seg(full), CART, NOW) is expected


MEMBER = ProfileView(
    lists={"newsletter"},
    tags={"vip"},
    stage="lead",
    scores={"engagement": (80.0, NOW - 2 * D), "fit": (10.0, NOW - 400 * D), "future": (8.0, NOW + D)},
    half_lives={"engagement": 2 * D, "fit": None, "future": D},
    events=[
        ev("Email Opened", NOW - 2 * D, message_id="m1", journey_id="j1", node="welcome"),
        ev(
            "Email Link Clicked",
            NOW - H,
            message_id="m2",
            journey_id="j1",
            node="offer",
            url="https://x.test/SALE",
        ),
    ],
)


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        ({"kind": "list", "list": "newsletter"}, True),
        ({"kind": "list", "list": "other"}, False),
        ({"kind": "tag", "tag": "vip"}, True),
        ({"kind": "tag", "tag": "VIP"}, False),
        ({"kind": "stage", "in": ["lead", "mql"]}, True),
        ({"kind": "stage", "in": ["customer"]}, False),
        ({"kind": "score", "model": "engagement", "op": "gte", "value": 40}, True),  # 80 halved once
        ({"kind": "score", "model": "engagement", "op": "gt", "value": 40}, False),
        ({"kind": "score", "model": "fit", "op": "gte", "value": 10}, True),  # no decay
        ({"kind": "score", "model": "future", "op": "gte", "value": 8}, True),  # as_of later: no decay yet
        ({"kind": "score", "model": "unknown", "op": "lt", "value": 0.5}, True),  # no score: 0
        ({"kind": "score", "model": "unknown", "op": "gt", "value": 0}, False),
        ({"kind": "engagement", "action": "opened"}, True),
        ({"kind": "engagement", "action": "opened", "message_id": "m2"}, True),  # a click is an open
        ({"kind": "engagement", "action": "clicked", "message_id": "m1"}, False),
        ({"kind": "engagement", "action": "clicked", "journey_id": "j1", "node": "offer"}, True),
        ({"kind": "engagement", "action": "clicked", "url_contains": "sale"}, True),
        ({"kind": "engagement", "action": "opened", "message_id": "m1", "within_last": "1d"}, False),
        ({"kind": "not", "condition": {"kind": "tag", "tag": "vip"}}, False),
        (
            {"kind": "and", "conditions": [{"kind": "tag", "tag": "vip"}, {"kind": "list", "list": "x"}]},
            False,
        ),
        (
            {
                "kind": "or",
                "conditions": [{"kind": "tag", "tag": "x"}, {"kind": "list", "list": "newsletter"}],
            },
            True,
        ),
    ],
)
def test_membership_scores_and_engagement(cond: dict[str, Any], expected: bool) -> None:
    assert evaluate(seg(cond), MEMBER, NOW) is expected


def test_score_decay_rule() -> None:
    assert score_value(80.0, NOW, 2 * D, NOW + 2 * D) == 40.0
    assert score_value(80.0, NOW, 2 * D, NOW + 4 * D) == 20.0
    assert score_value(-8.0, NOW, D, NOW + D) == -4.0  # negative scores decay towards 0 too
    assert score_value(80.0, NOW, 2 * D, NOW - D) == 80.0  # as_of after t: not decayed
    assert score_value(80.0, NOW, None, NOW + 400 * D) == 80.0
    assert score_value(1e300, NOW, H, NOW + 1000 * H - US) > 0
    assert score_value(1e300, NOW, H, NOW + 1000 * H) == 0.0  # cut off after 1000 half-lives


def test_evaluate_refuses_a_naive_now() -> None:
    with pytest.raises(ValueError, match="aware"):
        evaluate(seg({"kind": "tag", "tag": "t"}), ProfileView(), datetime(2026, 1, 1))


# ---- next_change --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "view", "expected"),
    [
        # An event leaves "within the last 7d" one microsecond after ts + 7d.
        (
            {"kind": "event", "event": "A", "within_last": "7d"},
            ProfileView(events=[ev("A", NOW - 2 * D)]),
            NOW + 5 * D + US,
        ),
        # Two events: the count drops below 2 when the older leaves.
        (
            {"kind": "event", "event": "A", "within_last": "7d", "at_least": 2},
            ProfileView(events=[ev("A", NOW - 2 * D), ev("A", NOW - 6 * D)]),
            NOW + D + US,
        ),
        # Only the newer leaving changes "at least 1".
        (
            {"kind": "event", "event": "A", "within_last": "7d"},
            ProfileView(events=[ev("A", NOW - 2 * D), ev("A", NOW - 6 * D)]),
            NOW + 5 * D + US,
        ),
        # An event stamped in the future enters the window at its timestamp.
        (
            {"kind": "event", "event": "A", "within_last": "7d"},
            ProfileView(events=[ev("A", NOW + H)]),
            NOW + H,
        ),
        # No window: nothing changes by time alone.
        ({"kind": "event", "event": "A"}, ProfileView(events=[ev("A", NOW - 2 * D)]), None),
        # A date trait: within_last expires, older_than starts, within_next starts and ends.
        (
            {"kind": "trait", "path": "d", "op": "within_last", "value": "7d"},
            ProfileView(traits={"d": "2026-11-20"}),
            datetime(2026, 11, 27, tzinfo=UTC) + US,
        ),
        (
            {"kind": "trait", "path": "d", "op": "older_than", "value": "7d"},
            ProfileView(traits={"d": "2026-11-20"}),
            datetime(2026, 11, 27, tzinfo=UTC) + US,
        ),
        (
            {"kind": "trait", "path": "d", "op": "within_next", "value": "1d"},
            ProfileView(traits={"d": "2026-12-01"}),
            datetime(2026, 11, 30, tzinfo=UTC),
        ),
        (
            {"kind": "trait", "path": "d", "op": "within_next", "value": "10d"},
            ProfileView(traits={"d": "2026-12-01"}),
            datetime(2026, 12, 1, tzinfo=UTC) + US,
        ),
        (
            {"kind": "trait", "path": "d", "op": "within_last", "value": "7d"},
            ProfileView(traits={"d": 3}),
            None,
        ),
        # A sequence's wait ends: "added, then no order within 1h" becomes true at a + 1h.
        (
            {"kind": "sequence", "first": {"event": "Cart"}, "then_not": {"event": "Order"}, "within": "1h"},
            ProfileView(events=[ev("Cart", NOW - 20 * timedelta(minutes=1))]),
            NOW + 40 * timedelta(minutes=1),
        ),
        # last_performed older_than: a lapsed customer from ts + 30d + 1us.
        (
            {"kind": "last_performed", "event": "Order", "op": "older_than", "value": "30d"},
            ProfileView(events=[ev("Order", NOW - 10 * D), ev("Order", NOW - 20 * D)]),
            NOW + 20 * D + US,
        ),
        # A decaying score crosses its threshold: 80 halves to 40 after exactly one half-life.
        (
            {"kind": "score", "model": "e", "op": "gte", "value": 40},
            ProfileView(scores={"e": (80.0, NOW)}, half_lives={"e": 2 * D}),
            NOW + 2 * D + US,
        ),
        (
            {"kind": "score", "model": "e", "op": "gt", "value": 40},
            ProfileView(scores={"e": (80.0, NOW)}, half_lives={"e": 2 * D}),
            NOW + 2 * D,
        ),
        # Without decay, or when the threshold is never crossed, no change.
        (
            {"kind": "score", "model": "e", "op": "gte", "value": 40},
            ProfileView(scores={"e": (80.0, NOW)}, half_lives={"e": None}),
            None,
        ),
        (
            {"kind": "score", "model": "e", "op": "gte", "value": -1},
            ProfileView(scores={"e": (80.0, NOW)}, half_lives={"e": D}),
            None,
        ),
        # Negative points rise towards 0 and cross "lt -1".
        (
            {"kind": "score", "model": "e", "op": "lt", "value": -1},
            ProfileView(scores={"e": (-2.0, NOW)}, half_lives={"e": D}),
            NOW + D,
        ),
        # Combinators: the first instant the whole answer changes, not the first leaf change.
        (
            {
                "kind": "or",
                "conditions": [
                    {"kind": "event", "event": "A", "within_last": "1d"},
                    {"kind": "event", "event": "B", "within_last": "3d"},
                ],
            },
            ProfileView(events=[ev("A", NOW - H), ev("B", NOW - H)]),
            NOW + 3 * D - H + US,
        ),
        (
            {"kind": "not", "condition": {"kind": "event", "event": "A", "within_last": "1d"}},
            ProfileView(events=[ev("A", NOW - H)]),
            NOW + D - H + US,
        ),
        ({"kind": "tag", "tag": "t"}, ProfileView(tags={"t"}), None),
    ],
)
def test_next_change(cond: dict[str, Any], view: ProfileView, expected: datetime | None) -> None:
    d = seg(cond)
    assert next_change(d, view, NOW) == expected
    if expected is not None:
        assert evaluate(d, view, expected) != evaluate(d, view, NOW)
        assert evaluate(d, view, expected - US) == evaluate(d, view, NOW)


def test_next_change_is_conservative_past_the_probe_limit() -> None:
    # Many events leave "at least 1 within 1d" one by one; the answer changes only when the
    # last one leaves, beyond MAX_PROBES leave-instants: the answer is earlier, never later.
    events = [ev("A", NOW - D + i * timedelta(seconds=1)) for i in range(MAX_PROBES + 10)]
    view = ProfileView(events=events)
    d = seg({"kind": "event", "event": "A", "within_last": "1d"})
    truth = NOW + timedelta(seconds=MAX_PROBES + 9) + US
    got = next_change(d, view, NOW)
    assert got is not None
    assert got < truth
    assert evaluate(d, view, got) is True
    assert changes(d, view, NOW, NOW + D)[-1] == (truth, False)


# A property: the answer of next_change is exact. Nothing changes strictly before it (checked
# at the other leaves' instants and at random instants) and the answer differs at it.

moments = st.integers(min_value=-40 * 24, max_value=10 * 24).map(lambda h: NOW + timedelta(hours=h))
durations = st.sampled_from(["1h", "1d", "7d", "30d"])
time_leaves = st.one_of(
    st.builds(
        lambda name, w, n: {"kind": "event", "event": name, "within_last": w, "at_least": n},
        st.sampled_from(["A", "B"]),
        durations,
        st.integers(1, 2),
    ),
    st.builds(
        lambda op, w: {"kind": "trait", "path": "d", "op": op, "value": w},
        st.sampled_from(["within_last", "within_next", "older_than"]),
        durations,
    ),
    st.builds(
        lambda k, op, w: {"kind": k, "event": "A", "op": op, "value": w},
        st.sampled_from(["first_performed", "last_performed"]),
        st.sampled_from(["within_last", "within_next", "older_than"]),
        durations,
    ),
    st.builds(
        lambda w, fw: {
            "kind": "sequence",
            "first": {"event": "A"},
            "then_not": {"event": "B"},
            "within": w,
            **({"first_within_last": fw} if fw else {}),
        },
        durations,
        st.one_of(st.none(), durations),
    ),
    st.builds(
        lambda op, v: {"kind": "score", "model": "e", "op": op, "value": v},
        st.sampled_from(["gt", "gte", "lt", "lte"]),
        st.sampled_from([1, 2.5, 5, 10, -1]),
    ),
)
time_conditions = trees(time_leaves, max_leaves=4)
views = st.builds(
    lambda evs, d, pts, as_of, hl: ProfileView(
        traits={"d": d.isoformat()},
        events=evs,
        scores={"e": (pts, as_of)},
        half_lives={"e": hl},
    ),
    st.lists(st.tuples(st.sampled_from(["A", "B"]), st.just({}), moments), max_size=5),
    moments,
    st.sampled_from([10.0, -10.0, 5.0, 0.0]),
    moments,
    st.sampled_from([timedelta(hours=6), timedelta(days=2), None]),
)


@settings(max_examples=300, deadline=None)
@given(time_conditions, views, st.lists(st.integers(min_value=1, max_value=10**13), max_size=5))
def test_next_change_is_exact(cond: dict[str, Any], view: ProfileView, probes: list[int]) -> None:
    d = seg(cond)
    now_value = evaluate(d, view, NOW)
    flip = next_change(d, view, NOW)
    horizon = flip if flip is not None else NOW + 3650 * D
    for p in probes:
        at = NOW + timedelta(microseconds=p)
        if at < horizon:
            assert evaluate(d, view, at) == now_value
    if flip is not None:
        assert flip > NOW
        assert evaluate(d, view, flip) != now_value
        assert evaluate(d, view, flip - US) == now_value


# The score flip's search starts from the decay formula's crossing; its answer must be the
# one a plain bisection from now to the year 9999 finds (the reference below, the search
# as it was), for every sign, threshold, operator and kind of decay.

_LATEST = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def _reference_flip(op: str, value: float, points: float, as_of: datetime, decay: Any) -> datetime | None:
    def holds(at: datetime) -> bool:
        v = score_value(points, as_of, decay, at)
        return {"gt": v > value, "gte": v >= value, "lt": v < value, "lte": v <= value}[op]

    start = holds(NOW)
    lo, hi = 0, (_LATEST - NOW) // US
    if holds(NOW + hi * US) == start:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(NOW + mid * US) != start:
            hi = mid
        else:
            lo = mid
    return NOW + hi * US


decays = st.one_of(
    st.sampled_from([timedelta(hours=6), timedelta(days=2), timedelta(days=30), timedelta(microseconds=7)]),
    st.integers(min_value=1, max_value=10**12).map(lambda us: timedelta(microseconds=us)),
    st.tuples(st.sampled_from([0.5, 1.0, 3.0]), st.sampled_from([timedelta(days=1), timedelta(hours=5)])),
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["gt", "gte", "lt", "lte"]),
    st.one_of(
        st.sampled_from([0, 1, -1, 2.5, 40, 1e-300, 5e-324, -5e-324]),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    ),
    st.one_of(
        st.sampled_from([80.0, -80.0, 5.0, 1e300, -1e-300, 5e-324]),
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    ),
    st.integers(min_value=-400 * 24, max_value=10 * 24).map(
        lambda h: NOW + timedelta(hours=h, microseconds=h * 7)
    ),
    decays,
)
def test_score_flip_is_the_plain_bisection(
    op: str, value: float, points: float, as_of: datetime, decay: Any
) -> None:
    d = seg({"kind": "score", "model": "e", "op": op, "value": value})
    view = ProfileView(scores={"e": (points, as_of)}, half_lives={"e": decay})
    assert next_change(d, view, NOW) == _reference_flip(op, float(value), points, as_of, decay)
