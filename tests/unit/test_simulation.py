"""Time-travel simulation over event streams: pure, nothing stored or sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from whenthen.journeys import parse_definition
from whenthen.journeys.simulation import SimulationError, simulate

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "journeys"


def example(name: str) -> Any:
    return parse_definition(yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text()))


def kinds(report: dict[str, Any], person: str) -> list[tuple[str, str | None]]:
    return [(s["kind"], s["node"]) for s in report["people"][person]["timeline"]]


def test_abandoned_cart_simulation() -> None:
    events = [
        {
            "type": "identify",
            "userId": "ann",
            "traits": {"first_name": "Ann"},
            "timestamp": "2026-11-01T10:00:00Z",
        },
        {
            "type": "track",
            "userId": "ann",
            "event": "Product Added",
            "properties": {"cart_id": "c1", "product_name": "Tea"},
            "timestamp": "2026-11-01T10:01:00Z",
        },
        {
            "type": "track",
            "userId": "bob",
            "event": "Product Added",
            "properties": {"cart_id": "c9", "product_name": "Mug"},
            "timestamp": "2026-11-01T10:02:00Z",
        },
        {
            "type": "track",
            "userId": "bob",
            "event": "Order Completed",
            "properties": {"cart_id": "c9"},
            "timestamp": "2026-11-01T10:30:00Z",
        },
    ]
    report = simulate(example("abandoned-cart"), events)
    assert report["summary"] == {"completed": 1, "converted": 1, "emails": 2}
    ann = report["people"]["ann"]["timeline"]
    sends = [(s["at"], s["subject"]) for s in ann if s["kind"] == "would_send_email"]
    assert sends == [
        ("2026-11-01T11:01:00+00:00", "Ann, your Tea is waiting"),
        ("2026-11-02T11:01:00+00:00", "Last call: Tea"),
    ]
    assert report["people"]["bob"]["outcome"] == ["converted (goal: Order Completed)"]
    assert kinds(report, "bob") == [
        ("entered", "wait_for_checkout"),
        ("waiting", "wait_for_checkout"),
        ("converted", "wait_for_checkout"),
    ]


def test_anonymous_then_identified_is_one_person_and_clicks_count() -> None:
    d = example("ebook")
    events = [
        {
            "type": "track",
            "anonymousId": "a1",
            "event": "Form Submitted",
            "properties": {"form": "ebook"},
            "timestamp": "2026-11-01T09:00:00Z",
        },
        {
            "type": "identify",
            "anonymousId": "a1",
            "userId": "u1",
            "traits": {"email": "u1@example.com"},
            "timestamp": "2026-11-01T09:01:00Z",
        },
    ]
    report = simulate(d, events)
    assert list(report["people"]) == ["u1"]
    assert [s["subject"] for s in report["people"]["u1"]["timeline"] if s["kind"] == "would_send_email"] == [
        "Your ebook: the guide",
        "Did you get your ebook?",
    ]
    # With a click on the first message, no reminder.
    mid = report["people"]["u1"]["timeline"][1]["message_id"]
    clicked = [
        *events,
        {
            "type": "track",
            "userId": "u1",
            "event": "Email Link Clicked",
            "properties": {"message_id": mid, "url": "https://example.com/ebooks/guide.pdf"},
            "timestamp": "2026-11-02T09:00:00Z",
        },
    ]
    report = simulate(d, clicked)
    timeline = report["people"]["u1"]["timeline"]
    assert [s["kind"] for s in timeline if s["kind"].startswith("would_")] == [
        "would_send_email",
        "would_update_profile",
    ]


def test_welcome_series_until_cut_off() -> None:
    events = [{"type": "track", "userId": "u", "event": "Signed Up", "timestamp": "2026-11-01T08:00:00Z"}]
    report = simulate(example("welcome-series"), events, until=None)
    assert report["summary"]["emails"] == 3
    from datetime import UTC, datetime

    short = simulate(example("welcome-series"), events, until=datetime(2026, 11, 2, tzinfo=UTC))
    assert short["summary"]["emails"] == 1
    assert short["people"]["u"]["outcome"] == ["active"]


def test_trait_change_trigger_in_simulation() -> None:
    d = parse_definition(
        {
            "key": "moved",
            "name": "Moved",
            "trigger": {"kind": "trait_change", "trait": "address.city"},
            "start": "hello",
            "nodes": {
                "hello": {
                    "kind": "send_email",
                    "email": {"subject": "Welcome to {{ traits.address.city }}", "text": "x"},
                }
            },
        }
    )
    events = [
        {
            "type": "identify",
            "userId": "u",
            "traits": {"address": {"city": "Lyon"}},
            "timestamp": "2026-11-01T08:00:00Z",
        },
        {
            "type": "identify",
            "userId": "u",
            "traits": {"address": {"city": "Lyon"}},
            "timestamp": "2026-11-02T08:00:00Z",
        },
        {
            "type": "identify",
            "userId": "u",
            "traits": {"address": {"city": "Paris"}},
            "timestamp": "2026-11-03T08:00:00Z",
        },
    ]
    d2 = d.model_copy(update={"entry": d.entry.model_copy(update={"frequency": "every_time"})})
    report = simulate(d2, events)
    assert [s["subject"] for s in report["people"]["u"]["timeline"] if s["kind"] == "would_send_email"] == [
        "Welcome to Lyon",
        "Welcome to Paris",
    ]


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([{"type": "track", "userId": "u", "event": "E"}], "timestamp"),
        ([{"type": "track", "event": "E", "timestamp": "2026-01-01T00:00:00Z"}], "userId"),
        (["nope"], "not an object"),
    ],
)
def test_bad_input(events: list[Any], message: str) -> None:
    with pytest.raises(SimulationError, match=message):
        simulate(example("welcome-series"), events)


def test_no_events_no_people() -> None:
    assert simulate(example("welcome-series"), [])["people"] == {}
