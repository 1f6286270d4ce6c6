"""The journey engine: a pure function from (definition, state, stimulus) to a transition.

``start`` enters a person; ``advance`` applies a stimulus (a timer falling due, an event
seen, a cancellation). Nodes run one after another until one waits (delay, wait for
event) or the path ends. Effects (send, call, update, list change, jump) are returned as
data; the runner persists the new state and the effects in one transaction and a
dispatcher performs them after the commit. There is one small handler per node kind in
``_HANDLERS``.

Invariants (tested with hypothesis in tests/unit/test_journey_engine.py):
* an ended state is absorbing: advancing it changes nothing and emits nothing;
* every scheduled wake is strictly in the future;
* each advance terminates within ``MAX_STEPS`` node executions, else the enrollment
  fails (dead letter) with the reason and none of that advance's effects happen;
* effect idempotency keys are unique per enrollment (enrollment, node, step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from whenthen.journeys.calendar import next_local_time, trait_instant
from whenthen.journeys.definition import (
    ConditionNode,
    DelayNode,
    ExitNode,
    ExitOnEvent,
    JourneyDefinition,
    JumpNode,
    ListNode,
    SendEmailNode,
    SplitNode,
    UpdateProfileNode,
    WaitForEventNode,
    WebhookNode,
)
from whenthen.journeys.matching import event_matches, event_value, holds
from whenthen.journeys.model import (
    CallWebhook,
    Cancel,
    ChangeList,
    Effect,
    EnrollElsewhere,
    EventFacts,
    EventSeen,
    Facts,
    JournalEntry,
    SendEmail,
    State,
    Status,
    Stimulus,
    Transition,
    UpdateProfile,
    Wake,
)
from whenthen.kernel.bucketing import stable_bucket
from whenthen.kernel.durations import parse_duration
from whenthen.kernel.filters import lookup_path

MAX_STEPS = 100
UNSUBSCRIBE_EVENTS = ("Email Unsubscribed", "Unsubscribed")


def message_id_for(idempotency_key: str) -> str:
    """The id of the message an effect sends: derived, so a retry names the same message."""
    return "msg_" + hashlib.sha256(idempotency_key.encode("utf-8")).hexdigest()[:24]


@dataclass
class _Run:
    definition: JourneyDefinition
    state: State
    now: datetime
    facts: Facts
    effects: list[Effect] = field(default_factory=list)
    journal: list[JournalEntry] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def note(self, kind: str, node: str | None, **detail: Any) -> None:
        self.journal.append(JournalEntry(at=self.now, kind=kind, node=node, detail=detail))

    def key(self, node: str) -> str:
        return f"{self.state.enrollment_id}:{node}:{self.state.steps}"

    def messages(self) -> dict[str, str]:
        return dict(self.context.get("messages", {}))

    def end(self, status: Status, node: str | None, reason: str | None) -> None:
        s = self.state
        self.state = State(s.enrollment_id, status, None, None, s.entered_at, s.steps, s.context, reason)
        self.note(status.value, node, **({"reason": reason} if reason else {}))

    def transition(self) -> Transition:
        s = self.state
        final = State(
            s.enrollment_id, s.status, s.node, s.wake_at, s.entered_at, s.steps, self.context, s.reason
        )
        return Transition(state=final, effects=tuple(self.effects), journal=tuple(self.journal))


# States are made positionally (``State``'s field order) rather than with
# ``dataclasses.replace``, which costs twice as much on every step of every advance.

# A handler runs a node and says where to go: ("next", node id or None), ("wait", wake_at),
# or ("end", None) when it ended the enrollment itself.
Outcome = tuple[str, Any]
Handler = Callable[[_Run, str, Any], Outcome]


def _delay(run: _Run, node_id: str, node: DelayNode) -> Outcome:
    if node.duration is not None:
        wake = run.now + parse_duration(node.duration)
    elif node.until_time is not None:
        wake = next_local_time(
            run.now, run.facts.timezone(), node.until_time, list(node.weekdays or []) or None
        )
    else:
        assert node.until_trait is not None
        value = lookup_path(run.facts.traits(), node.until_trait)
        instant = trait_instant(value, run.facts.timezone(), parse_duration(node.offset), None)
        if instant is None:
            run.note("skipped", node_id, reason=f"trait {node.until_trait} is not a date")
            return ("next", node.next)
        wake = instant
    if wake <= run.now:
        return ("next", node.next)
    return ("wait", wake)


def _wait_for_event(run: _Run, node_id: str, node: WaitForEventNode) -> Outcome:
    return ("wait", run.now + parse_duration(node.timeout))


def _condition(run: _Run, node_id: str, node: ConditionNode) -> Outcome:
    for i, branch in enumerate(node.branches):
        if holds(branch.when, run.facts, now=run.now, messages=run.messages()):
            run.note("branched", node_id, branch=i)
            return ("next", branch.next)
    run.note("branched", node_id, branch="else")
    return ("next", node.else_)


def _split(run: _Run, node_id: str, node: SplitNode) -> Outcome:
    total = sum(v.weight for v in node.variants) + node.holdout
    point = stable_bucket((run.state.enrollment_id, node_id), 1_000_000) / 1_000_000 * total
    variants = dict(run.context.get("variants", {}))
    if point < node.holdout:
        variants[node_id] = "control"
        run.context["variants"] = variants
        run.end(Status.EXITED, node_id, "holdout")
        return ("end", None)
    point -= node.holdout
    chosen = node.variants[-1]
    for v in node.variants:
        if point < v.weight:
            chosen = v
            break
        point -= v.weight
    variants[node_id] = chosen.name
    run.context["variants"] = variants
    run.note("branched", node_id, variant=chosen.name)
    return ("next", chosen.next)


def _send_email(run: _Run, node_id: str, node: SendEmailNode) -> Outcome:
    key = run.key(node_id)
    message_id = message_id_for(key)
    run.effects.append(
        SendEmail(
            node=node_id,
            idempotency_key=key,
            email=node.email,
            marketing=node.marketing,
            message_id=message_id,
        )
    )
    messages = run.messages()
    messages[node_id] = message_id
    run.context["messages"] = messages
    run.context["last_message"] = message_id
    run.note("send_email", node_id, message_id=message_id)
    return ("next", node.next)


def _webhook(run: _Run, node_id: str, node: WebhookNode) -> Outcome:
    key = run.key(node_id)
    run.effects.append(
        CallWebhook(
            node=node_id,
            idempotency_key=key,
            url=node.url,
            body=node.body,
            headers=node.headers,
            map_response=node.map_response,
            message_id=message_id_for(key),
        )
    )
    run.note("webhook", node_id, idempotency_key=key)
    return ("next", node.next)


def _update_profile(run: _Run, node_id: str, node: UpdateProfileNode) -> Outcome:
    run.effects.append(
        UpdateProfile(
            node=node_id,
            set=node.set,
            unset=tuple(node.unset),
            add_tags=tuple(node.add_tags),
            remove_tags=tuple(node.remove_tags),
            stage=node.stage,
        )
    )
    run.note("update_profile", node_id)
    return ("next", node.next)


def _list(run: _Run, node_id: str, node: ListNode) -> Outcome:
    run.effects.append(ChangeList(node=node_id, list_key=node.list, add=node.kind == "add_to_list"))
    run.note(node.kind, node_id, list=node.list)
    return ("next", node.next)


def _jump(run: _Run, node_id: str, node: JumpNode) -> Outcome:
    run.effects.append(EnrollElsewhere(node=node_id, journey_key=node.journey))
    run.end(Status.EXITED, node_id, f"jumped to {node.journey}")
    return ("end", None)


def _exit(run: _Run, node_id: str, node: ExitNode) -> Outcome:
    run.end(Status.EXITED, node_id, "exit node")
    return ("end", None)


_HANDLERS: dict[type, Handler] = {
    DelayNode: _delay,
    WaitForEventNode: _wait_for_event,
    ConditionNode: _condition,
    SplitNode: _split,
    SendEmailNode: _send_email,
    WebhookNode: _webhook,
    UpdateProfileNode: _update_profile,
    ListNode: _list,
    JumpNode: _jump,
    ExitNode: _exit,
}


def _go(run: _Run, target: str | None) -> Transition:
    """Run nodes from ``target`` until one waits or the path ends."""
    executed = 0
    current = target
    journal_mark = len(run.journal)
    while True:
        if current is None:
            run.end(Status.COMPLETED, None, None)
            return run.transition()
        if executed >= MAX_STEPS:
            # A runaway advance performs nothing: its effects (which a loop through a
            # send would multiply) and the journal of the nodes it ran are dropped.
            run.effects.clear()
            del run.journal[journal_mark:]
            run.end(Status.FAILED, current, f"more than {MAX_STEPS} steps in one advance (a loop?)")
            return run.transition()
        node = run.definition.nodes[current]
        s = run.state
        run.state = State(
            s.enrollment_id, s.status, current, None, s.entered_at, s.steps + 1, s.context, s.reason
        )
        executed += 1
        outcome, value = _HANDLERS[type(node)](run, current, node)
        if outcome == "end":
            return run.transition()
        if outcome == "wait":
            assert isinstance(value, datetime)
            assert value > run.now
            s = run.state
            run.state = State(
                s.enrollment_id, Status.ACTIVE, current, value, s.entered_at, s.steps, s.context, s.reason
            )
            run.note("waiting", current, until=value.isoformat())
            return run.transition()
        current = value


def start(
    definition: JourneyDefinition,
    enrollment_id: str,
    *,
    trigger: EventFacts | None,
    payload: Mapping[str, Any] | None = None,
    now: datetime,
    facts: Facts,
) -> Transition:
    """Enter a person at the start node."""
    # The maps of sent messages and split choices appear with their first entry: a
    # waiting enrollment's row is ~27 bytes shorter (a million wait at once), and has
    # that room when a wake-up adds them (ADR 0018's note on page splits).
    context: dict[str, Any] = {}
    if trigger is not None:
        context["trigger"] = {"event": trigger.name, "properties": dict(trigger.properties)}
    if payload:
        context["payload"] = dict(payload)
    state = State(
        enrollment_id=enrollment_id,
        status=Status.ACTIVE,
        node=definition.start,
        wake_at=None,
        entered_at=now,
        steps=0,
        context=context,
    )
    run = _Run(definition, state, now, facts, context=context)
    run.note("entered", definition.start)
    return _go(run, definition.start)


def advance(
    definition: JourneyDefinition, state: State, stimulus: Stimulus, *, now: datetime, facts: Facts
) -> Transition:
    """Apply one stimulus. A stimulus that does not concern the enrollment changes nothing."""
    if state.status.ended:
        return Transition(state=state, effects=(), journal=())
    run = _Run(definition, state, now, facts, context=dict(state.context))
    if isinstance(stimulus, Cancel):
        run.end(Status.EXITED, state.node, stimulus.reason)
        return run.transition()
    if isinstance(stimulus, Wake):
        return _on_wake(run, stimulus)
    return _on_event(run, stimulus)


def _on_wake(run: _Run, stimulus: Wake) -> Transition:
    state = run.state
    if state.wake_at is None or state.node is None or stimulus.at < state.wake_at or run.now < state.wake_at:
        # Early or stale (already handled) wake: nothing to do.
        return Transition(state=state, effects=(), journal=())
    node = run.definition.nodes[state.node]
    if isinstance(node, DelayNode):
        run.note("waited", state.node)
        return _go(run, node.next)
    if isinstance(node, WaitForEventNode):
        run.note("timed_out", state.node)
        return _go(run, node.on_timeout)
    return Transition(state=state, effects=(), journal=())


def _correlates(run: _Run, event: EventFacts, correlate: str | None) -> bool:
    if not correlate:
        return True
    if correlate == "message":
        last = run.context.get("last_message")
        return last is not None and event_value(event, "message_id") == last
    trigger = run.context.get("trigger") or {}
    expected = lookup_path(trigger.get("properties") or {}, correlate.removeprefix("properties."))
    actual = event_value(event, correlate)
    return expected == actual and actual is not None


def _on_event(run: _Run, stimulus: EventSeen) -> Transition:
    event = stimulus.event
    d = run.definition
    for rule in d.exit:
        if isinstance(rule, ExitOnEvent):
            if event_matches(event, rule.event, rule.where) and _correlates(run, event, rule.correlate):
                run.end(Status.EXITED, run.state.node, f"exit rule: {rule.event}")
                return run.transition()
        elif event.name in UNSUBSCRIBE_EVENTS:
            run.end(Status.EXITED, run.state.node, "unsubscribed")
            return run.transition()
    goal = d.goal
    if (
        goal is not None
        and event_matches(event, goal.event, goal.where)
        and event.timestamp - run.state.entered_at <= parse_duration(goal.within)
        and event.timestamp >= run.state.entered_at - timedelta(seconds=1)
        and _correlates(run, event, goal.correlate)
    ):
        run.end(Status.CONVERTED, run.state.node, f"goal: {goal.event}")
        return run.transition()
    if run.state.node is None:
        return Transition(state=run.state, effects=(), journal=())
    node = d.nodes[run.state.node]
    if (
        isinstance(node, WaitForEventNode)
        and event_matches(event, node.event, node.where)
        and _correlates(run, event, node.correlate)
    ):
        run.note("event_received", run.state.node, event=event.name)
        return _go(run, node.on_event)
    return Transition(state=run.state, effects=(), journal=())
