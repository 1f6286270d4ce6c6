"""Segment definitions: the language, its JSON Schema, and parsing with precise errors. Pure.

A definition is a JSON document ``{"condition": <condition>}``. Every condition carries a
``kind``: the combinators ``and`` / ``or`` / ``not`` and the leaves ``trait``, ``event``,
``first_performed`` / ``last_performed``, ``sequence``, ``list``, ``tag``, ``score``,
``stage`` and ``engagement``. The semantics (what missing, null, mixed types and window
edges mean) are in ``docs/design/segments.md``; :mod:`whenthen.segments.evaluator`
implements them for one profile and :mod:`whenthen.segments.compiler` in SQL.

Absolute instants (``before`` / ``after`` values, event windows, and date traits in the
data) share one strict ISO 8601 format, parsed by :func:`instant_us` here and by the
same integer arithmetic in SQL: ``YYYY-MM-DD`` (midnight UTC) or
``YYYY-MM-DD[T| ]HH:MM[:SS[.f{1,6}]][Z|+HH:MM|-HH:MM]`` (no offset means UTC).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from whenthen.kernel.durations import MAX as KERNEL_MAX_DURATION
from whenthen.kernel.durations import parse_duration

#: Limits that keep one definition's SQL reasonable.
MAX_DEPTH = 8
MAX_CONDITIONS = 100

ENGAGEMENT_OPENED = "Email Opened"
ENGAGEMENT_CLICKED = "Email Link Clicked"


# ---- durations ----------------------------------------------------------------------
# One grammar for every concept ("30m", "2d", "1w", ISO 8601 "PT1H"): whenthen.kernel.durations.

MAX_DURATION = KERNEL_MAX_DURATION


# ---- instants ------------------------------------------------------------------------

#: The one accepted shape of an absolute instant (valid as Python ``re`` and PostgreSQL ARE).
INSTANT_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
_INSTANT = re.compile(INSTANT_PATTERN)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def instant_shapes() -> list[str]:
    """Every shape :data:`INSTANT_PATTERN` admits with digits written ``0``, ``+`` as ``-``
    and a space separator as ``T`` (how SQLite, which has no regular expressions, checks it)."""
    times = ["T00:00", "T00:00:00"] + ["T00:00:00." + "0" * n for n in range(1, 7)]
    return ["0000-00-00"] + [f"0000-00-00{t}{z}" for t in times for z in ("", "Z", "-00:00")]


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date with ``y >= 1`` (every
    division has non-negative operands, so SQL's truncating division agrees)."""
    y = y - 1 if m <= 2 else y
    era = y // 400
    yoe = y - era * 400
    mp = m - 3 if m > 2 else m + 9
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and y % 100 != 0) or y % 400 == 0 else 28
    return 30 if m in (4, 6, 9, 11) else 31


def instant_us(value: object) -> int | None:
    """Microseconds since the Unix epoch of a string in the accepted shape; ``None`` for
    anything else (another type, another shape, or an impossible date or time)."""
    if not isinstance(value, str) or not _INSTANT.fullmatch(value):
        return None
    y, mo, d = int(value[0:4]), int(value[5:7]), int(value[8:10])
    hh = mi = ss = frac = off = 0
    if len(value) > 10:
        rest = value[11:]
        tz = ""
        if rest.endswith("Z"):
            rest, tz = rest[:-1], "Z"
        elif len(rest) > 6 and rest[-6] in "+-":
            rest, tz = rest[:-6], rest[-6:]
        hh, mi = int(rest[0:2]), int(rest[3:5])
        if len(rest) >= 8:
            ss = int(rest[6:8])
        if len(rest) > 9:
            frac = int(rest[9:].ljust(6, "0"))
        if len(tz) == 6:
            oh, om = int(tz[1:3]), int(tz[4:6])
            if oh > 23 or om > 59:
                return None
            off = (oh * 60 + om) * (-1 if tz[0] == "-" else 1)
    if y < 1 or not 1 <= mo <= 12 or not 1 <= d <= days_in_month(y, mo):
        return None
    if hh > 23 or mi > 59 or ss > 59:
        return None
    minutes = (days_from_civil(y, mo, d) * 24 + hh) * 60 + mi - off
    return (minutes * 60 + ss) * 1_000_000 + frac


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch of an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: use aware UTC datetimes")
    return (moment - _EPOCH) // _US


def from_us(us: int) -> datetime | None:
    """The aware UTC datetime of an epoch offset; ``None`` outside datetime's range."""
    try:
        return _EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return None


def _instant(value: str) -> str:
    us = instant_us(value)
    if us is None or from_us(us) is None:
        raise ValueError(
            f"{value!r} is not an instant: use YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM]"
        )
    return value


def _positive_duration(value: str) -> str:
    if parse_duration(value) <= timedelta(0):
        raise ValueError("the duration must be positive")
    return value


# ---- building blocks ----------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Op(enum.StrEnum):
    """Operators on one value (a trait, or a property of an event)."""

    EQ = "eq"
    NE = "ne"
    IN = "in"
    NOT_IN = "not_in"
    CONTAINS = "contains"
    STARTS_WITH = "starts_with"
    EXISTS = "exists"
    NOT_EXISTS = "not_exists"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    BEFORE = "before"
    AFTER = "after"
    WITHIN_LAST = "within_last"
    WITHIN_NEXT = "within_next"
    OLDER_THAN = "older_than"


NUMERIC_OPS = frozenset({Op.GT, Op.GTE, Op.LT, Op.LTE})
ABSOLUTE_DATE_OPS = frozenset({Op.BEFORE, Op.AFTER})
RELATIVE_DATE_OPS = frozenset({Op.WITHIN_LAST, Op.WITHIN_NEXT, Op.OLDER_THAN})
DATE_OPS = ABSOLUTE_DATE_OPS | RELATIVE_DATE_OPS

Number = (
    Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
    | Annotated[StrictFloat, Field(allow_inf_nan=False)]
)
Scalar = StrictStr | StrictBool | Number
Duration = Annotated[str, Field(description="'30m', '2h', '7d', '1w' or ISO 8601 such as 'P7D', 'PT1H'")]
Instant = Annotated[
    str,
    Field(
        description="YYYY-MM-DD (midnight UTC) or YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM] (naive means UTC)"
    ),
]

_UNSAFE_SEGMENT = re.compile(r'["\\\[\]*\x00-\x1f]')
_INDEX_LIKE = re.compile(r"\s*[+-]?[0-9]+\s*")


def check_path(path: str) -> str:
    """Dotted object keys (``address.city``). Keys cannot be empty, look like an array
    index, or hold ``"``, ``\\``, ``[``, ``]``, ``*`` or control characters."""
    for segment in path.split("."):
        if not segment:
            raise ValueError(f"{path!r}: empty key in the path")
        if _UNSAFE_SEGMENT.search(segment):
            raise ValueError(f"{path!r}: a key may not contain quotes, backslashes, brackets or '*'")
        if _INDEX_LIKE.fullmatch(segment):
            raise ValueError(f"{path!r}: numeric keys (array indexes) are not supported")
    return path


def _check_value(op: Op, value: Any, *, relative_dates: bool) -> None:
    if op in (Op.EXISTS, Op.NOT_EXISTS):
        if value is not None:
            raise ValueError(f"op {op.value} takes no value")
        return
    if value is None:
        raise ValueError(f"op {op.value} needs a value (test for null with not_exists)")
    if op in (Op.IN, Op.NOT_IN):
        if not isinstance(value, list) or not value:
            raise ValueError(f"op {op.value} needs a non-empty list of values")
        return
    if isinstance(value, list):
        raise ValueError(f"op {op.value} needs a single value, not a list")
    if op is Op.STARTS_WITH and not isinstance(value, str):
        raise ValueError("op starts_with needs a string")
    if op in NUMERIC_OPS and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"op {op.value} needs a number (compare dates with before/after)")
    if op in ABSOLUTE_DATE_OPS:
        if not isinstance(value, str):
            raise ValueError(f"op {op.value} needs an ISO 8601 instant")
        _instant(value)
    if op in RELATIVE_DATE_OPS:
        if not relative_dates:
            raise ValueError(f"op {op.value} is not available in event filters")
        if not isinstance(value, str):
            raise ValueError(f"op {op.value} needs a duration such as '7d'")
        _positive_duration(value)


class Filter(_Model):
    """A test on one property of an event: ``path`` is relative to ``properties``."""

    path: str = Field(min_length=1, max_length=200, description="dotted, relative to properties")
    op: Op = Op.EQ
    value: Scalar | list[Scalar] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        check_path(v)
        if v.split(".")[0] in ("properties", "context"):
            raise ValueError(
                f"{v!r}: paths are relative to properties (write 'total', not 'properties.total')"
            )
        return v

    @model_validator(mode="after")
    def _value(self) -> Filter:
        _check_value(self.op, self.value, relative_dates=False)
        return self


class EventSpec(_Model):
    """An event by name (exact, case-sensitive) with property filters (all must hold)."""

    event: str = Field(min_length=1, max_length=255)
    where: tuple[Filter, ...] = ()


# ---- conditions ---------------------------------------------------------------------


class AndCondition(_Model):
    kind: Literal["and"]
    conditions: tuple[Condition, ...] = Field(min_length=1)


class OrCondition(_Model):
    kind: Literal["or"]
    conditions: tuple[Condition, ...] = Field(min_length=1)


class NotCondition(_Model):
    kind: Literal["not"]
    condition: Condition


class TraitCondition(_Model):
    """A test on a trait of the profile (``address.city``)."""

    kind: Literal["trait"]
    path: str = Field(min_length=1, max_length=200)
    op: Op = Op.EQ
    value: Scalar | list[Scalar] | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_path(v)

    @model_validator(mode="after")
    def _value(self) -> TraitCondition:
        _check_value(self.op, self.value, relative_dates=True)
        return self


class EventCondition(_Model):
    """Performed (or, with ``performed: false``, did not perform) an event matching
    ``where``, a number of times (default: at least once), in a window (default: ever).

    The window is ``within_last`` (``[now - d, now]``) and/or ``from`` (inclusive) ..
    ``to`` (exclusive); when several are given, all apply."""

    kind: Literal["event"]
    event: str = Field(min_length=1, max_length=255)
    where: tuple[Filter, ...] = ()
    performed: bool = True
    at_least: int | None = Field(default=None, ge=1)
    at_most: int | None = Field(default=None, ge=0)
    exactly: int | None = Field(default=None, ge=0)
    within_last: Duration | None = None
    from_: Instant | None = Field(default=None, alias="from")
    to: Instant | None = None

    @field_validator("within_last")
    @classmethod
    def _within(cls, v: str | None) -> str | None:
        return _positive_duration(v) if v is not None else v

    @field_validator("from_", "to")
    @classmethod
    def _bounds(cls, v: str | None) -> str | None:
        return _instant(v) if v is not None else v

    @model_validator(mode="after")
    def _counts(self) -> EventCondition:
        if self.exactly is not None and (self.at_least is not None or self.at_most is not None):
            raise ValueError("exactly excludes at_least and at_most")
        if not self.performed and (self.at_least, self.at_most, self.exactly) != (None, None, None):
            raise ValueError("performed: false means zero times; it takes no counts")
        if self.at_least is not None and self.at_most is not None and self.at_least > self.at_most:
            raise ValueError("at_least is greater than at_most")
        return self

    def count_bounds(self) -> tuple[int, int | None]:
        """(minimum, maximum or None) number of matching events for the condition to hold."""
        if not self.performed:
            return 0, 0
        if self.exactly is not None:
            return self.exactly, self.exactly
        if self.at_least is None and self.at_most is None:
            return 1, None
        return self.at_least or 0, self.at_most


class PerformedTimeCondition(_Model):
    """When the person first (or last) performed a matching event, tested with a date
    operator; false when they never did."""

    kind: Literal["first_performed", "last_performed"]
    event: str = Field(min_length=1, max_length=255)
    where: tuple[Filter, ...] = ()
    op: Literal["before", "after", "within_last", "within_next", "older_than"]
    value: str

    @model_validator(mode="after")
    def _value(self) -> PerformedTimeCondition:
        _check_value(Op(self.op), self.value, relative_dates=True)
        return self


class SequenceCondition(_Model):
    """``first`` and then (strictly later, within ``within``) ``then``; or ``first`` and
    then not ``then_not`` within ``within`` (which must have passed). ``first_within_last``
    limits when ``first`` happened."""

    kind: Literal["sequence"]
    first: EventSpec
    then: EventSpec | None = None
    then_not: EventSpec | None = None
    within: Duration | None = None
    first_within_last: Duration | None = None

    @field_validator("within", "first_within_last")
    @classmethod
    def _durations(cls, v: str | None) -> str | None:
        return _positive_duration(v) if v is not None else v

    @model_validator(mode="after")
    def _shape(self) -> SequenceCondition:
        if (self.then is None) == (self.then_not is None):
            raise ValueError("give exactly one of then, then_not")
        if self.then_not is not None and self.within is None:
            raise ValueError("then_not needs within")
        return self


class ListCondition(_Model):
    """Member of a static list (by key)."""

    kind: Literal["list"]
    list: str = Field(min_length=1, max_length=80)


class TagCondition(_Model):
    """Has the tag (exact match)."""

    kind: Literal["tag"]
    tag: str = Field(min_length=1, max_length=100)


class ScoreCondition(_Model):
    """A score in a scoring model compared with a threshold, decayed to now. A profile
    without a score in the model has 0 points."""

    kind: Literal["score"]
    model: str = Field(min_length=1, max_length=80)
    op: Literal["gt", "gte", "lt", "lte"]
    value: Number


class StageCondition(_Model):
    """In one of the lifecycle stages (exact match); a profile without a stage is in none."""

    kind: Literal["stage"]
    in_: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(alias="in", min_length=1)


class EngagementCondition(_Model):
    """Opened or clicked an email (optionally a given message, journey, or journey node),
    ever or within the last ``within_last``. A click counts as an open."""

    kind: Literal["engagement"]
    action: Literal["opened", "clicked"]
    message_id: str | None = Field(default=None, min_length=1, max_length=255)
    journey_id: str | None = Field(default=None, min_length=1, max_length=255)
    node: str | None = Field(default=None, min_length=1, max_length=64)
    url_contains: str | None = Field(default=None, min_length=1, max_length=2000)
    within_last: Duration | None = None

    @field_validator("within_last")
    @classmethod
    def _within(cls, v: str | None) -> str | None:
        return _positive_duration(v) if v is not None else v

    @model_validator(mode="after")
    def _shape(self) -> EngagementCondition:
        if self.url_contains is not None and self.action != "clicked":
            raise ValueError("url_contains goes with action clicked")
        if self.node is not None and self.journey_id is None:
            raise ValueError("node needs journey_id")
        return self

    def as_events(self) -> tuple[EventCondition, ...]:
        """The event conditions this stands for (any of them): engagement is sugar. Made
        once per condition (the evaluator asks for them on every evaluation)."""
        return _engagement_events(self)

    def _make_events(self) -> tuple[EventCondition, ...]:
        where: list[Filter] = []
        for key in ("message_id", "journey_id", "node"):
            v = getattr(self, key)
            if v is not None:
                where.append(Filter(path=key, op=Op.EQ, value=v))
        clicked = EventCondition(
            kind="event",
            event=ENGAGEMENT_CLICKED,
            where=(
                *where,
                *(
                    [Filter(path="url", op=Op.CONTAINS, value=self.url_contains)]
                    if self.url_contains is not None
                    else []
                ),
            ),
            within_last=self.within_last,
        )
        if self.action == "clicked":
            return (clicked,)
        opened = EventCondition(
            kind="event", event=ENGAGEMENT_OPENED, where=tuple(where), within_last=self.within_last
        )
        return (opened, clicked)


@functools.lru_cache(maxsize=4096)
def _engagement_events(cond: EngagementCondition) -> tuple[EventCondition, ...]:
    # Frozen conditions are hashable and equal by value: equal ones share their events.
    return cond._make_events()


Condition = Annotated[
    AndCondition
    | OrCondition
    | NotCondition
    | TraitCondition
    | EventCondition
    | PerformedTimeCondition
    | SequenceCondition
    | ListCondition
    | TagCondition
    | ScoreCondition
    | StageCondition
    | EngagementCondition,
    Field(discriminator="kind"),
]

AndCondition.model_rebuild()
OrCondition.model_rebuild()
NotCondition.model_rebuild()

KINDS = frozenset(
    {
        "and",
        "or",
        "not",
        "trait",
        "event",
        "first_performed",
        "last_performed",
        "sequence",
        "list",
        "tag",
        "score",
        "stage",
        "engagement",
    }
)


class SegmentDefinition(_Model):
    condition: Condition


# ---- parsing ------------------------------------------------------------------------


class SegmentProblem(BaseModel):
    """One thing wrong with a definition: where (``condition.conditions[0].op``) and why."""

    model_config = ConfigDict(frozen=True)
    path: str
    reason: str


class InvalidSegment(ValueError):
    def __init__(self, problems: list[SegmentProblem]) -> None:
        super().__init__("; ".join(f"{p.path or '-'}: {p.reason}" for p in problems))
        self.problems = problems


def children(cond: Any) -> tuple[Any, ...]:
    if isinstance(cond, AndCondition | OrCondition):
        return cond.conditions
    if isinstance(cond, NotCondition):
        return (cond.condition,)
    return ()


def walk(cond: Any) -> Iterator[Any]:
    """Every condition of a tree, parents before children."""
    yield cond
    for c in children(cond):
        yield from walk(c)


def _limits(d: SegmentDefinition) -> list[SegmentProblem]:
    problems: list[SegmentProblem] = []
    count = 0

    def visit(cond: Any, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if depth > MAX_DEPTH:
            problems.append(SegmentProblem(path=path, reason=f"nested deeper than {MAX_DEPTH} levels"))
            return
        if isinstance(cond, AndCondition | OrCondition):
            for i, c in enumerate(cond.conditions):
                visit(c, f"{path}.conditions[{i}]", depth + 1)
        elif isinstance(cond, NotCondition):
            visit(cond.condition, f"{path}.condition", depth + 1)

    visit(d.condition, "condition", 1)
    if count > MAX_CONDITIONS:
        problems.append(SegmentProblem(path="condition", reason=f"more than {MAX_CONDITIONS} conditions"))
    return problems


def parse_segment(data: Any) -> SegmentDefinition:
    """Validate a decoded JSON document; raise :class:`InvalidSegment` with every problem."""
    try:
        definition = SegmentDefinition.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        locs = [tuple(e.get("loc", ())) for e in errors]
        # A list whose items failed is also reported "too short" (its valid items are
        # counted); that echo of the real problems below it is noise.
        kept = [
            e
            for e, loc in zip(errors, locs, strict=True)
            if not (e.get("type") == "too_short" and any(o[: len(loc)] == loc and o != loc for o in locs))
        ]
        raise InvalidSegment([_problem(e, data) for e in kept]) from None
    problems = _limits(definition)
    if problems:
        raise InvalidSegment(problems)
    return definition


def _problem(error: Any, data: Any) -> SegmentProblem:
    parts: list[str] = []
    node: Any = data
    condition_slot = False
    for part in error.get("loc", ()):
        # pydantic names the chosen member of a tagged union ("trait", "event", ...) in the
        # location; the document has no such key, so leave it out.
        if condition_slot and isinstance(node, dict) and part == node.get("kind") and part in KINDS:
            condition_slot = False
            continue
        condition_slot = part == "condition" or (isinstance(part, int) and parts[-1:] == ["conditions"])
        parts.append(f"[{part}]" if isinstance(part, int) else str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    path = ""
    for p in parts:
        path += p if p.startswith("[") or not path else "." + p
    reason = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return SegmentProblem(path=path, reason=reason)


def segment_json_schema() -> dict[str, Any]:
    """The published JSON Schema of a segment definition."""
    schema = SegmentDefinition.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://whenthen.dev/schemas/segment.json"
    return schema
