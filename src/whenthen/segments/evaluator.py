"""Evaluating a segment definition for one profile, and when its result may next change
by the passage of time alone. Pure: no database, no clock (``now`` is an argument).

:mod:`whenthen.segments.compiler` computes the same thing in SQL for a whole workspace;
the two are held together by ``tests/integration/test_segment_compiler.py``. The rules
they share are listed in ``docs/design/segments.md``; in short:

* a missing trait and a JSON ``null`` are the same: no value. Only ``not_exists``,
  ``ne`` and ``not_in`` hold for no value (``ne``/``not_in`` are exactly ``not eq``/``not in``);
* values are typed: numbers equal numbers (``1 == 1.0``), strings equal strings ignoring
  ASCII case, booleans equal booleans; ``"1"``, ``1`` and ``true`` are all different;
* ``gt``/``gte``/``lt``/``lte`` need a JSON number (compared as IEEE doubles);
  ``before``/``after``/``within_last``/``within_next``/``older_than`` need a string in the
  accepted instant shape (:func:`whenthen.segments.definition.instant_us`);
* ``within_last d`` is ``[now - d, now]`` inclusive at both ends, ``within_next d`` is
  ``[now, now + d]``, ``older_than d`` is ``< now - d``; event windows ``from`` .. ``to``
  are ``[from, to)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from whenthen.kernel.durations import parse_duration as _parse_duration
from whenthen.scoring.model import EPOCH as SCORING_EPOCH
from whenthen.segments.definition import (
    NUMERIC_OPS,
    AndCondition,
    Condition,
    EngagementCondition,
    EventCondition,
    EventSpec,
    Filter,
    ListCondition,
    NotCondition,
    Op,
    OrCondition,
    PerformedTimeCondition,
    ScoreCondition,
    SegmentDefinition,
    SequenceCondition,
    StageCondition,
    TagCondition,
    TraitCondition,
    from_us,
    instant_us,
    to_us,
    walk,
)

#: A model's decay as segments see it: a half-life, ``(amount, period)`` for a fixed amount
#: per period, or ``None`` (``whenthen.scoring.model.Decay.spec``).
DecaySpec = timedelta | tuple[float, timedelta] | None

#: Fixed-amount decay periods are aligned on this instant (scoring's ``EPOCH``, a Monday).
DECAY_EPOCH_US = to_us(SCORING_EPOCH)

#: Durations of definitions, parsed once: ``next_change`` evaluates a definition at many
#: instants and every window test needs its duration (a str -> immutable timedelta).
parse_duration = functools.lru_cache(maxsize=4096)(_parse_duration)

#: After this many half-lives a decayed score is exactly 0 (PostgreSQL refuses to
#: underflow a float to zero, so the SQL needs the cut-off; the evaluator shares it).
MAX_HALF_LIVES = 1000.0

#: ``next_change`` evaluates the definition at most this many times; past that it answers
#: the next instant it has not examined (earlier than the true change: conservative).
MAX_PROBES = 256

_MISSING: Any = object()
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ONE_US = 1


class ViewEvent(NamedTuple):
    """One tracked event of the profile: its name, its ``properties`` and its timestamp."""

    name: str
    properties: Mapping[str, Any]
    timestamp: datetime


EventTuple = tuple[str, Mapping[str, Any], datetime]


@dataclass(frozen=True)
class ProfileView:
    """Everything a segment can look at for one profile.

    * ``traits``: the profile's traits (decoded JSON);
    * ``events``: its track events as ``(name, properties, timestamp)`` (aware datetimes),
      in any order; engagement is recorded as ``Email Opened`` / ``Email Link Clicked``
      events with ``message_id``, ``journey_id``, ``node`` and (clicks) ``url`` properties;
    * ``lists``: keys of the static lists it belongs to; ``tags``: its tags;
    * ``scores``: model key -> (points, as_of); ``half_lives``: model key -> the model's
      decay (``None`` or absent: no decay): a half-life, the score at ``t`` being
      ``points * 0.5 ** ((t - as_of) / half_life)``, with ``t - as_of`` taken as 0 when
      ``as_of`` is later than ``t`` and the score 0 after :data:`MAX_HALF_LIVES`; or
      ``(amount, period)``, ``amount`` off at each period boundary (aligned on
      :data:`DECAY_EPOCH_US`) in ``(as_of, t]``, never past 0 (as scoring's ``value_at``);
      a model without a score counts as 0 points;
    * ``stage``: its lifecycle stage, if any.
    """

    traits: Mapping[str, Any] = field(default_factory=dict)
    events: Sequence[EventTuple] = ()
    lists: AbstractSet[str] = frozenset()
    tags: AbstractSet[str] = frozenset()
    scores: Mapping[str, tuple[float, datetime]] = field(default_factory=dict)
    half_lives: Mapping[str, DecaySpec] = field(default_factory=dict)
    stage: str | None = None

    # The events by name, worked out at the first question (the view is immutable, its
    # ``events`` included): a definition asks for the same names many times (every leaf,
    # and ``next_change`` evaluates the whole definition at many instants), and a scan of
    # every event per question was a quarter of the evaluator's time.
    @functools.cached_property
    def _named(self) -> dict[str, list[tuple[Mapping[str, Any], datetime]]]:
        out: dict[str, list[tuple[Mapping[str, Any], datetime]]] = {}
        for name, props, ts in self.events:
            found = out.get(name)
            if found is None:
                out[name] = [(props, ts)]
            else:
                found.append((props, ts))
        return out

    @functools.cached_property
    def _times(self) -> dict[str, tuple[datetime, ...]]:
        return {name: tuple(ts for _, ts in found) for name, found in self._named.items()}

    def named(self, name: str) -> Sequence[tuple[Mapping[str, Any], datetime]]:
        """(properties, timestamp) of the events called ``name``, in the view's order."""
        return self._named.get(name, ())

    def times_of(self, name: str) -> tuple[datetime, ...]:
        """The timestamps of the events called ``name``, in the view's order."""
        return self._times.get(name, ())


# ---- values -------------------------------------------------------------------------


def lookup(doc: Mapping[str, Any], path: str) -> Any:
    """Follow dotted object keys; ``_MISSING`` when a step is absent or not an object."""
    current: Any = doc
    for part in path.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        else:
            return _MISSING
    return current


def fold(text: str) -> str:
    """Lower-case ASCII letters only (what SQLite's ``lower()`` does everywhere)."""
    return text.translate(_ASCII_LOWER)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _as_float(v: Any) -> float | None:
    if not _is_number(v):
        return None
    try:
        return float(v)
    except OverflowError:
        return None


def equals(actual: Any, expected: Any) -> bool:
    """Typed equality: bool with bool, number with number, string with string (ASCII case ignored)."""
    if isinstance(expected, bool):
        return isinstance(actual, bool) and actual is expected
    if _is_number(expected):
        a = _as_float(actual)
        return a is not None and a == float(expected)
    if isinstance(expected, str):
        return isinstance(actual, str) and fold(actual) == fold(expected)
    return False


def _instant_of(actual: Any) -> int | None:
    return instant_us(actual) if isinstance(actual, str) else None


def compare(actual: Any, op: Op, expected: Any, now_us: int) -> bool:
    """Apply one operator to a looked-up value (``_MISSING`` when absent)."""
    if actual is None:
        actual = _MISSING  # JSON null is no value
    if op is Op.EXISTS:
        return actual is not _MISSING
    if op is Op.NOT_EXISTS:
        return actual is _MISSING
    if op is Op.NE:
        return not compare(actual, Op.EQ, expected, now_us)
    if op is Op.NOT_IN:
        return not compare(actual, Op.IN, expected, now_us)
    if actual is _MISSING:
        return False
    if op is Op.EQ:
        return equals(actual, expected)
    if op is Op.IN:
        return any(equals(actual, e) for e in expected)
    if op is Op.CONTAINS:
        if isinstance(actual, str):
            return isinstance(expected, str) and fold(expected) in fold(actual)
        if isinstance(actual, list | tuple):
            return any(equals(a, expected) for a in actual)
        return False
    if op is Op.STARTS_WITH:
        return isinstance(actual, str) and fold(actual).startswith(fold(expected))
    if op in NUMERIC_OPS:
        a = _as_float(actual)
        if a is None:
            return False
        b = float(expected)
        if op is Op.GT:
            return a > b
        if op is Op.GTE:
            return a >= b
        if op is Op.LT:
            return a < b
        return a <= b
    t = _instant_of(actual)
    return t is not None and date_holds(t, op, expected, now_us)


def date_holds(t: int, op: Op, value: str, now_us: int) -> bool:
    """A date operator on an instant (epoch microseconds)."""
    if op is Op.BEFORE:
        v = instant_us(value)
        return v is not None and t < v
    if op is Op.AFTER:
        v = instant_us(value)
        return v is not None and t > v
    d = _duration_us(value)
    if op is Op.WITHIN_LAST:
        return now_us - d <= t <= now_us
    if op is Op.WITHIN_NEXT:
        return now_us <= t <= now_us + d
    if op is Op.OLDER_THAN:
        return t < now_us - d
    raise ValueError(f"not a date operator: {op}")


def _duration_us(text: str) -> int:
    return parse_duration(text) // timedelta(microseconds=1)


def filters_hold(properties: Mapping[str, Any], where: Sequence[Filter], now_us: int) -> bool:
    return all(compare(lookup(properties, f.path), f.op, f.value, now_us) for f in where)


def matching(view: ProfileView, event: str, where: Sequence[Filter], now_us: int) -> Sequence[datetime]:
    """Timestamps of the profile's events with this name whose properties pass ``where``
    (without ``where``, the view's own memo: not to be changed)."""
    if not where:
        return view.times_of(event)
    return [ts for props, ts in view.named(event) if filters_hold(props, where, now_us)]


def score_value(points: float, as_of: datetime, decay: DecaySpec, at: datetime) -> float:
    """The lazily decayed score at ``at`` (see :class:`ProfileView`)."""
    if decay is None:
        return float(points)
    return score_value_us(points, to_us(as_of), decay, to_us(at))


def score_value_us(points: float, as_of_us: int, decay: DecaySpec, at_us: int) -> float:
    """``score_value`` with both instants as epoch microseconds: the same arithmetic
    (``score_value`` calls it), without the conversions, for searches that probe many
    instants."""
    if decay is None:
        return float(points)
    if isinstance(decay, tuple):
        amount, period = decay
        p_us = period // timedelta(microseconds=1)
        if p_us <= 0:
            raise ValueError("a decay period must be positive")
        steps = max(0, (at_us - DECAY_EPOCH_US) // p_us - (as_of_us - DECAY_EPOCH_US) // p_us)
        left = max(0.0, abs(float(points)) - amount * steps)
        return math.copysign(left, float(points)) if left else 0.0
    half_life = decay
    h = half_life // timedelta(microseconds=1)
    if h <= 0:
        raise ValueError("a half-life must be positive")
    x = max(at_us - as_of_us, 0) / h
    if x >= MAX_HALF_LIVES:
        return 0.0
    return float(points) * math.pow(0.5, x)


def score_at(view: ProfileView, model: str, at: datetime) -> float:
    entry = view.scores.get(model)
    if entry is None:
        return 0.0
    points, as_of = entry
    return score_value(points, as_of, view.half_lives.get(model), at)


def _score_holds(cond: ScoreCondition, view: ProfileView, now: datetime) -> bool:
    v = score_at(view, cond.model, now)
    t = float(cond.value)
    if cond.op == "gt":
        return v > t
    if cond.op == "gte":
        return v >= t
    if cond.op == "lt":
        return v < t
    return v <= t


# ---- evaluation ---------------------------------------------------------------------


def _in_window(cond: EventCondition, ts: datetime, now: datetime) -> bool:
    if cond.within_last is not None and not (now - parse_duration(cond.within_last) <= ts <= now):
        return False
    if cond.from_ is not None and to_us(ts) < _instant(cond.from_):
        return False
    return not (cond.to is not None and to_us(ts) >= _instant(cond.to))


def _instant(text: str) -> int:
    us = instant_us(text)
    assert us is not None  # validated with the definition
    return us


def _event_holds(cond: EventCondition, view: ProfileView, now: datetime) -> bool:
    times = matching(view, cond.event, cond.where, to_us(now) if cond.where else 0)
    if cond.within_last is None and cond.from_ is None and cond.to is None:
        n = len(times)
    else:
        # The window's bounds as datetimes, once per question (what ``_in_window`` asks of
        # each event): ``to_us(ts) >= from`` is ``ts >= from_us(from)``, exactly.
        lo = now - parse_duration(cond.within_last) if cond.within_last is not None else None
        start = from_us(_instant(cond.from_)) if cond.from_ is not None else None
        end = from_us(_instant(cond.to)) if cond.to is not None else None
        if (cond.from_ is not None and start is None) or (cond.to is not None and end is None):
            n = sum(1 for ts in times if _in_window(cond, ts, now))  # beyond datetime's range
        else:
            n = 0
            for ts in times:
                if lo is not None and not lo <= ts <= now:
                    continue
                if (start is not None and ts < start) or (end is not None and ts >= end):
                    continue
                n += 1
    low, high = cond.count_bounds()
    return n >= low and (high is None or n <= high)


def _performed_time_holds(cond: PerformedTimeCondition, view: ProfileView, now: datetime) -> bool:
    now_us = to_us(now)
    times = matching(view, cond.event, cond.where, now_us)
    if not times:
        return False
    t = min(times) if cond.kind == "first_performed" else max(times)
    return date_holds(to_us(t), Op(cond.op), cond.value, now_us)


def _firsts(cond: SequenceCondition, view: ProfileView, now: datetime) -> Sequence[datetime]:
    firsts = matching(view, cond.first.event, cond.first.where, to_us(now))
    if cond.first_within_last is not None:
        w = parse_duration(cond.first_within_last)
        firsts = [a for a in firsts if now - w <= a <= now]
    return firsts


def _sequence_holds(cond: SequenceCondition, view: ProfileView, now: datetime) -> bool:
    firsts = _firsts(cond, view, now)
    spec: EventSpec = cond.then if cond.then is not None else _required(cond.then_not)
    seconds = matching(view, spec.event, spec.where, to_us(now))
    within = parse_duration(cond.within) if cond.within is not None else None

    def followed(a: datetime) -> bool:
        return any(a < b and (within is None or b <= a + within) for b in seconds)

    if cond.then is not None:
        return any(followed(a) for a in firsts)
    assert within is not None
    return any(a + within <= now and not followed(a) for a in firsts)


def _required(spec: EventSpec | None) -> EventSpec:
    assert spec is not None
    return spec


def holds(cond: Condition, view: ProfileView, now: datetime) -> bool:
    """Whether one condition holds for the profile at ``now``."""
    answer = _HOLDS.get(type(cond))
    if answer is None:
        raise TypeError(f"unknown condition: {cond!r}")
    return answer(cond, view, now)


#: How each kind of condition is answered, by its exact type (a look-up instead of a
#: chain of ``isinstance`` tests: a definition is asked thousands of times a second).
_HOLDS: dict[type, Callable[[Any, ProfileView, datetime], bool]] = {
    AndCondition: lambda c, v, now: all(holds(x, v, now) for x in c.conditions),
    OrCondition: lambda c, v, now: any(holds(x, v, now) for x in c.conditions),
    NotCondition: lambda c, v, now: not holds(c.condition, v, now),
    TraitCondition: lambda c, v, now: compare(lookup(v.traits, c.path), c.op, c.value, to_us(now)),
    EventCondition: _event_holds,
    EngagementCondition: lambda c, v, now: any(_event_holds(e, v, now) for e in c.as_events()),
    PerformedTimeCondition: _performed_time_holds,
    SequenceCondition: _sequence_holds,
    ListCondition: lambda c, v, now: c.list in v.lists,
    TagCondition: lambda c, v, now: c.tag in v.tags,
    StageCondition: lambda c, v, now: v.stage is not None and v.stage in c.in_,
    ScoreCondition: lambda c, v, now: _score_holds(c, v, now),
}


def evaluate(definition: SegmentDefinition, view: ProfileView, now: datetime) -> bool:
    """Whether the profile is in the segment at ``now``."""
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    return holds(definition.condition, view, now)


# ---- when the result may change -----------------------------------------------------


def _date_candidates(t: int, op: Op, value: str) -> list[int]:
    """Instants (epoch microseconds) at which a date operator on ``t`` flips."""
    if op in (Op.BEFORE, Op.AFTER):
        return []
    d = _duration_us(value)
    if op is Op.WITHIN_LAST:  # true on [t, t + d]
        return [t, t + d + _ONE_US]
    if op is Op.WITHIN_NEXT:  # true on [t - d, t]
        return [t - d, t + _ONE_US]
    return [t + d + _ONE_US]  # older_than: true from t + d + 1us on


def _leaf_candidates(cond: Any, view: ProfileView, now: datetime) -> list[int]:
    now_us = to_us(now)
    if isinstance(cond, TraitCondition) and cond.op in (Op.WITHIN_LAST, Op.WITHIN_NEXT, Op.OLDER_THAN):
        actual = lookup(view.traits, cond.path)
        t = _instant_of(actual)
        return [] if t is None else _date_candidates(t, cond.op, str(cond.value))
    if isinstance(cond, EventCondition | EngagementCondition):
        out: list[int] = []
        for c in cond.as_events() if isinstance(cond, EngagementCondition) else (cond,):
            if c.within_last is None:
                continue
            d = _duration_us(c.within_last)
            for ts in matching(view, c.event, c.where, now_us):
                t = to_us(ts)
                out += [t, t + d + _ONE_US]  # counted on [ts, ts + d]
        return out
    if isinstance(cond, PerformedTimeCondition):
        times = matching(view, cond.event, cond.where, now_us)
        if not times:
            return []
        t = to_us(min(times) if cond.kind == "first_performed" else max(times))
        return _date_candidates(t, Op(cond.op), cond.value)
    if isinstance(cond, SequenceCondition):
        out = []
        for ts in matching(view, cond.first.event, cond.first.where, now_us):
            t = to_us(ts)
            if cond.first_within_last is not None:
                out += [t, t + _duration_us(cond.first_within_last) + _ONE_US]
            if cond.then_not is not None and cond.within is not None:
                out.append(t + _duration_us(cond.within))  # the wait for then_not is over
        return out
    if isinstance(cond, ScoreCondition):
        flip = _score_flip(cond, view, now)
        return [] if flip is None else [flip]
    return []


_LATEST_US = 253402300799999999  # 9999-12-31T23:59:59.999999Z


def _score_flip(cond: ScoreCondition, view: ProfileView, now: datetime) -> int | None:
    """The first instant after ``now`` at which the comparison differs from now: a decayed
    score moves monotonically towards 0, so the comparison flips at most once. The exact
    instant under the evaluator's own arithmetic is found by bisection; the bracket it
    bisects starts from where the decay's formula puts the crossing (``_flip_guess``), a
    few microseconds wide, and widens until it holds the flip: a handful of evaluations
    rather than the ~58 of a bisection from now to the year 9999, and the same answer,
    since each step only relies on the comparison flipping once."""
    decay = view.half_lives.get(cond.model)
    entry = view.scores.get(cond.model)
    if decay is None or entry is None:
        return None
    points, as_of = entry
    as_of_us = to_us(as_of)
    threshold = float(cond.value)
    op = cond.op

    def holds(us: int) -> bool:
        v = score_value_us(points, as_of_us, decay, us)
        if op == "gt":
            return v > threshold
        if op == "gte":
            return v >= threshold
        if op == "lt":
            return v < threshold
        return v <= threshold

    now_us = to_us(now)
    start = holds(now_us)
    lo, hi = now_us, _LATEST_US  # differs at lo: False
    if hi <= lo or holds(hi) == start:
        return None
    guess = _flip_guess(points, as_of_us, decay, threshold)
    if guess is not None and lo < guess < hi:
        lo, hi = _bracket(lambda us: holds(us) != start, guess, lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if holds(mid) != start:
            hi = mid
        else:
            lo = mid
    return hi


def _flip_guess(points: float, as_of_us: int, decay: DecaySpec, threshold: float) -> int | None:
    """Where a decaying score's formula puts its crossing of ``threshold`` (or its cut to 0
    when the threshold lies beyond the score's reach): a starting point for the search,
    which checks it. ``None`` when the formula says nothing useful (step decay)."""
    if decay is None or isinstance(decay, tuple):
        return None
    h = decay // timedelta(microseconds=1)
    if h <= 0 or not points:
        return None
    same_sign = math.copysign(1.0, threshold) == math.copysign(1.0, points)
    ratio = abs(threshold) / abs(points) if same_sign else 0.0
    if 0.0 < ratio <= 1.0:
        return as_of_us + int(-math.log2(ratio) * h)
    return as_of_us + int(MAX_HALF_LIVES * h)  # the comparison can only flip where the score is cut to 0


def _bracket(differs: Callable[[int], bool], guess: int, lo: int, hi: int) -> tuple[int, int]:
    """A sub-range ``(a, b]`` of ``(lo, hi]`` that holds the flip (``differs`` False at
    ``a``, True at ``b``), found by steps doubling away from ``guess``."""
    step = 1
    if differs(guess):
        b = guess
        while True:
            probe = b - step
            if probe <= lo:
                return lo, b
            if not differs(probe):
                return probe, b
            b, step = probe, step * 2
    a = guess
    while True:
        probe = a + step
        if probe >= hi:
            return a, hi
        if differs(probe):
            return a, probe
        a, step = probe, step * 2


#: How the answer can move by the passage of time alone, for a profile none of whose
#: time-dependent events lies in the future (see :func:`time_direction`).
LEAVING_ONLY = "leaving_only"
ENTERING_ONLY = "entering_only"


def _leaf_direction(cond: Any, half_lives: Mapping[str, DecaySpec]) -> str | None:
    """``LEAVING_ONLY`` when time alone can only turn the leaf from true to false (for a
    profile without future events of the leaf), ``ENTERING_ONLY`` when only from false to
    true, ``""`` when time never changes it, ``None`` when it may go either way (or when
    this analysis does not know)."""
    if isinstance(cond, EventCondition | EngagementCondition):
        direction = ""
        for c in cond.as_events() if isinstance(cond, EngagementCondition) else (cond,):
            if c.within_last is None:
                continue  # all-time or between fixed dates: time changes nothing
            low, high = c.count_bounds()
            # with no future event, the count in [now - d, now] only falls as time passes
            if high is None and low >= 1:
                leaf = LEAVING_ONLY  # at least n
            elif low == 0 and high is not None:
                leaf = ENTERING_ONLY  # at most n, not performed
            elif low == 0:
                leaf = ""  # always true
            else:
                return None  # between, exactly: both ways
            if direction and leaf and leaf != direction:
                return None
            direction = direction or leaf
        return direction
    if isinstance(cond, PerformedTimeCondition):
        op = Op(cond.op)
        if op is Op.WITHIN_LAST:
            return LEAVING_ONLY  # the time, in the past, leaves the window
        if op is Op.OLDER_THAN:
            return ENTERING_ONLY
        if op in (Op.BEFORE, Op.AFTER):
            return ""
        return None
    if isinstance(cond, TraitCondition):
        return None if cond.op in (Op.WITHIN_LAST, Op.WITHIN_NEXT, Op.OLDER_THAN) else ""
    if isinstance(cond, SequenceCondition):
        return None if (cond.first_within_last is not None or cond.then_not is not None) else ""
    if isinstance(cond, ScoreCondition):
        return None if half_lives.get(cond.model) is not None else ""
    return ""  # lists, tags, stage


def time_direction(definition: SegmentDefinition, half_lives: Mapping[str, DecaySpec]) -> str | None:
    """``LEAVING_ONLY`` when the passage of time alone can only take members out of the
    segment, never bring anyone in, for every profile without a future-dated event of a
    time-dependent leaf: every time-dependent leaf turns only from true to false and sits
    under an even number of ``not`` (the rest of the definition is monotone in it);
    ``ENTERING_ONLY`` for the mirror case; ``None`` otherwise (mixed, both ways, unknown).
    "Ordered 2 times in the last 30 days, or on plan pro and viewed a page in the last 7
    days" is ``LEAVING_ONLY``: only its members can have a :func:`next_change`. The
    compiler's timer candidates use it (``tests/unit/test_segment_time_direction.py``
    checks it against ``next_change`` on generated definitions and views)."""
    found: set[str] = set()

    def visit(cond: Any, negated: bool) -> bool:
        if isinstance(cond, AndCondition | OrCondition):
            return all(visit(c, negated) for c in cond.conditions)
        if isinstance(cond, NotCondition):
            return visit(cond.condition, not negated)
        leaf = _leaf_direction(cond, half_lives)
        if leaf is None:
            return False
        if leaf:
            found.add(leaf if not negated else (ENTERING_ONLY if leaf == LEAVING_ONLY else LEAVING_ONLY))
        return True

    if not visit(definition.condition, False) or len(found) != 1:
        return None
    return next(iter(found))


def next_change(definition: SegmentDefinition, view: ProfileView, now: datetime) -> datetime | None:
    """The earliest instant after ``now`` at which :func:`evaluate` gives another answer
    with no new data, or ``None`` when it never will.

    Every leaf that depends on time lists the instants at which it can flip (an event or a
    date entering or leaving a window, a sequence's wait ending, a decaying score crossing
    its threshold). The answer is the first of those instants at which the whole definition
    evaluates differently, so it is exact; when more than :data:`MAX_PROBES` instants would
    need checking, the first unchecked one is returned instead (never later than the truth).
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    now_us = to_us(now)
    candidates: set[int] = set()
    for cond in walk(definition.condition):
        candidates.update(c for c in _leaf_candidates(cond, view, now) if now_us < c <= _LATEST_US)
    if not candidates:
        return None
    ordered = sorted(candidates)
    current = evaluate(definition, view, now)
    for i, us in enumerate(ordered):
        at = from_us(us)
        assert at is not None
        if i >= MAX_PROBES or evaluate(definition, view, at) != current:
            return at
    return None


def changes(
    definition: SegmentDefinition, view: ProfileView, start: datetime, end: datetime
) -> list[tuple[datetime, bool]]:
    """Every (instant, new result) in ``(start, end]`` with no new data: follows
    :func:`next_change` (handy for previews and tests)."""
    out: list[tuple[datetime, bool]] = []
    at: datetime | None = next_change(definition, view, start)
    while at is not None and at <= end:
        out.append((at, evaluate(definition, view, at)))
        at = next_change(definition, view, at)
    return out
