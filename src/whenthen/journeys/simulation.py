"""Time-travel simulation: run a definition over a stream of events with a virtual clock
and say, per person, what would have happened and when. Pure: nothing is stored or sent.

People are keyed by ``userId`` (or ``anonymousId`` until an identify links the two).
Traits come from the stream's identify calls; conditions on past events and engagement
see the stream's events up to the moment they are evaluated. Timers fire in time order
between events; after the last event the clock runs on to ``until`` (by default the
last event plus 30 days) so pending delays and timeouts play out.

Event, trait-change and date triggers are simulated; a signal or API trigger enters
everyone who appears in the stream at their first event (a backtest of "what if we had
sent this to them").
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from whenthen.journeys.calendar import next_anniversary, trait_instant
from whenthen.journeys.definition import (
    DateTrigger,
    EventTrigger,
    Frequency,
    JourneyDefinition,
    TraitChangeTrigger,
)
from whenthen.journeys.engine import advance, start
from whenthen.journeys.matching import event_matches, holds
from whenthen.journeys.model import (
    CallWebhook,
    ChangeList,
    EnrollElsewhere,
    EventFacts,
    EventSeen,
    SendEmail,
    State,
    Transition,
    UpdateProfile,
    Wake,
)
from whenthen.kernel.durations import parse_duration
from whenthen.kernel.filters import MISSING as _MISSING
from whenthen.kernel.filters import Filter, lookup_path
from whenthen.templates import TemplateError, render

HORIZON = timedelta(days=30)
_EFFECT_KINDS = {"send_email", "webhook", "update_profile", "add_to_list", "remove_from_list"}


class SimulationError(ValueError):
    """The events given cannot be simulated; the message says which and why."""


@dataclass
class _Person:
    key: str
    traits: dict[str, Any] = field(default_factory=dict)
    history: list[EventFacts] = field(default_factory=list)
    enrollments: list[State] = field(default_factory=list)
    entries: list[tuple[datetime, str | None]] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    date_due: datetime | None = None

    def timezone(self) -> str | None:
        tz = self.traits.get("timezone")
        return tz if isinstance(tz, str) else None


class _Facts:
    def __init__(self, person: _Person, now: datetime) -> None:
        self.person = person
        self.now = now

    def traits(self) -> Mapping[str, Any]:
        return self.person.traits

    def timezone(self) -> str | None:
        return self.person.timezone()

    def count_events(self, name: str, where: tuple[Filter, ...], since: datetime | None) -> int:
        return sum(
            1
            for e in self.person.history
            if e.timestamp <= self.now
            and (since is None or e.timestamp >= since)
            and event_matches(e, name, where)
        )

    def engaged(self, kind: str, message_ids: tuple[str, ...], link: str | None) -> bool:
        name = "Email Opened" if kind == "opened" else "Email Link Clicked"
        return any(
            e.name == name
            and e.properties.get("message_id") in message_ids
            and (link is None or link in str(e.properties.get("url", "")))
            for e in self.person.history
            if e.timestamp <= self.now
        )


def _event_context(state: State) -> dict[str, Any]:
    trigger = dict(state.context.get("trigger") or {})
    if "event" in trigger:
        trigger.setdefault("name", trigger["event"])  # as templates see it when sending
    return trigger


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Input:
    at: datetime
    order: int
    raw: Mapping[str, Any]


def _inputs(events: Iterable[Mapping[str, Any]]) -> list[_Input]:
    out = []
    for i, raw in enumerate(events):
        if not isinstance(raw, Mapping):
            raise SimulationError(f"event {i} is not an object")
        at = _parse_time(raw.get("timestamp"))
        if at is None:
            raise SimulationError(f"event {i} has no valid timestamp")
        if not (raw.get("userId") or raw.get("anonymousId")):
            raise SimulationError(f"event {i} has neither userId nor anonymousId")
        out.append(_Input(at, i, raw))
    return sorted(out, key=lambda e: (e.at, e.order))


class Simulator:
    def __init__(self, definition: JourneyDefinition) -> None:
        self.d = definition
        self.people: dict[str, _Person] = {}
        self.aliases: dict[str, str] = {}
        self.timers: list[tuple[datetime, int]] = []  # (due, seq); seq -> (person, enrollment index)
        self.timer_refs: dict[int, tuple[_Person, int]] = {}
        self.seq = itertools.count()

    def _person(self, raw: Mapping[str, Any]) -> _Person:
        user = raw.get("userId")
        anon = raw.get("anonymousId")
        user = str(user) if user not in (None, "") else None
        anon = str(anon) if anon not in (None, "") else None
        if user and anon and anon in self.people and anon not in self.aliases and user not in self.people:
            # The anonymous visitor becomes known: same person.
            person = self.people.pop(anon)
            person.key = user
            self.people[user] = person
            self.aliases[anon] = user
        key = user or self.aliases.get(anon or "", anon)
        assert key is not None
        if user and anon:
            self.aliases.setdefault(anon, user)
        return self.people.setdefault(key, _Person(key))

    def _note(self, person: _Person, at: datetime, kind: str, node: str | None, **detail: Any) -> None:
        person.timeline.append({"at": at.isoformat(), "kind": kind, "node": node, **detail})

    def _apply(self, person: _Person, index: int, t: Transition, at: datetime) -> None:
        person.enrollments[index] = t.state
        effects = list(t.effects)
        for j in t.journal:
            if j.kind in _EFFECT_KINDS and effects:
                self._describe(person, effects.pop(0), t.state, j.at)
                continue
            self._note(person, j.at, j.kind, j.node, **dict(j.detail))
        for effect in effects:  # a jump ends the journey before its journal entry
            self._describe(person, effect, t.state, at)
        if t.state.wake_at is not None and not t.state.status.ended:
            seq = next(self.seq)
            self.timer_refs[seq] = (person, index)
            heapq.heappush(self.timers, (t.state.wake_at, seq))

    def _describe(self, person: _Person, effect: Any, state: State, at: datetime) -> None:
        if isinstance(effect, SendEmail):
            self._note(
                person,
                at,
                "would_send_email",
                effect.node,
                subject=self._subject(effect, person, state),
                message_id=effect.message_id,
            )
        elif isinstance(effect, CallWebhook):
            self._note(person, at, "would_call_webhook", effect.node, url=effect.url)
        elif isinstance(effect, UpdateProfile):
            person.traits.update(effect.set)
            for k in effect.unset:
                person.traits.pop(k, None)
            self._note(
                person,
                at,
                "would_update_profile",
                effect.node,
                set=dict(effect.set),
                unset=list(effect.unset),
                add_tags=list(effect.add_tags),
                remove_tags=list(effect.remove_tags),
            )
        elif isinstance(effect, ChangeList):
            kind = "would_add_to_list" if effect.add else "would_remove_from_list"
            self._note(person, at, kind, effect.node, list=effect.list_key)
        elif isinstance(effect, EnrollElsewhere):
            self._note(person, at, "would_enter_journey", effect.node, journey=effect.journey_key)

    def _subject(self, effect: SendEmail, person: _Person, state: State) -> str:
        context = {
            "traits": person.traits,
            "event": _event_context(state),
            "payload": state.context.get("payload") or {},
            "journey": {"key": self.d.key, "name": self.d.name},
        }
        try:
            return render(effect.email.subject, context)
        except TemplateError as exc:
            return f"(template error: {exc})"

    def _may_enter(self, person: _Person, entry_key: Any, at: datetime) -> bool:
        e = self.d.entry
        if e.frequency is Frequency.ONCE and person.entries:
            return False
        if e.frequency is Frequency.ONCE_PER_KEY and (
            entry_key is None or any(k == str(entry_key) for _, k in person.entries)
        ):
            return False
        if e.frequency is Frequency.COOLDOWN and person.entries:
            assert e.cooldown is not None
            if any(not s.status.ended for s in person.enrollments):
                return False
            if at - max(t for t, _ in person.entries) < parse_duration(e.cooldown):
                return False
        return True

    def _enter(self, person: _Person, trigger: EventFacts | None, at: datetime) -> None:
        key = self.d.entry.key
        entry_key: Any = None
        if key and trigger is not None:
            entry_key = lookup_path({"properties": trigger.properties}, key)
            if entry_key is _MISSING:
                entry_key = lookup_path(trigger.properties, key)
            entry_key = None if entry_key is _MISSING else entry_key
        if not self._may_enter(person, entry_key, at):
            return
        facts = _Facts(person, at)
        if self.d.entry.condition is not None and not holds(
            self.d.entry.condition, facts, now=at, messages={}
        ):
            self._note(person, at, "not_entered", None, reason="entry condition is false")
            return
        person.entries.append((at, None if entry_key is None else str(entry_key)))
        enrollment_id = f"sim:{person.key}:{len(person.enrollments)}"
        t = start(self.d, enrollment_id, trigger=trigger, now=at, facts=facts)
        person.enrollments.append(t.state)
        self._apply(person, len(person.enrollments) - 1, t, at)

    def _fire_until(self, until: datetime) -> None:
        while self.timers and self.timers[0][0] <= until:
            due, seq = heapq.heappop(self.timers)
            person, index = self.timer_refs.pop(seq)
            state = person.enrollments[index]
            if state.status.ended or state.wake_at != due:
                continue
            t = advance(self.d, state, Wake(due), now=due, facts=_Facts(person, due))
            self._apply(person, index, t, due)
        for person in self.people.values():
            if person.date_due is not None and person.date_due <= until:
                due = person.date_due
                person.date_due = None
                self._enter(person, EventFacts(name="Date Reached", properties={}, timestamp=due), due)

    def _date_due(self, person: _Person, now: datetime) -> datetime | None:
        trigger = self.d.trigger
        assert isinstance(trigger, DateTrigger)
        value = lookup_path(person.traits, trigger.trait)
        if value is _MISSING:
            return None
        offset = parse_duration(trigger.offset)
        if trigger.annual:
            return next_anniversary(value, person.timezone(), offset, trigger.at, now)
        due = trait_instant(value, person.timezone(), offset, trigger.at)
        return due if due is not None and due > now else None

    def run(self, events: Iterable[Mapping[str, Any]], *, until: datetime | None = None) -> dict[str, Any]:
        inputs = _inputs(events)
        trigger = self.d.trigger
        for item in inputs:
            self._fire_until(item.at)
            raw = item.raw
            person = self._person(raw)
            before = dict(person.traits)
            kind = str(raw.get("type") or ("track" if raw.get("event") else "identify"))
            if kind == "identify" and isinstance(raw.get("traits"), Mapping):
                person.traits.update(raw["traits"])
            name = str(raw.get("event") or raw.get("name") or kind)
            props = raw.get("properties") if isinstance(raw.get("properties"), Mapping) else None
            facts_event = EventFacts(
                name=name,
                properties=dict(props or raw.get("traits") or {}),
                timestamp=item.at,
                message_id=str(raw.get("messageId") or ""),
            )
            person.history.append(facts_event)
            for index, state in enumerate(list(person.enrollments)):
                if not state.status.ended:
                    t = advance(
                        self.d, state, EventSeen(facts_event), now=item.at, facts=_Facts(person, item.at)
                    )
                    if t.state != state or t.journal:
                        self._apply(person, index, t, item.at)
            if isinstance(trigger, EventTrigger):
                if event_matches(facts_event, trigger.event, trigger.where):
                    self._enter(person, facts_event, item.at)
            elif isinstance(trigger, TraitChangeTrigger):
                old, new = lookup_path(before, trigger.trait), lookup_path(person.traits, trigger.trait)
                if new is not _MISSING and old != new and (trigger.to is None or new == trigger.to):
                    change = EventFacts(
                        name="Trait Changed",
                        properties={
                            "trait": trigger.trait,
                            "from": None if old is _MISSING else old,
                            "to": new,
                        },
                        timestamp=item.at,
                    )
                    self._enter(person, change, item.at)
            elif isinstance(trigger, DateTrigger):
                if lookup_path(before, trigger.trait) != lookup_path(person.traits, trigger.trait):
                    person.date_due = self._date_due(person, item.at)
            elif not person.entries:
                self._enter(person, facts_event, item.at)
        if until is None and not inputs:
            return self.report(None)
        end = until or inputs[-1].at + HORIZON
        self._fire_until(end)
        return self.report(end)

    def report(self, end: datetime | None) -> dict[str, Any]:
        people = {}
        summary: dict[str, int] = {}
        for key, person in sorted(self.people.items()):
            if not person.timeline:
                continue
            people[key] = {
                "timeline": person.timeline,
                "outcome": [
                    s.status.value + (f" ({s.reason})" if s.reason else "") for s in person.enrollments
                ],
            }
            for s in person.enrollments:
                summary[s.status.value] = summary.get(s.status.value, 0) + 1
            for entry in person.timeline:
                if entry["kind"].startswith("would_send"):
                    summary["emails"] = summary.get("emails", 0) + 1
        until = end.isoformat() if end else None
        return {"journey": self.d.key, "until": until, "summary": summary, "people": people}


def simulate(
    definition: JourneyDefinition, events: Iterable[Mapping[str, Any]], *, until: datetime | None = None
) -> dict[str, Any]:
    return Simulator(definition).run(events, until=until)


def backtest_events(stored: Iterable[Any]) -> list[dict[str, Any]]:
    """Stored events as simulation input, one person per profile (merges already applied)."""
    out = []
    for e in stored:
        call = {k: v for k, v in e.payload.items() if k not in ("anonymousId", "userId")}
        call["userId"] = e.profile_id
        call["timestamp"] = e.timestamp.isoformat()
        out.append(call)
    return out
