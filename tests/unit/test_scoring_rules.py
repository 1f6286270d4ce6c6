"""Scoring rules, lazy decay, caps, trait rules, thresholds and stage rules. Pure."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from whenthen.scoring.model import (
    Lifecycle,
    Score,
    ScoringModel,
    apply,
    crossings_between,
    may_change,
    next_decay_crossing,
    next_stage,
    value_at,
)

T0 = datetime(2026, 11, 25, 12, tzinfo=UTC)

MODEL = ScoringModel.model_validate(
    {
        "key": "interest",
        "name": "Product interest",
        "rules": [
            {"id": "view", "event": "Product Viewed", "points": 5, "cap": {"points": 15, "period": "1d"}},
            {
                "id": "pricing",
                "event": "Page Viewed",
                "where": [{"path": "path", "value": "/pricing"}],
                "points": 10,
            },
            {"id": "unsub", "event": "Email Unsubscribed", "points": -20},
            {"id": "director", "trait": "title", "op": "contains", "value": "director", "points": 25},
        ],
        "decay": {"half_life": "7d"},
        "thresholds": [50],
    }
)


Event = tuple[datetime, str, dict[str, Any], dict[str, Any]]


def run(events: list[Event]) -> tuple[Score | None, list[Any]]:
    score: Score | None = None
    crossings: list[Any] = []
    profile: dict[str, Any] = {}
    for at, name, props, traits in events:
        profile.update(traits)  # traits_after is the whole profile after the event
        new, crossed = apply(MODEL, score, event=name, properties=props, traits_after=profile, now=at)
        score = new or score
        crossings.extend(crossed)
    return score, crossings


def test_event_rules_filters_and_caps_per_period() -> None:
    views: list[Event] = [(T0 + timedelta(minutes=i), "Product Viewed", {}, {}) for i in range(5)]
    score, _ = run(views)
    assert score is not None
    assert score.points == pytest.approx(15, abs=0.01)  # capped at 15 a day (a few minutes of decay)
    next_day = run([*views, (T0 + timedelta(days=1), "Product Viewed", {}, {})])[0]
    assert next_day is not None
    assert next_day.points == pytest.approx(15 * 0.5 ** (1 / 7) + 5, abs=0.01)
    assert run([(T0, "Page Viewed", {"path": "/blog"}, {})])[0] is None
    pricing = run([(T0, "Page Viewed", {"path": "/PRICING"}, {})])[0]
    assert pricing is not None
    assert pricing.points == 10


def test_decay_is_lazy_and_exact() -> None:
    score = Score(80.0, T0)
    assert value_at(score, timedelta(days=7), T0 + timedelta(days=7)) == pytest.approx(40)
    assert value_at(score, timedelta(days=7), T0 + timedelta(days=14)) == pytest.approx(20)
    assert value_at(score, None, T0 + timedelta(days=14)) == 80
    assert value_at(score, timedelta(days=7), T0 - timedelta(days=1)) == 80


def test_trait_rules_give_while_true_and_take_back() -> None:
    score, _ = run(
        [
            (T0, "identify", {}, {"title": "Marketing Director"}),
            (T0, "identify", {}, {"title": "Marketing Director"}),  # still true: not given twice
        ]
    )
    assert score is not None
    assert score.points == 25
    assert score.awarded == ("director",)
    later, _ = run(
        [
            (T0, "identify", {}, {"title": "Marketing Director"}),
            (T0, "identify", {}, {"title": "Analyst"}),
        ]
    )
    assert later is not None
    assert later.points == 0
    assert later.awarded == ()


def test_thresholds_up_and_down() -> None:
    _, crossings = run(
        [
            (T0, "identify", {}, {"title": "Director"}),
            (T0, "Page Viewed", {"path": "/pricing"}, {}),
            (T0, "Product Viewed", {}, {}),
            (T0, "Product Viewed", {}, {}),
            (T0, "Product Viewed", {}, {}),  # 25 + 10 + 15 = 50: crosses
            (T0, "Email Unsubscribed", {}, {}),  # 30: back under
        ]
    )
    assert [(c.threshold, c.direction, c.value) for c in crossings] == [(50, "up", 50), (50, "down", 30)]


@given(
    st.lists(
        st.tuples(st.integers(0, 30 * 24), st.sampled_from(["Product Viewed", "Page Viewed", "x"])),
        max_size=30,
    )
)
def test_decayed_score_never_goes_negative_without_negative_rules(steps: list[tuple[int, str]]) -> None:
    events: list[Event] = sorted(
        ((T0 + timedelta(hours=h), name, {"path": "/pricing"}, {}) for h, name in steps), key=lambda e: e[0]
    )
    score, _ = run(events)
    if score is not None:
        assert score.points >= 0
        assert value_at(score, timedelta(days=7), T0 + timedelta(days=60)) <= score.points


def test_model_validation() -> None:
    with pytest.raises(ValidationError):
        ScoringModel.model_validate({"key": "x", "name": "X", "rules": [{"id": "a", "points": 1}]})
    with pytest.raises(ValidationError):
        ScoringModel.model_validate(
            {
                "key": "x",
                "name": "X",
                "rules": [{"id": "a", "event": "E", "points": 1}, {"id": "a", "event": "F", "points": 1}],
            }
        )
    with pytest.raises(ValidationError):
        ScoringModel.model_validate(
            {
                "key": "x",
                "name": "X",
                "rules": [{"id": "a", "event": "E", "points": 1}],
                "decay": {"half_life": "0d"},
            }
        )


LIFECYCLE = Lifecycle.model_validate(
    {
        "stages": ["subscriber", "lead", "mql", "sql", "customer"],
        "rules": [
            {"stage": "lead", "event": "Form Submitted"},
            {"stage": "mql", "score_model": "interest", "score_at_least": 50},
            {"stage": "customer", "event": "Order Completed"},
        ],
    }
)


def test_stage_rules_move_forward_only() -> None:
    assert next_stage(LIFECYCLE, None, event="Form Submitted", properties={}, scores={}) == "lead"
    assert next_stage(LIFECYCLE, "lead", event="x", properties={}, scores={"interest": 55}) == "mql"
    assert next_stage(LIFECYCLE, "customer", event="Form Submitted", properties={}, scores={}) is None
    assert (
        next_stage(LIFECYCLE, "lead", event="Order Completed", properties={}, scores={"interest": 90})
        == "customer"
    )
    with pytest.raises(ValidationError):
        Lifecycle.model_validate({"stages": ["a"], "rules": [{"stage": "b", "event": "E"}]})


# ---- fixed-amount decay and decay timers ---------------------------------------------------


def fixed_model(thresholds: list[float]) -> ScoringModel:
    return ScoringModel.model_validate(
        {
            "key": "m",
            "name": "m",
            "rules": [{"id": "r", "event": "E", "points": 1}],
            "decay": {"amount": 5, "every": "1w"},
            "thresholds": thresholds,
        }
    )


MONDAY = datetime(2026, 11, 23, tzinfo=UTC)  # periods of "1w" start on Mondays 00:00 UTC


def test_fixed_decay_takes_the_amount_at_each_boundary_and_stops_at_zero() -> None:
    decay = fixed_model([]).decay
    score = Score(12.0, MONDAY + timedelta(days=2))  # a Wednesday
    assert value_at(score, decay, MONDAY + timedelta(days=6, hours=23)) == 12
    assert value_at(score, decay, MONDAY + timedelta(days=7)) == 7  # the next Monday
    assert value_at(score, decay, MONDAY + timedelta(days=14)) == 2
    assert value_at(score, decay, MONDAY + timedelta(days=21)) == 0  # not below 0
    assert value_at(Score(-12.0, MONDAY), decay, MONDAY + timedelta(days=14)) == -2
    assert value_at(Score(-12.0, MONDAY), decay, MONDAY + timedelta(days=35)) == 0


def test_fixed_decay_is_the_same_read_at_once_or_step_by_step() -> None:
    """Lazy decay composes: re-basing the score at any time gives the same later value."""
    decay = fixed_model([]).decay
    score = Score(40.0, MONDAY + timedelta(days=3))
    mid = MONDAY + timedelta(days=10, hours=5)
    end = MONDAY + timedelta(days=30)
    rebased = Score(value_at(score, decay, mid), mid)
    assert value_at(rebased, decay, end) == value_at(score, decay, end) == 20


@pytest.mark.parametrize(
    ("decay", "points", "thresholds", "start", "expected"),
    [
        # 60 halving weekly drops under 50 after 7d * log2(1.2) = 1.841 days.
        ({"half_life": "7d"}, 60.0, [50, 10], 60.0, timedelta(days=7) * math.log2(1.2)),
        # Counting from 40 (50 was announced already): under 10 after 7d * log2(6).
        ({"half_life": "7d"}, 60.0, [50, 10], 40.0, timedelta(days=7) * math.log2(6)),
        # No threshold between the score and 0: never.
        ({"half_life": "7d"}, 60.0, [70], 60.0, None),
        ({"half_life": "7d"}, 60.0, [0], 60.0, None),
        # A negative score rises towards 0 and passes -20 going up.
        ({"half_life": "7d"}, -40.0, [-20], -40.0, timedelta(days=7)),
        # 12 points on a Wednesday, 5 off each Monday: under 10 on the next Monday (7),
        # under 5 the Monday after (2).
        ({"amount": 5, "every": "1w"}, 12.0, [10], 12.0, timedelta(days=5)),
        ({"amount": 5, "every": "1w"}, 12.0, [5], 12.0, timedelta(days=12)),
        # Exactly on a threshold needs one more step to be under it: 15 -> 10 -> 5.
        ({"amount": 5, "every": "1w"}, 15.0, [10], 15.0, timedelta(days=12)),
        # A fixed decay reaches 0: a negative score passes 0 going up.
        ({"amount": 5, "every": "1w"}, -8.0, [0], -8.0, timedelta(days=12)),
        ({"amount": 5, "every": "1w"}, 8.0, [0], 8.0, None),
        ({}, 60.0, [50], 60.0, None),
    ],
)
def test_next_decay_crossing(
    decay: dict[str, Any], points: float, thresholds: list[float], start: float, expected: timedelta | None
) -> None:
    model = ScoringModel.model_validate(
        {"key": "m", "name": "m", "rules": [{"id": "r", "event": "E", "points": 1}], "decay": decay}
        | {"thresholds": thresholds}
    )
    as_of = MONDAY + timedelta(days=2)
    due = next_decay_crossing(model, Score(points, as_of), start)
    if expected is None:
        assert due is None
        return
    assert due is not None
    assert abs(due - (as_of + expected)) < timedelta(milliseconds=1)
    # Just before it the threshold is not passed yet; at it, it is.
    before, at = (
        value_at(Score(points, as_of), model.decay, due - timedelta(milliseconds=1)),
        value_at(Score(points, as_of), model.decay, due),
    )
    assert crossings_between(model, start, before) == ()
    assert len(crossings_between(model, start, at)) == 1


@pytest.mark.parametrize(
    "decay",
    [
        {"half_life": "0d"},
        {"amount": 5},
        {"every": "1w"},
        {"amount": 0, "every": "1w"},
        {"amount": 5, "every": "-1d"},
        {"half_life": "7d", "amount": 5, "every": "1w"},
    ],
)
def test_bad_decays_are_refused(decay: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ScoringModel.model_validate(
            {"key": "m", "name": "m", "rules": [{"id": "r", "event": "E", "points": 1}], "decay": decay}
        )


@given(
    points=st.floats(min_value=-1000, max_value=1000).filter(lambda x: abs(x) > 0.01),
    thresholds=st.lists(st.integers(min_value=-900, max_value=900), max_size=5, unique=True),
    fixed=st.booleans(),
    hours=st.lists(st.integers(min_value=1, max_value=24 * 60), min_size=1, max_size=6),
)
def test_timers_announce_every_threshold_decay_passes_exactly_once(
    points: float, thresholds: list[int], fixed: bool, hours: list[int]
) -> None:
    """Firing the timer whenever it is due (at any later moment) and re-arming from the
    value then announces exactly the thresholds between the start and the final value."""
    decay = {"amount": 7, "every": "1d"} if fixed else {"half_life": "3d"}
    model = ScoringModel.model_validate(
        {"key": "m", "name": "m", "rules": [{"id": "r", "event": "E", "points": 1}], "decay": decay}
        | {"thresholds": thresholds}
    )
    score = Score(points, MONDAY)
    start = points
    due = next_decay_crossing(model, score, start)
    announced: list[float] = []
    t = MONDAY
    for h in hours:
        t += timedelta(hours=h)
        while due is not None and due <= t:
            value = value_at(score, model.decay, t)
            announced += [c.threshold for c in crossings_between(model, start, value)]
            start = value
            due = next_decay_crossing(model, score, start)
    final = value_at(score, model.decay, t)
    if due is not None:
        assert due > t
    assert announced == [c.threshold for c in crossings_between(model, points, start)]
    assert crossings_between(model, start, final) == ()


_NAMES = ["Product Viewed", "Page Viewed", "Email Unsubscribed", "Other"]
_TRAITS = st.fixed_dictionaries(
    {},
    optional={"title": st.sampled_from(["Director of Sales", "engineer", "", None]), "plan": st.just("pro")},
)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 72),
            st.sampled_from(_NAMES),
            st.sampled_from([{}, {"path": "/pricing"}, {"path": "/home"}]),
            _TRAITS,
        ),
        min_size=1,
        max_size=12,
    )
)
def test_may_change_is_false_only_where_apply_changes_nothing(
    steps: list[tuple[int, str, dict[str, Any], dict[str, Any]]],
) -> None:
    """The pipeline skips ``apply`` (and reading the score) when ``may_change`` says no:
    along any run of events, wherever it says no, ``apply`` returns ``(None, ())``; and it
    says yes wherever ``apply`` changes the score."""
    score: Score | None = None

    for h, name, props, traits in sorted(steps, key=lambda s: s[0]):
        at = T0 + timedelta(hours=h)
        awarded = score.awarded if score is not None else ()
        maybe = may_change(MODEL, awarded, event=name, properties=props, traits_after=traits)
        new, crossed = apply(MODEL, score, event=name, properties=props, traits_after=traits, now=at)
        if not maybe:
            assert (new, crossed) == (None, ())
        score = new or score


def test_may_change_follows_event_rules_filters_and_trait_rules() -> None:
    director = {"title": "Sales Director"}
    assert may_change(MODEL, (), event="Product Viewed", properties={}, traits_after={})
    assert may_change(MODEL, (), event="Page Viewed", properties={"path": "/pricing"}, traits_after={})
    assert not may_change(MODEL, (), event="Page Viewed", properties={"path": "/home"}, traits_after={})
    assert not may_change(MODEL, (), event="Other", properties={}, traits_after={})
    # a trait rule: holds and not given, given and no longer holds; as given, no change
    assert may_change(MODEL, (), event="Other", properties={}, traits_after=director)
    assert not may_change(MODEL, ("director",), event="Other", properties={}, traits_after=director)
    assert may_change(MODEL, ("director",), event="Other", properties={}, traits_after={"title": "cook"})
