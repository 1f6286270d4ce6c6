"""Lead scoring and lifecycle stages: definitions and the pure rules. No I/O.

* A scoring model has rules: an event (with filters) adds or removes points, optionally
  capped per period (e.g. at most 20 points a day from page views); a trait condition
  adds its points while it holds (given when it starts holding, taken back when it stops).
* Decay is lazy: a score is stored as ``points`` at ``as_of`` and read as
  ``points * 0.5 ** ((t - as_of) / half_life)``; no nightly rescan.
* Thresholds: crossing one (up or down) emits a ``Score Threshold Crossed`` event, when
  an event changes the score and when decay alone carries it across (a timer per score,
  :func:`next_decay_crossing`, fired by a worker step).
* Lifecycle: ordered stages and rules that move people forward (an event, or a score
  reaching a value); journeys and the API may set any stage. Every move is recorded.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from whenthen.kernel.durations import parse_duration
from whenthen.kernel.filters import Filter, Op, compare, lookup_path

KEY = r"^[a-z0-9][a-z0-9_-]{0,79}$"
EPOCH = datetime(2000, 1, 3, tzinfo=UTC)  # a Monday: weekly periods start on Mondays


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Cap(_M):
    points: float = Field(gt=0)
    period: str

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        if parse_duration(v) <= timedelta(0):
            raise ValueError("period must be positive")
        return v


class ScoreRule(_M):
    id: str = Field(pattern=KEY)
    event: str | None = Field(default=None, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    trait: str | None = Field(default=None, max_length=200)
    op: Op = Op.EQ
    value: Any = None
    points: float
    cap: Cap | None = None

    @model_validator(mode="after")
    def _one(self) -> ScoreRule:
        if (self.event is None) == (self.trait is None):
            raise ValueError("a rule has exactly one of event, trait")
        if self.trait is not None and (self.where or self.cap):
            raise ValueError("where and cap go with event rules")
        return self


class Decay(_M):
    """How a score fades with time, applied lazily: either a ``half_life`` (the score halves
    every so often, continuously) or a fixed ``amount`` taken off at every ``every`` boundary
    (periods aligned on 2000-01-03 UTC like caps: "1w" means each Monday 00:00 UTC), never
    past 0. Neither: no decay."""

    half_life: str | None = None
    amount: float | None = Field(default=None, gt=0)
    every: str | None = None

    @field_validator("half_life", "every")
    @classmethod
    def _positive(cls, v: str | None) -> str | None:
        if v is not None and parse_duration(v) <= timedelta(0):
            raise ValueError("must be a positive duration")
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> Decay:
        if (self.amount is None) != (self.every is None):
            raise ValueError("amount and every go together")
        if self.half_life is not None and self.amount is not None:
            raise ValueError("a decay has a half_life or an amount every period, not both")
        return self

    @property
    def period(self) -> timedelta | None:
        """The half-life (``None`` for a fixed-amount decay or none)."""
        return parse_duration(self.half_life) if self.half_life else None

    @property
    def step(self) -> tuple[float, timedelta] | None:
        """``(amount, period)`` of a fixed-amount decay."""
        if self.amount is None or self.every is None:
            return None
        return (self.amount, parse_duration(self.every))

    @property
    def spec(self) -> timedelta | tuple[float, timedelta] | None:
        """The decay as the segment evaluator and compiler take it: a half-life, an
        ``(amount, period)``, or ``None``."""
        return self.period or self.step


class ScoringModel(_M):
    key: str = Field(pattern=KEY)
    name: str = Field(min_length=1, max_length=200)
    rules: list[ScoreRule] = Field(min_length=1, max_length=200)
    decay: Decay = Field(default_factory=Decay)
    thresholds: list[float] = Field(default_factory=list, max_length=20)

    @model_validator(mode="after")
    def _unique(self) -> ScoringModel:
        ids = [r.id for r in self.rules]
        if len(set(ids)) != len(ids):
            raise ValueError("rule ids must differ")
        return self


@dataclass(frozen=True, slots=True)
class Score:
    points: float
    as_of: datetime
    #: rule id -> [period start ISO, points earned in that period]
    periods: dict[str, list[Any]] = field(default_factory=dict)
    #: trait rules whose points are currently given
    awarded: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"periods": self.periods, "awarded": list(self.awarded)}

    @staticmethod
    def from_row(points: float, as_of: datetime, doc: Mapping[str, Any] | None) -> Score:
        doc = doc or {}
        return Score(float(points), as_of, dict(doc.get("periods") or {}), tuple(doc.get("awarded") or ()))


@dataclass(frozen=True, slots=True)
class Crossing:
    threshold: float
    direction: str  # up / down
    value: float


DecaySpec = timedelta | tuple[float, timedelta] | None


def boundaries_between(start: datetime, end: datetime, period: timedelta) -> int:
    """How many period boundaries (aligned on :data:`EPOCH`) lie in ``(start, end]``."""
    return max(0, (end - EPOCH) // period - (start - EPOCH) // period)


def value_at(score: Score, decay: Decay | DecaySpec, t: datetime) -> float:
    """The score at ``t``, decayed lazily from ``as_of``: halved every half-life
    (``points * 0.5 ** ((t - as_of) / half_life)``), or a fixed amount off at each period
    boundary passed since ``as_of``, never past 0."""
    spec = decay.spec if isinstance(decay, Decay) else decay
    if spec is None or t <= score.as_of:
        return score.points
    if isinstance(spec, timedelta):
        return score.points * math.pow(0.5, (t - score.as_of) / spec)
    amount, period = spec
    left = max(0.0, abs(score.points) - amount * boundaries_between(score.as_of, t, period))
    return math.copysign(left, score.points) if left else 0.0


def _period_start(now: datetime, period: timedelta) -> datetime:
    n = math.floor((now - EPOCH) / period)
    return EPOCH + n * period


def _event_value(properties: Mapping[str, Any], path: str) -> Any:
    return lookup_path(properties, path.removeprefix("properties."))


def touches(model: ScoringModel, event: str, properties: Mapping[str, Any]) -> bool:
    """Whether :func:`apply` could change the score for this event: an event rule matches
    it, or the model has trait rules (any event may start or stop a trait holding)."""
    return any(
        rule.trait is not None
        or (
            rule.event == event
            and all(compare(_event_value(properties, f.path), f.op, f.value) for f in rule.where)
        )
        for rule in model.rules
    )


def may_change(
    model: ScoringModel,
    awarded: Collection[str],
    *,
    event: str,
    properties: Mapping[str, Any],
    traits_after: Mapping[str, Any],
) -> bool:
    """Whether :func:`apply` can change a score whose trait rules ``awarded`` are given
    (``Score.awarded``; none without a score): an event rule matches the event, or a
    trait rule holds now and is not given, or is given and no longer holds. When this is
    false, ``apply`` returns ``(None, ())``: the same answer without reading the score."""
    for rule in model.rules:
        if rule.trait is not None:
            holds_now = compare(lookup_path(traits_after, rule.trait), rule.op, rule.value)
            if holds_now != (rule.id in awarded):
                return True
        elif rule.event == event and all(
            compare(_event_value(properties, f.path), f.op, f.value) for f in rule.where
        ):
            return True
    return False


def apply(
    model: ScoringModel,
    score: Score | None,
    *,
    event: str,
    properties: Mapping[str, Any],
    traits_after: Mapping[str, Any],
    now: datetime,
) -> tuple[Score | None, tuple[Crossing, ...]]:
    """Score one event. Returns the new score (``None``: unchanged) and the crossings."""
    half_life = model.decay.period
    current = score or Score(0.0, now)
    before = value_at(current, half_life, now)
    delta = 0.0
    periods = dict(current.periods)
    awarded = set(current.awarded)
    for rule in model.rules:
        if rule.event is not None:
            if rule.event != event or not all(
                compare(_event_value(properties, f.path), f.op, f.value) for f in rule.where
            ):
                continue
            points = rule.points
            if rule.cap is not None:
                start = _period_start(now, parse_duration(rule.cap.period)).isoformat()
                seen_start, earned = periods.get(rule.id, [start, 0.0])
                earned = earned if seen_start == start else 0.0
                room = max(0.0, rule.cap.points - abs(earned))
                points = math.copysign(min(abs(points), room), points)
                periods[rule.id] = [start, earned + points]
            delta += points
        else:
            assert rule.trait is not None
            held_before = rule.id in awarded
            holds_now = compare(lookup_path(traits_after, rule.trait), rule.op, rule.value)
            if holds_now and not held_before:
                delta += rule.points
                awarded.add(rule.id)
            elif held_before and not holds_now:
                delta -= rule.points
                awarded.discard(rule.id)
    changed = delta != 0 or periods != current.periods or awarded != set(current.awarded)
    if not changed:
        return None, ()
    after = before + delta
    new = replace(current, points=after, as_of=now, periods=periods, awarded=tuple(sorted(awarded)))
    return new, crossings_between(model, before, after)


def crossings_between(model: ScoringModel, before: float, after: float) -> tuple[Crossing, ...]:
    """The thresholds passed going from ``before`` to ``after``: up when the score reaches
    one, down when it falls below one; in the order they are passed."""
    passed = [t for t in sorted(model.thresholds) if (before < t <= after) or (after < t <= before)]
    if after < before:
        passed.reverse()
    return tuple(Crossing(t, "up" if after >= t else "down", after) for t in passed)


def next_decay_crossing(model: ScoringModel, score: Score, start: float) -> datetime | None:
    """When decay alone carries the score past its next threshold, counting from the value
    ``start`` (the score's value when this is computed; thresholds between ``start`` and
    the stored points were already passed). ``None``: never (no decay, or no threshold
    between the score and where decay takes it: towards 0, which a half-life never reaches
    and a fixed amount does)."""
    spec = model.decay.spec
    p = score.points
    if spec is None or p == 0 or start == 0:
        return None
    fixed = not isinstance(spec, timedelta)
    if p > 0:  # falls: the next threshold below, passed when the value drops under it
        ahead = [t for t in model.thresholds if 0 < t <= start]
        target = max(ahead, default=None)
    else:  # rises: the next threshold above, passed when the value gets to it
        ahead = [t for t in model.thresholds if start < t < 0 or (fixed and t == 0 and start < 0)]
        target = min(ahead, default=None)
    if target is None:
        return None

    def passed(at: datetime) -> bool:
        v = value_at(score, spec, at)
        return v < target if p > 0 else v >= target

    try:
        if isinstance(spec, timedelta):
            due = score.as_of + timedelta(seconds=math.log2(p / target) * spec.total_seconds())
            step = timedelta(microseconds=1)
        else:
            amount, period = spec
            gap = abs(p) - abs(target)  # to take off: more than it going down, all of it up
            n = math.floor(gap / amount) + 1 if p > 0 else max(1, math.ceil(gap / amount))
            due = EPOCH + ((score.as_of - EPOCH) // period + n) * period
            step = period
    except OverflowError:
        return None
    # The instant the value has passed the target under ``value_at``'s own arithmetic.
    for _ in range(64):
        if passed(due):
            return due
        try:
            due += step
        except OverflowError:
            return None
        if not fixed:
            step *= 2
    return None


class StageRule(_M):
    stage: str = Field(min_length=1, max_length=64)
    event: str | None = Field(default=None, max_length=255)
    where: list[Filter] = Field(default_factory=list)
    score_model: str | None = Field(default=None, pattern=KEY)
    score_at_least: float | None = None

    @model_validator(mode="after")
    def _one(self) -> StageRule:
        if (self.event is None) == (self.score_model is None):
            raise ValueError("a stage rule has exactly one of event, score_model")
        if self.score_model is not None and self.score_at_least is None:
            raise ValueError("score_model needs score_at_least")
        return self


class Lifecycle(_M):
    stages: list[str] = Field(min_length=1, max_length=30)
    rules: list[StageRule] = Field(default_factory=list, max_length=200)

    @model_validator(mode="after")
    def _known(self) -> Lifecycle:
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("stages must differ")
        for r in self.rules:
            if r.stage not in self.stages:
                raise ValueError(f"rule moves to unknown stage {r.stage!r}")
        return self


def next_stage(
    lifecycle: Lifecycle,
    current: str | None,
    *,
    event: str,
    properties: Mapping[str, Any],
    scores: Mapping[str, float],
) -> str | None:
    """The stage rules move a person to (forward only), or ``None``."""
    rank = {s: i for i, s in enumerate(lifecycle.stages)}
    best: str | None = None
    for rule in lifecycle.rules:
        if rule.event is not None:
            ok = rule.event == event and all(
                compare(_event_value(properties, f.path), f.op, f.value) for f in rule.where
            )
        else:
            assert rule.score_model is not None
            assert rule.score_at_least is not None
            ok = scores.get(rule.score_model, 0.0) >= rule.score_at_least
        if not ok:
            continue
        if current is not None and current in rank and rank[rule.stage] <= rank[current]:
            continue
        if best is None or rank[rule.stage] > rank[best]:
            best = rule.stage
    return best
