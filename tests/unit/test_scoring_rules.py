"""Scoring rules, lazy decay, caps, trait rules, thresholds and stage rules. Pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from whenthen.scoring.model import Lifecycle, Score, ScoringModel, apply, next_stage, value_at

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
