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
    Filter,
    NotCondition,
    Op,
    TraitCondition,
)
from whenthen.journeys.model import EventFacts, Facts
from whenthen.kernel.durations import parse_duration

_MISSING = object()
_EVENT_ROOTS = ("properties", "context", "traits")


def lookup_path(doc: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path; ``_MISSING`` when any step is absent."""
    current: Any = doc
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


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


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _same(a: Any, b: Any) -> bool:
    if a == b:
        return True
    na, nb = _number(a), _number(b)
    if na is not None and nb is not None and not isinstance(a, str) and not isinstance(b, str):
        return na == nb
    return isinstance(a, str) and isinstance(b, str) and a.casefold() == b.casefold()


def compare(actual: Any, op: Op, expected: Any) -> bool:
    """Apply one operator. Missing values only satisfy ``not_exists``, ``ne`` and ``not_in``.

    Equality of strings ignores case; numbers compare as numbers; ordered comparisons of
    ISO 8601 strings compare as strings (which orders dates correctly)."""
    if op is Op.EXISTS:
        return actual is not _MISSING and actual is not None
    if op is Op.NOT_EXISTS:
        return actual is _MISSING or actual is None
    if actual is _MISSING:
        return op in (Op.NE, Op.NOT_IN)
    if op is Op.EQ:
        return _same(actual, expected)
    if op is Op.NE:
        return not _same(actual, expected)
    if op is Op.IN:
        return any(_same(actual, e) for e in expected)
    if op is Op.NOT_IN:
        return not any(_same(actual, e) for e in expected)
    if op is Op.CONTAINS:
        if isinstance(actual, str) and isinstance(expected, str):
            return expected.casefold() in actual.casefold()
        if isinstance(actual, list):
            return any(_same(a, expected) for a in actual)
        return False
    if op is Op.STARTS_WITH:
        return (
            isinstance(actual, str)
            and isinstance(expected, str)
            and actual.casefold().startswith(expected.casefold())
        )
    na, nb = _number(actual), _number(expected)
    if na is not None and nb is not None:
        a_cmp: Any = na
        b_cmp: Any = nb
    elif isinstance(actual, str) and isinstance(expected, str):
        a_cmp, b_cmp = actual, expected
    else:
        return False
    if op is Op.GT:
        return bool(a_cmp > b_cmp)
    if op is Op.GTE:
        return bool(a_cmp >= b_cmp)
    if op is Op.LT:
        return bool(a_cmp < b_cmp)
    return bool(a_cmp <= b_cmp)


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
