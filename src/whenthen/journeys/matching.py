"""Testing events and traits against filters and conditions. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from whenthen.journeys.definition import (
    AllCondition,
    AnyCondition,
    Condition,
    EngagementCondition,
    EventCondition,
    EventMatch,
    NotCondition,
    TraitCondition,
)
from whenthen.journeys.model import EventFacts, Facts
from whenthen.kernel.durations import parse_duration
from whenthen.kernel.filters import Filter, compare, lookup_path


def event_value(event: EventFacts, path: str) -> Any:
    """``properties.x``/``context.x`` explicitly, ``event``/``message_id``, else a property."""
    root, _, rest = path.partition(".")
    if root == "properties" and rest:
        return lookup_path(event.properties, rest)
    if root == "context" and rest:
        return lookup_path(event.context, rest)
    if path == "event":
        return event.name
    return lookup_path(event.properties, path)


def event_matches(event: EventFacts, name: str, where: list[Filter] | tuple[Filter, ...]) -> bool:
    if event.name != name:
        return False
    return all(compare(event_value(event, f.path), f.op, f.value) for f in where)


def match(event: EventFacts, spec: EventMatch) -> bool:
    return event_matches(event, spec.event, spec.where)


def trait_holds(traits: Mapping[str, Any], cond: TraitCondition) -> bool:
    return compare(lookup_path(traits, cond.trait), cond.op, cond.value)


def holds(
    cond: Condition,
    facts: Facts,
    *,
    now: datetime,
    messages: Mapping[str, str],
) -> bool:
    """Evaluate a condition for the person. ``messages`` maps node ids to the ids of the
    messages this enrollment sent from them (for engagement conditions)."""
    if isinstance(cond, TraitCondition):
        return trait_holds(facts.traits(), cond)
    if isinstance(cond, EventCondition):
        since = now - parse_duration(cond.within) if cond.within else None
        name = cond.did if cond.did is not None else cond.did_not
        assert name is not None
        count = facts.count_events(name, tuple(cond.where), since)
        did = count >= cond.min_count
        return did if cond.did is not None else not did
    if isinstance(cond, EngagementCondition):
        ids = (messages[cond.node],) if cond.node and cond.node in messages else tuple(messages.values())
        if cond.node and cond.node not in messages:
            ids = ()
        kind = cond.engaged.removeprefix("not_")
        engaged = bool(ids) and facts.engaged(kind, ids, cond.link)
        return not engaged if cond.engaged.startswith("not_") else engaged
    if isinstance(cond, AllCondition):
        return all(holds(c, facts, now=now, messages=messages) for c in cond.all)
    if isinstance(cond, AnyCondition):
        return any(holds(c, facts, now=now, messages=messages) for c in cond.any)
    assert isinstance(cond, NotCondition)
    return not holds(cond.not_, facts, now=now, messages=messages)


def within(start: datetime, window: str, now: datetime) -> bool:
    return now - start <= parse_duration(window) and now >= start - timedelta(0)
