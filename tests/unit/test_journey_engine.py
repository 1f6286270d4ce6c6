"""The pure journey engine: node handlers, goals, exits, and invariants (hypothesis)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.facts import MemoryFacts
from whenthen.journeys.definition import JourneyDefinition, parse_definition
from whenthen.journeys.engine import MAX_STEPS, advance, message_id_for, start
from whenthen.journeys.model import (
    CallWebhook,
    Cancel,
    ChangeList,
    EnrollElsewhere,
    EventFacts,
    EventSeen,
    SendEmail,
    State,
    Status,
    Transition,
    UpdateProfile,
    Wake,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def journey(nodes: dict[str, Any], start_at: str = "a", **extra: Any) -> JourneyDefinition:
    return parse_definition(
        {
            "key": "j",
            "name": "J",
            "trigger": {"kind": "event", "event": "Go"},
            "start": start_at,
            "nodes": nodes,
            **extra,
        }
    )


def ev(name: str, at: datetime = T0, **props: Any) -> EventFacts:
    return EventFacts(name=name, properties=props, timestamp=at)


EMAIL = {"subject": "Hi {{ traits.first_name }}", "text": "hello"}


def test_abandoned_cart_reminder_when_no_checkout() -> None:
    d = journey(
        {
            "a": {
                "kind": "wait_for_event",
                "event": "Order Completed",
                "correlate": "cart_id",
                "timeout": "1h",
                "on_event": None,
                "on_timeout": "remind",
            },
            "remind": {"kind": "send_email", "email": EMAIL},
        }
    )
    facts = MemoryFacts()
    t = start(d, "e1", trigger=ev("Product Added", cart_id="c1"), now=T0, facts=facts)
    assert t.state.status is Status.ACTIVE
    assert t.state.wake_at == T0 + timedelta(hours=1)
    assert t.effects == ()
    # An order of another cart does not count.
    t = advance(
        d,
        t.state,
        EventSeen(ev("Order Completed", T0 + timedelta(minutes=5), cart_id="c2")),
        now=T0 + timedelta(minutes=5),
        facts=facts,
    )
    assert t.state.node == "a"
    assert t.effects == ()
    # An early wake does nothing.
    t2 = advance(d, t.state, Wake(T0 + timedelta(minutes=30)), now=T0 + timedelta(minutes=30), facts=facts)
    assert t2.state == t.state
    t = advance(d, t.state, Wake(T0 + timedelta(hours=1)), now=T0 + timedelta(hours=1), facts=facts)
    assert t.state.status is Status.COMPLETED
    [send] = t.effects
    assert isinstance(send, SendEmail)
    assert send.idempotency_key == "e1:remind:2"
    assert send.message_id == message_id_for("e1:remind:2")
    assert t.state.context["last_message"] == message_id_for("e1:remind:2")


def test_a_waiting_enrollment_holds_no_empty_maps_and_gains_them_when_used() -> None:
    """A new enrollment's context has only what it was given (no empty maps of messages
    and split choices: the row of each of a million waiting people is shorter, with room
    for what a wake-up adds), and the maps appear with their first entry."""
    d = journey(
        {
            "a": {"kind": "delay", "duration": "1d", "next": "s"},
            "s": {"kind": "split", "variants": [{"name": "x", "weight": 1, "next": "m"}]},
            "m": {"kind": "send_email", "email": EMAIL},
        }
    )
    entered = start(d, "e1", trigger=None, now=T0, facts=MemoryFacts())
    assert entered.state.context == {}
    woke = T0 + timedelta(days=1)
    t = advance(d, entered.state, Wake(woke), now=woke, facts=MemoryFacts())
    [send] = t.effects
    assert isinstance(send, SendEmail)
    sent = send.message_id
    assert t.state.context == {"variants": {"s": "x"}, "messages": {"m": sent}, "last_message": sent}
    # A state stored before, with the empty maps, advances the same way.
    stored = dataclasses.replace(entered.state, context={"messages": {}, "variants": {}})
    assert advance(d, stored, Wake(woke), now=woke, facts=MemoryFacts()) == t


def test_abandoned_cart_no_reminder_after_checkout_of_same_cart() -> None:
    d = journey(
        {
            "a": {
                "kind": "wait_for_event",
                "event": "Order Completed",
                "correlate": "cart_id",
                "timeout": "1h",
                "on_event": None,
                "on_timeout": "remind",
            },
            "remind": {"kind": "send_email", "email": EMAIL},
        }
    )
    t = start(d, "e1", trigger=ev("Product Added", cart_id="c1"), now=T0, facts=MemoryFacts())
    t = advance(
        d,
        t.state,
        EventSeen(ev("Order Completed", cart_id="c1")),
        now=T0 + timedelta(minutes=5),
        facts=MemoryFacts(),
    )
    assert t.state.status is Status.COMPLETED
    assert t.effects == ()


def test_click_correlated_with_the_message_sent() -> None:
    d = journey(
        {
            "a": {"kind": "send_email", "email": EMAIL, "next": "w"},
            "w": {
                "kind": "wait_for_event",
                "event": "Email Link Clicked",
                "correlate": "message",
                "where": [{"path": "url", "op": "contains", "value": "rsvp"}],
                "timeout": "3d",
                "on_event": "attendees",
                "on_timeout": "reminder",
            },
            "attendees": {"kind": "add_to_list", "list": "attendees"},
            "reminder": {"kind": "send_email", "email": EMAIL},
        }
    )
    facts = MemoryFacts()
    t = start(d, "e", trigger=None, now=T0, facts=facts)
    mid = t.state.context["last_message"]
    # A click on another message or another link is not the awaited click.
    for other in (
        ev("Email Link Clicked", message_id="msg_x", url="https://x/rsvp"),
        ev("Email Link Clicked", message_id=mid, url="https://x/blog"),
    ):
        assert advance(d, t.state, EventSeen(other), now=T0, facts=facts).state == t.state
    t = advance(
        d,
        t.state,
        EventSeen(ev("Email Link Clicked", message_id=mid, url="https://x/rsvp?a=1")),
        now=T0,
        facts=facts,
    )
    assert [type(e) for e in t.effects] == [ChangeList]
    assert t.state.status is Status.COMPLETED


def test_goal_converts_from_any_node_within_window_only() -> None:
    d = journey(
        {"a": {"kind": "delay", "duration": "2d", "next": "b"}, "b": {"kind": "send_email", "email": EMAIL}},
        goal={"event": "Order Completed", "within": "7d"},
    )
    t = start(d, "e", trigger=None, now=T0, facts=MemoryFacts())
    late = advance(
        d,
        t.state,
        EventSeen(ev("Order Completed", T0 + timedelta(days=8))),
        now=T0 + timedelta(days=8),
        facts=MemoryFacts(),
    )
    assert late.state.status is Status.ACTIVE
    t = advance(
        d,
        t.state,
        EventSeen(ev("Order Completed", T0 + timedelta(days=1))),
        now=T0 + timedelta(days=1),
        facts=MemoryFacts(),
    )
    assert t.state.status is Status.CONVERTED
    assert t.state.wake_at is None


def test_exit_rules_and_unsubscribe() -> None:
    d = journey(
        {"a": {"kind": "delay", "duration": "1d"}},
        exit=[{"kind": "event", "event": "Account Closed"}, {"kind": "unsubscribed"}],
    )
    t = start(d, "e", trigger=None, now=T0, facts=MemoryFacts())
    for name in ("Account Closed", "Email Unsubscribed"):
        out = advance(d, t.state, EventSeen(ev(name)), now=T0, facts=MemoryFacts())
        assert out.state.status is Status.EXITED
        assert out.state.reason in ("exit rule: Account Closed", "unsubscribed")
    assert (
        advance(d, t.state, Cancel("journey archived"), now=T0, facts=MemoryFacts()).state.reason
        == "journey archived"
    )


def test_condition_split_on_traits_events_and_engagement() -> None:
    d = journey(
        {
            "a": {"kind": "send_email", "email": EMAIL, "next": "c"},
            "c": {
                "kind": "condition",
                "branches": [
                    {"when": {"engaged": "clicked", "node": "a"}, "next": "clicker"},
                    {
                        "when": {
                            "all": [
                                {"trait": "plan", "value": "pro"},
                                {"did": "Login", "within": "7d", "min_count": 2},
                            ]
                        },
                        "next": "pro",
                    },
                    {"when": {"not": {"trait": "city", "op": "exists"}}, "next": "nocity"},
                ],
                "else": "other",
            },
            "clicker": {"kind": "exit"},
            "pro": {"kind": "exit"},
            "nocity": {"kind": "exit"},
            "other": {"kind": "exit"},
        }
    )

    def route(facts: MemoryFacts) -> Any:
        t = start(d, "e", trigger=None, now=T0, facts=facts)
        return next(j.detail.get("branch") for j in t.journal if j.kind == "branched")

    logins = [ev("Login", T0 - timedelta(days=1)), ev("Login", T0 - timedelta(days=2))]
    assert route(MemoryFacts({"plan": "pro", "city": "Lyon"}, events=logins)) == 1
    assert route(MemoryFacts({"plan": "pro", "city": "Lyon"}, events=logins[:1])) == "else"
    assert route(MemoryFacts({"plan": "free"})) == 2
    mid = message_id_for("e:a:1")
    assert route(MemoryFacts({"city": "x"}, clicked={mid: ["https://a"]})) == 0


def test_split_is_deterministic_and_follows_weights() -> None:
    d = journey(
        {
            "a": {
                "kind": "split",
                "variants": [
                    {"name": "A", "weight": 1, "next": "x"},
                    {"name": "B", "weight": 3, "next": "x"},
                ],
                "holdout": 1,
            },
            "x": {"kind": "exit"},
        }
    )
    counts: dict[str, int] = {}
    for i in range(5000):
        t = start(d, f"e{i}", trigger=None, now=T0, facts=MemoryFacts())
        again = start(d, f"e{i}", trigger=None, now=T0, facts=MemoryFacts())
        assert t.state.context["variants"] == again.state.context["variants"]
        name = t.state.context["variants"]["a"]
        counts[name] = counts.get(name, 0) + 1
    assert abs(counts["control"] / 5000 - 0.2) < 0.03
    assert abs(counts["A"] / 5000 - 0.2) < 0.03
    assert abs(counts["B"] / 5000 - 0.6) < 0.03


def test_actions_emit_effects() -> None:
    d = journey(
        {
            "a": {
                "kind": "update_profile",
                "set": {"tier": "gold"},
                "unset": ["trial"],
                "add_tags": ["vip"],
                "next": "b",
            },
            "b": {
                "kind": "webhook",
                "url": "https://crm.example/hook",
                "body": {"x": 1},
                "map_response": {"crm_id": "id"},
                "next": "c",
            },
            "c": {"kind": "remove_from_list", "list": "prospects", "next": "d"},
            "d": {"kind": "jump", "journey": "onboarding"},
        }
    )
    t = start(d, "e", trigger=None, now=T0, facts=MemoryFacts())
    kinds = [type(e) for e in t.effects]
    assert kinds == [UpdateProfile, CallWebhook, ChangeList, EnrollElsewhere]
    assert t.state.status is Status.EXITED
    assert t.state.reason == "jumped to onboarding"


def test_delay_until_time_and_until_trait() -> None:
    d = journey({"a": {"kind": "delay", "until_time": "09:00", "weekdays": ["mon"], "next": None}})
    facts = MemoryFacts(tz="Asia/Shanghai")
    t = start(d, "e", trigger=None, now=T0, facts=facts)  # Wed 2026-11-25 20:00 in Shanghai
    assert t.state.wake_at == datetime(2026, 11, 30, 1, 0, tzinfo=UTC)  # Mon 09:00 +08:00
    d2 = journey({"a": {"kind": "delay", "until_trait": "contract_end", "offset": "-7d", "next": None}})
    t = start(
        d2, "e", trigger=None, now=T0, facts=MemoryFacts({"contract_end": "2027-01-31"}, tz="Europe/Paris")
    )
    assert t.state.wake_at == datetime(2027, 1, 23, 23, 0, tzinfo=UTC)  # 24 Jan 00:00 in Paris
    # A date already past, or no date at all: go on at once.
    assert (
        start(d2, "e", trigger=None, now=T0, facts=MemoryFacts({"contract_end": "2020-01-01"})).state.status
        is Status.COMPLETED
    )
    t = start(d2, "e", trigger=None, now=T0, facts=MemoryFacts())
    assert t.state.status is Status.COMPLETED
    assert any(j.kind == "skipped" for j in t.journal)


def test_zero_delay_loop_hits_the_step_guard() -> None:
    d = journey(
        {"a": {"kind": "delay", "duration": "0s", "next": "b"}, "b": {"kind": "update_profile", "next": "a"}}
    )
    t = start(d, "e", trigger=None, now=T0, facts=MemoryFacts())
    assert t.state.status is Status.FAILED
    assert t.state.reason is not None
    assert str(MAX_STEPS) in t.state.reason


# ---- invariants ---------------------------------------------------------------------

NODE_IDS = ["n0", "n1", "n2", "n3", "n4"]


@st.composite
def random_journeys(draw: st.DrawFn) -> JourneyDefinition:
    nodes: dict[str, Any] = {}
    targets = st.sampled_from([*NODE_IDS, None])
    for nid in NODE_IDS:
        kind = draw(st.sampled_from(["delay", "wait", "cond", "split", "send", "update", "exit"]))
        if kind == "delay":
            nodes[nid] = {
                "kind": "delay",
                "duration": draw(st.sampled_from(["0s", "1m", "1h", "1d"])),
                "next": draw(targets),
            }
        elif kind == "wait":
            nodes[nid] = {
                "kind": "wait_for_event",
                "event": draw(st.sampled_from(["A", "B"])),
                "timeout": "2h",
                "on_event": draw(targets),
                "on_timeout": draw(targets),
            }
        elif kind == "cond":
            nodes[nid] = {
                "kind": "condition",
                "branches": [{"when": {"trait": "x", "op": "gt", "value": 0}, "next": draw(targets)}],
                "else": draw(targets),
            }
        elif kind == "split":
            nodes[nid] = {
                "kind": "split",
                "variants": [
                    {"name": "a", "weight": 1, "next": draw(targets)},
                    {"name": "b", "weight": 1, "next": draw(targets)},
                ],
            }
        elif kind == "send":
            nodes[nid] = {"kind": "send_email", "email": EMAIL, "next": draw(targets)}
        elif kind == "update":
            nodes[nid] = {"kind": "update_profile", "next": draw(targets)}
        else:
            nodes[nid] = {"kind": "exit"}
    goal = draw(st.sampled_from([None, {"event": "G", "within": "1d"}]))
    # Build without graph checks: the engine must cope with loops and unreachable nodes too.
    return JourneyDefinition.model_validate(
        {
            "key": "h",
            "name": "H",
            "trigger": {"kind": "api"},
            "start": "n0",
            "nodes": nodes,
            "goal": goal,
            "exit": [{"kind": "event", "event": "X"}],
        }
    )


stimuli = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3 * 3600),
        st.one_of(st.just("wake"), st.sampled_from(["A", "B", "G", "X", "other"])),
    ),
    max_size=15,
)


@settings(max_examples=300, deadline=None)
@given(random_journeys(), stimuli, st.integers(min_value=-5, max_value=5))
def test_engine_invariants(d: JourneyDefinition, steps: list[tuple[int, str]], x: int) -> None:
    facts = MemoryFacts({"x": x})
    now = T0
    t = start(d, "enr", trigger=None, now=now, facts=facts)
    keys: set[str] = set()
    history: list[Transition] = [t]
    for delta, what in steps:
        now = now + timedelta(seconds=delta)
        stimulus = Wake(now) if what == "wake" else EventSeen(ev(what, now))
        before: State = t.state
        if what == "wake" and before.wake_at is not None and before.wake_at > now:
            stimulus = Wake(before.wake_at)
            now = before.wake_at
        t = advance(d, before, stimulus, now=now, facts=facts)
        history.append(t)
        if before.status.ended:
            # Ended is absorbing.
            assert t.state == before
            assert t.effects == ()
    for tr in history:
        # Every scheduled wake lies strictly in the future of the step that scheduled it.
        if tr.state.status is Status.ACTIVE:
            assert tr.state.wake_at is not None
        else:
            assert tr.state.wake_at is None
            assert tr.state.node is None
        for e in tr.effects:
            if isinstance(e, SendEmail | CallWebhook):
                assert e.idempotency_key not in keys  # at most one send per key
                keys.add(e.idempotency_key)
            if isinstance(e, SendEmail | CallWebhook):
                # The message it queues is named by its key, whatever the path.
                assert e.message_id == message_id_for(e.idempotency_key)
        waits = [j for j in tr.journal if j.kind == "waiting"]
        for w in waits:
            assert datetime.fromisoformat(w.detail["until"]) > w.at


def test_parse_errors_name_node_field_and_reason() -> None:
    from whenthen.journeys.definition import InvalidDefinition

    with pytest.raises(InvalidDefinition) as info:
        journey(
            {
                "a": {"kind": "delay", "duration": "soon", "next": "zz"},
                "b": {"kind": "send_email", "email": {"subject": "s"}},
            }
        )
    problems = {(p.node, p.reason.split(":")[0]) for p in info.value.problems}
    assert ("a", "Value error, 'soon' is not a duration (use '30m', '2d', '1w' or ISO 8601 like 'PT1H')") in {
        (p.node, p.reason) for p in info.value.problems
    }
    assert any(p.node == "b" and p.field == "email" for p in info.value.problems), problems


def test_a_definition_says_whether_events_move_it_and_whether_it_reads_history() -> None:
    from whenthen.journeys.definition import parse_definition, reacts_to_events, reads_history

    base: dict[str, object] = {
        "key": "k",
        "name": "n",
        "trigger": {"kind": "event", "event": "Ping"},
        "start": "mail",
        "nodes": {"mail": {"kind": "send_email", "email": {"subject": "s", "text": "."}}},
    }
    plain = parse_definition(base)
    assert not reacts_to_events(plain)
    assert not reads_history(plain)
    with_goal = parse_definition({**base, "goal": {"event": "Order Completed"}})
    assert reacts_to_events(with_goal)
    with_exit = parse_definition({**base, "exit": [{"kind": "unsubscribed"}]})
    assert reacts_to_events(with_exit)
    waiting = parse_definition(
        {
            **base,
            "start": "wait",
            "nodes": {
                "wait": {"kind": "wait_for_event", "event": "Clicked", "timeout": "1d", "on_timeout": "mail"},
                "mail": {"kind": "send_email", "email": {"subject": "s", "text": "."}},
            },
        }
    )
    assert reacts_to_events(waiting)
    assert not reads_history(waiting)
    traits_only = parse_definition({**base, "entry": {"condition": {"trait": "plan", "value": "pro"}}})
    assert not reads_history(traits_only)
    nested = parse_definition(
        {**base, "entry": {"condition": {"all": [{"trait": "plan"}, {"not": {"did": "Order Completed"}}]}}}
    )
    assert reads_history(nested)
    branch = parse_definition(
        {
            **base,
            "start": "check",
            "nodes": {
                "check": {
                    "kind": "condition",
                    "branches": [{"when": {"engaged": "opened"}, "next": "mail"}],
                    "else": None,
                },
                "mail": {"kind": "send_email", "email": {"subject": "s", "text": "."}},
            },
        }
    )
    assert reads_history(branch)
    assert not reacts_to_events(branch)
