"""``evaluator.time_direction``: which way the passage of time alone can move a definition.

The compiler's timer candidates rely on it: for a ``LEAVING_ONLY`` definition only current
members (and people with a future-dated event) can have a ``next_change``. The property
below checks that claim against ``next_change`` itself on generated definitions and views
whose events all lie at or before ``now``; the cases pin the analysis leaf by leaf.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.segment_trees import trees
from whenthen.segments.definition import SegmentDefinition, parse_segment
from whenthen.segments.evaluator import (
    ENTERING_ONLY,
    LEAVING_ONLY,
    ProfileView,
    evaluate,
    next_change,
    time_direction,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
HALF_LIVES: dict[str, Any] = {"decaying": timedelta(days=2), "plain": None}


def seg(cond: dict[str, Any]) -> SegmentDefinition:
    return parse_segment({"condition": cond})


def ordered(n: int, within: str = "30d") -> dict[str, Any]:
    return {"kind": "event", "event": "Order", "within_last": within, "at_least": n}


TRAIT = {"kind": "trait", "path": "plan", "op": "in", "value": ["pro", "team"]}


@pytest.mark.parametrize(
    ("cond", "expected"),
    [
        (ordered(2), LEAVING_ONLY),
        (
            {
                "kind": "or",
                "conditions": [ordered(2), {"kind": "and", "conditions": [TRAIT, ordered(1, "7d")]}],
            },
            LEAVING_ONLY,
        ),
        ({"kind": "event", "event": "Order", "within_last": "7d", "performed": False}, ENTERING_ONLY),
        ({"kind": "event", "event": "Order", "within_last": "7d", "at_most": 3}, ENTERING_ONLY),
        ({"kind": "not", "condition": ordered(1)}, ENTERING_ONLY),
        ({"kind": "not", "condition": {"kind": "not", "condition": ordered(1)}}, LEAVING_ONLY),
        ({"kind": "event", "event": "Order", "within_last": "7d", "exactly": 2}, None),
        ({"kind": "event", "event": "Order", "within_last": "7d", "at_least": 1, "at_most": 3}, None),
        ({"kind": "and", "conditions": [ordered(1), {"kind": "not", "condition": ordered(1, "7d")}]}, None),
        ({"kind": "last_performed", "event": "Order", "op": "within_last", "value": "7d"}, LEAVING_ONLY),
        ({"kind": "first_performed", "event": "Order", "op": "older_than", "value": "7d"}, ENTERING_ONLY),
        ({"kind": "engagement", "action": "opened", "within_last": "7d"}, LEAVING_ONLY),
        ({"kind": "trait", "path": "renewal", "op": "within_next", "value": "7d"}, None),
        ({"kind": "score", "model": "decaying", "op": "gte", "value": 5}, None),
        (
            {
                "kind": "and",
                "conditions": [ordered(1), {"kind": "score", "model": "plain", "op": "gte", "value": 5}],
            },
            LEAVING_ONLY,
        ),
        (
            {"kind": "sequence", "first": {"event": "A"}, "then_not": {"event": "B"}, "within": "1d"},
            None,
        ),
        ({"kind": "event", "event": "Order"}, None),  # nothing depends on time
        (TRAIT, None),
    ],
)
def test_time_direction_of_each_kind(cond: dict[str, Any], expected: str | None) -> None:
    assert time_direction(seg(cond), HALF_LIVES) == expected


# ---- the property the compiler relies on ------------------------------------------------

past = st.integers(min_value=-40 * 24, max_value=0).map(lambda h: NOW + timedelta(hours=h))
windows = st.sampled_from(["1h", "1d", "7d", "30d"])
names = st.sampled_from(["A", "B"])
counts = st.sampled_from(
    [{}, {"at_least": 2}, {"at_most": 1}, {"exactly": 1}, {"performed": False}, {"at_least": 1, "at_most": 2}]
)
leaves = st.one_of(
    st.builds(
        lambda name, w, c: {"kind": "event", "event": name, "within_last": w, **c}, names, windows, counts
    ),
    st.builds(
        lambda k, op, w: {"kind": k, "event": "A", "op": op, "value": w},
        st.sampled_from(["first_performed", "last_performed"]),
        st.sampled_from(["within_last", "older_than"]),
        windows,
    ),
    st.builds(lambda name: {"kind": "event", "event": name}, names),
    st.just({"kind": "tag", "tag": "vip"}),
)
conditions = trees(leaves, max_leaves=5)
views = st.builds(
    lambda evs, vip: ProfileView(traits={}, events=evs, tags=frozenset({"vip"} if vip else ())),
    st.lists(st.tuples(names, st.just({}), past), max_size=6),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(conditions, views)
def test_time_moves_people_only_the_way_the_direction_says(cond: dict[str, Any], view: ProfileView) -> None:
    d = seg(cond)
    direction = time_direction(d, {})
    now_in = evaluate(d, view, NOW)
    flip = next_change(d, view, NOW)
    if direction == LEAVING_ONLY and not now_in:
        assert flip is None
    if direction == ENTERING_ONLY and now_in:
        assert flip is None
    if direction is not None and flip is not None:
        assert evaluate(d, view, flip) == (direction == ENTERING_ONLY)


def test_a_future_event_is_why_the_candidates_include_future_ones() -> None:
    """Outside the property's assumption: an event dated ahead enters the window later, so a
    ``LEAVING_ONLY`` definition can gain that person (the compiler adds them)."""
    d = seg(ordered(1, "7d"))
    view = ProfileView(traits={}, events=[("Order", {}, NOW + timedelta(hours=3))])
    assert time_direction(d, {}) == LEAVING_ONLY
    assert evaluate(d, view, NOW) is False
    assert next_change(d, view, NOW) == NOW + timedelta(hours=3)
